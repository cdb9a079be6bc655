# Ferry: `make demo` sets everything up and runs the scenario; `make test` runs every test.
# A persistent target directory (CARGO_TARGET_DIR) saves the ~20 minute RocksDB build.
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
BIN := $(CARGO_TARGET_DIR)/debug

# scripts/setup installs grpcurl and kubernetes-validate into this virtual environment; the
# tests find them (and its python3) first on PATH.
export FERRY_TOOLS ?= $(HOME)/.cache/ferry/tools
export PATH := $(FERRY_TOOLS)/bin:$(PATH)
# C and C++ (RocksDB, lz4, ring, blake3) go through ccache, which scripts/setup installs: when a
# dependency change makes cargo rerun RocksDB's build script, the objects come from the cache in
# a minute instead of 20. Set here, not per command, so every build sees the same values (cargo
# reruns the build script when CC or CXX change).
export CC := ccache cc
export CXX := ccache c++

.PHONY: setup build test demo bench bench-scale chaos fuzz clean lint fmt fresh-check ci


setup:
	@bash scripts/setup

build: setup
	$(CARGO) build --workspace --all-targets

test: setup
	$(CARGO) build --workspace --all-targets
	$(CARGO) nextest run --workspace --no-fail-fast

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml

# Formatting and clippy with warnings as errors, as CI runs them.
lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# A clean Debian 12 root (debootstrap, cached) where scripts/setup runs and the crates that need
# system packages build: the check a developer machine cannot make (see README, "Set-up").
fresh-check:
	@bash scripts/fresh-machine-check

demo: build
	$(BIN)/ferryctl demo --bin-dir $(BIN)

# The throughput targets on an optimised build (Cargo's `bench` profile, in target/release):
# shard sync, blob recovery, `ferryctl store` and clients' latency under background load, each
# figure over three runs (about 15 minutes); the JSON report lands in the ignored .ferry-bench/.
BENCH_BIN := $(CARGO_TARGET_DIR)/release
bench: setup
	$(CARGO) build --profile bench -p ferryctl -p ferry-sync-service -p ferry-recovery-service --bins
	$(BENCH_BIN)/ferryctl bench --bin-dir $(BENCH_BIN) --bench-dir .ferry-bench --json .ferry-bench/bench.json

# A million 1 KiB blobs on a 4-node cluster: etcd size, node RSS and status latency while it
# fills, then a shard sync and a wiped node's recovery (about 2 hours on 2 cores).
bench-scale: build
	$(BIN)/ferryctl bench-scale --bin-dir $(BIN) --json .ferry-bench/scale.json

# Random histories on a real local cluster, checked after each (not part of `make test`, which
# runs a few seeds); the README reports 50.
chaos: build
	$(BIN)/ferryctl chaos --bin-dir $(BIN) --chaos-dir .ferry-chaos --seeds $(or $(SEEDS),50)

# Every cargo-fuzz target for FUZZ_SECONDS each (default 60) from the checked-in corpora; needs
# the nightly toolchain, installs cargo-fuzz. Not part of `make test` (see README, "Fuzzing").
fuzz:
	@bash scripts/fuzz

# What .ci/run does: the fresh-machine check, formatting and lint, then every test.
ci: fresh-check lint test

clean:
	$(CARGO) clean
