# Ferry: `make demo` sets everything up and runs the scenario; `make test` runs every test.
# A persistent target directory (CARGO_TARGET_DIR) saves the ~20 minute RocksDB build.
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
BIN := $(CARGO_TARGET_DIR)/debug

.PHONY: setup build test demo bench clean lint

setup:
	@bash scripts/setup

build: setup
	$(CARGO) build --workspace --all-targets

test: setup
	$(CARGO) build --workspace --all-targets
	$(CARGO) nextest run --workspace --no-fail-fast

# clippy builds in check mode, which reruns RocksDB's build script once (about 20 minutes).
lint: setup
	$(CARGO) clippy --workspace --all-targets

demo: build
	$(BIN)/ferryctl demo --bin-dir $(BIN)

# Shard sync against blob recovery and the machine's limits (about 2 minutes); the JSON report
# lands in the ignored .ferry-bench/ directory.
bench: build
	$(BIN)/ferryctl bench --bin-dir $(BIN) --bench-dir .ferry-bench --json .ferry-bench/bench.json

clean:
	$(CARGO) clean
