#!/usr/bin/env python3
"""Offline checks of Ferry's Kubernetes manifests.

For each overlay in deploy/k8s/overlays (dev, prod) this renders the overlay with
`kubectl kustomize`, validates every document strictly against the Kubernetes OpenAPI schemas
(the `kubernetes-validate` package, no cluster needed), and then applies Ferry's own rules.
The rules read the services' TOML configuration out of the rendered ConfigMap, apply the
containers' FERRY_SYNC__* / FERRY_RECOVERY__* environment overrides the way the services do,
and compare the result with the pod spec: ports, probes, volumes, TLS, disruption budget,
network policy.

    python3 deploy/validate.py               # every overlay; exit 0 when all pass
    python3 deploy/validate.py --self-test   # breaks rendered manifests on purpose and checks
                                             # that each break is caught by its rule

Needs kubectl (for kustomize; works offline) and `pip install kubernetes-validate`.
Exit codes: 0 pass, 1 a check failed, 2 a tool is missing.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import posixpath
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

try:
    import yaml
    import kubernetes_validate
except ImportError as missing:  # pragma: no cover - depends on the machine
    print(
        f"validate.py: {missing}. Install the schema validator (it brings PyYAML) with:\n"
        "    python3 -m pip install kubernetes-validate\n"
        "(scripts/setup does this too).",
        file=sys.stderr,
    )
    sys.exit(2)

DEPLOY = Path(__file__).resolve().parent
OVERLAYS_DIR = DEPLOY / "k8s" / "overlays"
OVERLAYS = ("dev", "prod")
# Oldest Kubernetes the manifests support (gRPC probes are GA from 1.27) and a current one.
KUBE_VERSIONS = ("1.27", "1.30")
# The image's user and group (deploy/Dockerfile).
IMAGE_ID = 10001
# Opening a large RocksDB store and catching up can take minutes: startup probes must allow it.
MIN_STARTUP_WINDOW_S = 300
MIN_GRACE_PERIOD_S = 30
WORKLOAD_KINDS = ("StatefulSet", "Deployment", "DaemonSet")
CLIENT_LABELS = {"ferry.io/client": "true"}
PORT_KEYS = ("listen", "health_listen", "metrics_listen")
# kustomize's name-hash suffix: 10 characters from this alphabet.
HASH_SUFFIX = re.compile(r"-[2456789bcdfghkmt]{10}$")


@dataclass(frozen=True)
class FerryService:
    """What the rules need to know about one Ferry binary."""

    binary: str
    env_prefix: str
    health_service: str  # the gRPC health service name the readiness probe must ask for
    store_key: tuple[str, ...]  # where the config names the service's store directory


SERVICES = {
    s.binary: s
    for s in (
        FerryService("sync-service", "FERRY_SYNC", "ferry.v1.SyncService", ("store", "path")),
        FerryService("recovery-service", "FERRY_RECOVERY", "ferry.v1.RecoveryService", ("store_path",)),
    )
}


# ---------------------------------------------------------------------------------------------
# Reading the rendered manifests


class Manifests:
    """The documents of one rendered overlay."""

    def __init__(self, docs: list[dict]):
        self.docs = docs

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict | None:
        for d in self.of_kind(kind):
            if meta(d).get("name") == name:
                return d
        return None

    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d.get("kind") in WORKLOAD_KINDS]

    def ferry_workloads(self) -> list[dict]:
        return [w for w in self.workloads() if any(service_of(c) for c in containers(w))]

    def ferry_containers(self) -> list[FerryContainer]:
        return [fc for w in self.ferry_workloads() for fc in ferry_containers_of(self, w)]


def meta(doc: dict) -> dict:
    return doc.get("metadata") or {}


def ref(doc: dict) -> str:
    return f"{doc.get('kind')}/{meta(doc).get('name')}"


def pod_spec(workload: dict) -> dict:
    return ((workload.get("spec") or {}).get("template") or {}).get("spec") or {}


def pod_labels(workload: dict) -> dict:
    return (((workload.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def containers(workload: dict, init: bool = False) -> list[dict]:
    spec = pod_spec(workload)
    found = list(spec.get("containers") or [])
    if init:
        found += list(spec.get("initContainers") or [])
    return found


def argv(container: dict) -> list[str]:
    return [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]


def service_of(container: dict) -> FerryService | None:
    args = argv(container)
    return SERVICES.get(posixpath.basename(args[0])) if args else None


def sample_pod_name(workload: dict) -> str:
    """The first pod's name, standing in for metadata.name (a StatefulSet's pods are NAME-0...)."""
    name = meta(workload).get("name", "pod")
    return f"{name}-0" if workload.get("kind") == "StatefulSet" else f"{name}-xxxxx"


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A metav1.LabelSelector against a label set ({} matches everything, None nothing)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def service_selects(service: dict, labels: dict) -> bool:
    selector = (service.get("spec") or {}).get("selector") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def named_ports(workload: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in containers(workload) for p in c.get("ports") or [] if p.get("name")}


def parse_address(addr: Any) -> tuple[str, int] | None:
    """"0.0.0.0:7400" or "[::]:7400" -> (host, port)."""
    match = re.fullmatch(r"\[?([^\[\]]*)\]?:(\d+)", str(addr))
    return (match.group(1), int(match.group(2))) if match else None


def lookup(table: dict | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(table, dict) or key not in table:
            return None
        table = table[key]
    return table


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes resource quantity ("250m", "1Gi", 2) as a number, None if unreadable."""
    factors = {
        "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
        "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
        "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
        "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
        "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
    }
    match = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)([a-zA-Z]*)", str(value).strip())
    if not match or match.group(2) not in factors:
        return None
    try:
        return Decimal(match.group(1)) * factors[match.group(2)]
    except InvalidOperation:
        return None


# ---------------------------------------------------------------------------------------------
# A Ferry container's effective configuration


@dataclass
class FerryContainer:
    """One Ferry container of a workload, with the configuration it would run with."""

    workload: dict
    container: dict
    service: FerryService
    config_path: str | None
    config: dict | None  # the TOML file with the environment overrides applied
    problem: str | None  # why `config` is None

    @property
    def name(self) -> str:
        return f"{ref(self.workload)} container {self.container.get('name')}"

    def port(self, key: str) -> int | None:
        addr = parse_address(lookup(self.config, key))
        return addr[1] if addr else None


def ferry_containers_of(manifests: Manifests, workload: dict) -> list[FerryContainer]:
    found = []
    for c in containers(workload):
        service = service_of(c)
        if service is None:
            continue
        path = config_argument(c, service)
        config, problem = None, None
        if path is None:
            problem = "no --config argument"
        else:
            text, problem = file_in_pod(manifests, workload, c, path)
            if text is not None:
                try:
                    config = tomllib.loads(text)
                except tomllib.TOMLDecodeError as e:
                    problem = f"{path} is not valid TOML: {e}"
                else:
                    problem = apply_env_overrides(config, c, service, sample_pod_name(workload))
                    if problem:
                        config = None
        found.append(FerryContainer(workload, c, service, path, config, problem))
    return found


def config_argument(container: dict, service: FerryService) -> str | None:
    args = argv(container)
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    for env in container.get("env") or []:
        if env.get("name") == f"{service.env_prefix}_CONFIG" and "value" in env:
            return str(env["value"])
    return None


def mount_for(container: dict, path: str) -> dict | None:
    """The volume mount that holds `path` (the deepest one)."""
    best = None
    for m in container.get("volumeMounts") or []:
        mount_path = str(m.get("mountPath", "")).rstrip("/") or "/"
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            if best is None or len(mount_path) > len(str(best["mountPath"]).rstrip("/")):
                best = m
    return best


def volume_named(workload: dict, name: str) -> dict | None:
    for v in pod_spec(workload).get("volumes") or []:
        if v.get("name") == name:
            return v
    return None


def file_in_pod(manifests: Manifests, workload: dict, container: dict, path: str) -> tuple[str | None, str | None]:
    """The contents of `path` as the container would see it, when it comes from a ConfigMap."""
    mount = mount_for(container, path)
    if mount is None:
        return None, f"{path} is on no volume mount"
    volume = volume_named(workload, mount.get("name"))
    if volume is None or "configMap" not in volume:
        return None, f"{path} is not on a ConfigMap volume"
    rel = posixpath.relpath(path, mount["mountPath"]) if path != mount["mountPath"] else ""
    if mount.get("subPath"):
        key = posixpath.join(mount["subPath"], rel) if rel else mount["subPath"]
    else:
        key = rel
    cm_name = volume["configMap"].get("name")
    items = volume["configMap"].get("items")
    if items:
        key = next((i.get("key") for i in items if i.get("path") == key), None)
    cm = manifests.get("ConfigMap", cm_name)
    if cm is None:
        return None, f"ConfigMap {cm_name} is not among the rendered manifests"
    data = cm.get("data") or {}
    if key not in data:
        return None, f"ConfigMap {cm_name} has no key {key!r} for {path}"
    return data[key], None


def expand_env(value: str, known: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values ($$ escapes; unknown names stay as they are)."""

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return known.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def toml_scalar(raw: str) -> Any:
    """Like the services: a value that parses as TOML is taken as one, anything else as a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(config: dict, container: dict, service: FerryService, pod_name: str) -> str | None:
    """Applies <PREFIX>__SECTION__KEY variables to `config` in place; returns a problem or None."""
    known: dict[str, str] = {}
    marker = f"{service.env_prefix}__"
    overrides = []
    for env in container.get("env") or []:
        name = env.get("name", "")
        if "value" in env:
            value = expand_env(str(env["value"]), known)
        elif lookup(env, "valueFrom", "fieldRef", "fieldPath") == "metadata.name":
            value = pod_name
        else:
            value = f"<{name} from {sorted((env.get('valueFrom') or {}).keys())}>"
        known[name] = value
        if name.startswith(marker):
            overrides.append((name, value))
    for name, value in sorted(overrides):
        path = [p.lower() for p in name[len(marker):].split("__")]
        table = config
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                return f"environment variable {name}: `{part}` is a value, not a section"
        table[path[-1]] = toml_scalar(value)
    return None


# ---------------------------------------------------------------------------------------------
# NetworkPolicy evaluation (enough of it for these checks)


def policy_types(policy: dict) -> list[str]:
    spec = policy.get("spec") or {}
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress"] + (["Egress"] if "egress" in spec else [])


def policies_for(manifests: Manifests, labels: dict, direction: str) -> list[dict]:
    return [
        p
        for p in manifests.of_kind("NetworkPolicy")
        if selector_matches((p.get("spec") or {}).get("podSelector"), labels) and direction in policy_types(p)
    ]


def covers_port(rule: dict, port: int, protocol: str, names: dict[str, int]) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        target = p.get("port")
        if target is None:
            return True
        if isinstance(target, int) and target <= port <= p.get("endPort", target):
            return True
        if isinstance(target, str) and names.get(target) == port:
            return True
    return False


def allows(policies: list[dict], direction: str, port: int, protocol: str, peer_ok: Callable[[dict | None], bool], names: dict[str, int] | None = None) -> bool:
    """Whether some rule of `policies` lets traffic through on port/protocol from/to a peer
    that `peer_ok` accepts (peer None stands for "every peer": a rule without from/to)."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in policies:
        for rule in (policy.get("spec") or {}).get(key) or []:
            if not covers_port(rule, port, protocol, names or {}):
                continue
            peers = rule.get(peers_key)
            if not peers:
                if peer_ok(None):
                    return True
            elif any(peer_ok(peer) for peer in peers):
                return True
    return False


def peer_is_pods(labels: dict) -> Callable[[dict | None], bool]:
    """Accepts peers that include pods of this namespace carrying `labels`."""

    def ok(peer: dict | None) -> bool:
        if peer is None:
            return True
        if "podSelector" not in peer:
            return False
        ns = peer.get("namespaceSelector")
        return selector_matches(peer["podSelector"], labels) and (ns is None or ns == {})

    return ok


def peer_is_anyone(peer: dict | None) -> bool:
    if peer is None:
        return True
    cidr = lookup(peer, "ipBlock", "cidr")
    return cidr in ("0.0.0.0/0", "::/0") and not lookup(peer, "ipBlock", "except")


def peer_is_namespace(peer: dict | None) -> bool:
    return peer is None or "namespaceSelector" in peer


# ---------------------------------------------------------------------------------------------
# Rules: each returns a list of problems; an empty list means the rule holds.

Rule = Callable[[Manifests], list[str]]
RULES: dict[str, tuple[str, Rule]] = {}


def rule(name: str, summary: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[name] = (summary, fn)
        return fn

    return register


@rule("probes", "startup, liveness and readiness probes; Ferry's are gRPC on the config's health_listen port")
def check_probes(m: Manifests) -> list[str]:
    errors = []
    for w in m.workloads():
        for c in containers(w):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if not c.get(probe):
                    errors.append(f"{ref(w)} container {c.get('name')}: no {probe}")
    for fc in m.ferry_containers():
        if fc.config is None:
            continue  # the config-volume rule says why
        health = fc.port("health_listen")
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = fc.container.get(probe_name)
            if not probe:
                continue
            handlers = sorted(k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe)
            if handlers != ["grpc"]:
                errors.append(f"{fc.name}: {probe_name} must be a grpc probe (has {', '.join(handlers) or 'no handler'})")
                continue
            port = probe["grpc"].get("port")
            if health is None:
                errors.append(f"{fc.name}: the config names no health_listen address for {probe_name} to check")
            elif port != health:
                errors.append(f"{fc.name}: {probe_name} checks port {port}, but the config's health_listen is port {health}")
            if probe_name != "readinessProbe" and probe["grpc"].get("service"):
                errors.append(
                    f"{fc.name}: {probe_name} asks for service {probe['grpc']['service']!r}; it must ask for the "
                    "server's overall health (no service), or a node that is still catching up gets restarted"
                )
        startup = fc.container.get("startupProbe") or {}
        if startup:
            window = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
            if window < MIN_STARTUP_WINDOW_S:
                errors.append(
                    f"{fc.name}: startupProbe allows {window} s (failureThreshold x periodSeconds); opening the "
                    f"store and catching up needs at least {MIN_STARTUP_WINDOW_S} s"
                )
    return errors


@rule("readiness-service", "readiness probes name the service's own gRPC health service")
def check_readiness_service(m: Manifests) -> list[str]:
    errors = []
    for fc in m.ferry_containers():
        grpc = lookup(fc.container, "readinessProbe", "grpc")
        if grpc is None:
            continue  # the probes rule reports it
        if grpc.get("service") != fc.service.health_service:
            errors.append(
                f"{fc.name}: readinessProbe asks for service {grpc.get('service')!r}, expected "
                f"{fc.service.health_service!r} (serving only once the service is ready)"
            )
    return errors


@rule("ports", "container ports are exactly the config's listen/health_listen/metrics_listen ports, bound on all interfaces")
def check_ports(m: Manifests) -> list[str]:
    errors = []
    for w in m.ferry_workloads():
        names: dict[str, str] = {}
        for c in containers(w):
            for p in c.get("ports") or []:
                if p.get("name") in names:
                    errors.append(f"{ref(w)}: port name {p['name']!r} is used by both {names[p['name']]} and {c.get('name')}")
                elif p.get("name"):
                    names[p["name"]] = c.get("name")
    fcs = m.ferry_containers()
    for fc in fcs:
        if fc.config is None:
            continue
        expected: dict[int, str] = {}
        for key in PORT_KEYS:
            addr = parse_address(lookup(fc.config, key))
            if addr is None:
                errors.append(f"{fc.name}: the config sets no valid {key} (got {lookup(fc.config, key)!r})")
                continue
            host, port = addr
            if not (_is_ip(host) and ipaddress.ip_address(host).is_unspecified):
                errors.append(f"{fc.name}: {key} = {lookup(fc.config, key)!r} binds one address; in a pod it must be 0.0.0.0 (or [::]) to be reachable from outside")
            expected[port] = key
        declared = {}
        for p in fc.container.get("ports") or []:
            if p.get("protocol", "TCP") != "TCP":
                errors.append(f"{fc.name}: containerPort {p.get('containerPort')} is {p.get('protocol')}; Ferry serves TCP only")
            declared[p.get("containerPort")] = p.get("name")
        for port, key in expected.items():
            if port not in declared:
                errors.append(f"{fc.name}: the config's {key} is port {port}, but the container declares no containerPort {port}")
        for port, name in declared.items():
            if port not in expected:
                errors.append(f"{fc.name}: containerPort {port} ({name}) is none of the config's {'/'.join(PORT_KEYS)} ports {sorted(expected)}")
    # recovery-service talks to the sync-service of its own pod.
    for fc in fcs:
        if fc.service.binary != "recovery-service" or fc.config is None:
            continue
        sync = [o for o in fcs if o.workload is fc.workload and o.service.binary == "sync-service" and o.config is not None]
        target = parse_address(fc.config.get("sync_service"))
        if not sync:
            continue
        if target is None or target[0] not in ("127.0.0.1", "localhost", "::1"):
            errors.append(f"{fc.name}: sync_service = {fc.config.get('sync_service')!r} must be this pod's own sync-service on 127.0.0.1")
        elif target[1] != sync[0].port("listen"):
            errors.append(f"{fc.name}: sync_service port {target[1]} is not the pod's sync-service listen port {sync[0].port('listen')}")
    return errors


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@rule("pdb", "one PodDisruptionBudget selects the Ferry pods, with 1 <= maxUnavailable <= (replicas-1)//3")
def check_pdb(m: Manifests) -> list[str]:
    errors = []
    for w in m.ferry_workloads():
        labels = pod_labels(w)
        replicas = (w.get("spec") or {}).get("replicas", 1)
        pdbs = [p for p in m.of_kind("PodDisruptionBudget") if selector_matches((p.get("spec") or {}).get("selector"), labels)]
        if not pdbs:
            errors.append(f"{ref(w)}: no PodDisruptionBudget selects its pods (labels {labels})")
            continue
        if len(pdbs) > 1:
            errors.append(f"{ref(w)}: {len(pdbs)} PodDisruptionBudgets select its pods ({', '.join(map(ref, pdbs))}); evictions fail with more than one")
        for pdb in pdbs:
            spec = pdb.get("spec") or {}
            for other in m.workloads():
                if other is not w and selector_matches(spec.get("selector"), pod_labels(other)):
                    errors.append(f"{ref(pdb)}: its selector also matches the pods of {ref(other)}")
            if "minAvailable" in spec:
                errors.append(f"{ref(pdb)}: uses minAvailable; use maxUnavailable, which follows the tolerance f")
            most = spec.get("maxUnavailable")
            if not isinstance(most, int) or isinstance(most, bool):
                errors.append(f"{ref(pdb)}: maxUnavailable must be a whole number of pods, got {most!r}")
                continue
            tolerated = (replicas - 1) // 3
            if replicas < 4:
                errors.append(f"{ref(w)}: {replicas} replicas tolerate no unavailable node (f = (n-1)//3 = {tolerated}); run at least 4 so a drain can proceed")
            elif not 1 <= most <= tolerated:
                errors.append(f"{ref(pdb)}: maxUnavailable {most} with {replicas} replicas; the committee tolerates f = ({replicas}-1)//3 = {tolerated}, so it must be 1..{tolerated}")
    return errors


@rule("services", "the headless peer Service is clusterIP None, publishes not-ready pods and selects them; target ports resolve")
def check_services(m: Manifests) -> list[str]:
    errors = []
    for w in m.ferry_workloads():
        labels = pod_labels(w)
        name = (w.get("spec") or {}).get("serviceName")
        if w.get("kind") == "StatefulSet":
            svc = m.get("Service", name) if name else None
            if svc is None:
                errors.append(f"{ref(w)}: serviceName {name!r} names no Service in the manifests")
            else:
                spec = svc.get("spec") or {}
                if spec.get("clusterIP") != "None":
                    errors.append(f"{ref(svc)}: the peer Service must be headless (clusterIP: None), got {spec.get('clusterIP')!r}")
                if spec.get("publishNotReadyAddresses") is not True:
                    errors.append(f"{ref(svc)}: publishNotReadyAddresses must be true: recovering nodes reach each other before they are Ready")
                if not service_selects(svc, labels):
                    errors.append(f"{ref(svc)}: its selector {spec.get('selector')} does not select the pods of {ref(w)} (labels {labels})")
        ports = named_ports(w)
        numbers = set(ports.values())
        for svc in m.of_kind("Service"):
            if not service_selects(svc, labels):
                continue
            for p in (svc.get("spec") or {}).get("ports") or []:
                target = p.get("targetPort", p.get("port"))
                if (isinstance(target, str) and target not in ports) or (isinstance(target, int) and target not in numbers):
                    errors.append(f"{ref(svc)}: port {p.get('name') or p.get('port')} targets {target!r}, which no container of {ref(w)} declares")
    return errors


@rule("statefulset", "Ferry runs as a StatefulSet with Parallel pod management and time to drain")
def check_statefulset(m: Manifests) -> list[str]:
    errors = []
    for w in m.ferry_workloads():
        if w.get("kind") != "StatefulSet":
            errors.append(f"{ref(w)}: Ferry nodes need stable names and volumes: use a StatefulSet")
            continue
        spec = w.get("spec") or {}
        if spec.get("podManagementPolicy") != "Parallel":
            errors.append(f"{ref(w)}: podManagementPolicy is {spec.get('podManagementPolicy', 'OrderedReady')!r}; it must be Parallel so a recovering node does not wait for its peers")
        grace = pod_spec(w).get("terminationGracePeriodSeconds", 30)
        if grace < MIN_GRACE_PERIOD_S:
            errors.append(f"{ref(w)}: terminationGracePeriodSeconds {grace} leaves too little time to drain on SIGTERM (at least {MIN_GRACE_PERIOD_S})")
        binaries = sorted(fc.service.binary for fc in ferry_containers_of(m, w))
        if binaries != sorted(SERVICES):
            errors.append(f"{ref(w)}: a pod runs one sync-service and one recovery-service, found {binaries}")
    return errors


@rule("consistency", "node_id is the pod name; a pod's services share node id, key and control plane")
def check_consistency(m: Manifests) -> list[str]:
    errors = []
    for w in m.ferry_workloads():
        fcs = [fc for fc in ferry_containers_of(m, w) if fc.config is not None]
        pod = sample_pod_name(w)
        for fc in fcs:
            if fc.config.get("node_id") != pod:
                errors.append(f"{fc.name}: node_id is {fc.config.get('node_id')!r} in pod {pod}; it must be the pod name (env from metadata.name)")
        for key in (("key_file",), ("control_plane", "etcd_endpoints"), ("control_plane", "cluster"), ("tls", "ca_file")):
            values = {fc.container.get("name"): lookup(fc.config, *key) for fc in fcs}
            if len({repr(v) for v in values.values()}) > 1:
                errors.append(f"{ref(w)}: the containers disagree on {'.'.join(key)}: {values}")
    return errors


@rule("resources", "every container requests and limits cpu and memory, requests <= limits")
def check_resources(m: Manifests) -> list[str]:
    errors = []
    for w in m.workloads():
        for c in containers(w, init=True):
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    value = lookup(res, kind, resource)
                    if value is None:
                        errors.append(f"{ref(w)} container {c.get('name')}: no {kind}.{resource}")
                    elif parse_quantity(value) is None:
                        errors.append(f"{ref(w)} container {c.get('name')}: {kind}.{resource} {value!r} is not a quantity")
            for resource in ("cpu", "memory"):
                low, high = parse_quantity(lookup(res, "requests", resource)), parse_quantity(lookup(res, "limits", resource))
                if low is not None and high is not None and low > high:
                    errors.append(f"{ref(w)} container {c.get('name')}: requests.{resource} exceeds limits.{resource}")
    return errors


@rule("security-context", "non-root uid/gid 10001, RuntimeDefault seccomp, no privilege escalation, read-only root, no capabilities")
def check_security_context(m: Manifests) -> list[str]:
    errors = []
    ferry = [id(w) for w in m.ferry_workloads()]
    for w in m.workloads():
        spec = pod_spec(w)
        pod_sc = spec.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                errors.append(f"{ref(w)}: {flag} is set")
        if pod_sc.get("runAsNonRoot") is not True:
            errors.append(f"{ref(w)}: pod securityContext.runAsNonRoot must be true, got {str(pod_sc.get('runAsNonRoot')).lower()}")
        if id(w) in ferry:
            for key in ("runAsUser", "runAsGroup", "fsGroup"):
                if pod_sc.get(key) != IMAGE_ID:
                    errors.append(f"{ref(w)}: pod securityContext.{key} must be {IMAGE_ID} (the image's ferry user), got {pod_sc.get(key)!r}")
        elif pod_sc.get("fsGroup") is None:
            errors.append(f"{ref(w)}: pod securityContext.fsGroup is not set, so a non-root process may not write its volume")
        for c in containers(w, init=True):
            sc = c.get("securityContext") or {}
            who = f"{ref(w)} container {c.get('name')}"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if uid in (None, 0):
                errors.append(f"{who}: runs as uid {uid!r}; set a non-zero runAsUser")
            if sc.get("runAsNonRoot") is False:
                errors.append(f"{who}: securityContext.runAsNonRoot is false")
            seccomp = lookup(sc, "seccompProfile", "type") or lookup(pod_sc, "seccompProfile", "type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                errors.append(f"{who}: seccompProfile is {seccomp!r}; use RuntimeDefault")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{who}: securityContext.allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.append(f"{who}: securityContext.readOnlyRootFilesystem must be true")
            if sc.get("privileged"):
                errors.append(f"{who}: privileged")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                errors.append(f"{who}: securityContext.capabilities.drop must contain ALL")
            if caps.get("add"):
                errors.append(f"{who}: adds capabilities {caps['add']}")
    return errors


@rule("storage", "each service mounts its own volumeClaimTemplate at its config's store path")
def check_storage(m: Manifests) -> list[str]:
    errors = []
    for w in m.ferry_workloads():
        templates = {meta(t).get("name"): t for t in (w.get("spec") or {}).get("volumeClaimTemplates") or []}
        owners: dict[str, list[str]] = {}
        for fc in ferry_containers_of(m, w):
            if fc.config is None:
                continue
            path = lookup(fc.config, *fc.service.store_key)
            key = ".".join(fc.service.store_key)
            if not isinstance(path, str) or not path.startswith("/"):
                errors.append(f"{fc.name}: the config's {key} is {path!r}; it must be an absolute path on a volume claim")
                continue
            path = posixpath.normpath(path)
            mount = next((v for v in fc.container.get("volumeMounts") or [] if posixpath.normpath(str(v.get("mountPath"))) == path), None)
            if mount is None:
                errors.append(f"{fc.name}: nothing is mounted at {path} (the config's {key}); the store would be on the container's filesystem")
                continue
            if volume_named(fc.workload, mount.get("name")) is not None or mount.get("name") not in templates:
                errors.append(f"{fc.name}: {path} is volume {mount.get('name')!r}, which is not one of the volumeClaimTemplates {sorted(templates)}")
                continue
            if mount.get("readOnly"):
                errors.append(f"{fc.name}: the store volume {mount.get('name')} is mounted read-only")
            owners.setdefault(mount["name"], []).append(str(fc.container.get("name")))
        for claim, users in owners.items():
            if len(users) > 1:
                errors.append(f"{ref(w)}: claim {claim} holds the stores of {', '.join(users)}; each container needs its own")
        for name, t in templates.items():
            spec = t.get("spec") or {}
            if not set(spec.get("accessModes") or []) & {"ReadWriteOnce", "ReadWriteOncePod"}:
                errors.append(f"{ref(w)}: volumeClaimTemplate {name} must be ReadWriteOnce")
            if parse_quantity(lookup(spec, "resources", "requests", "storage")) is None:
                errors.append(f"{ref(w)}: volumeClaimTemplate {name} requests no storage size")
    return errors


@rule("config-volume", "the config is a fixed-name ConfigMap mounted as a directory (no subPath) at the --config file's directory")
def check_config_volume(m: Manifests) -> list[str]:
    errors = []
    for fc in m.ferry_containers():
        if fc.config_path is None:
            errors.append(f"{fc.name}: no --config argument")
            continue
        if not fc.config_path.startswith("/"):
            errors.append(f"{fc.name}: --config {fc.config_path} is relative; use an absolute path")
            continue
        mount = mount_for(fc.container, fc.config_path)
        if mount is None:
            errors.append(f"{fc.name}: --config {fc.config_path} is on no volume mount")
            continue
        volume = volume_named(fc.workload, mount.get("name")) or {}
        if "configMap" not in volume:
            errors.append(f"{fc.name}: {fc.config_path} comes from volume {mount.get('name')!r}, which is not a ConfigMap")
            continue
        if mount.get("subPath") or mount.get("subPathExpr"):
            errors.append(
                f"{fc.name}: the config is mounted with subPath {mount.get('subPath') or mount.get('subPathExpr')!r}; the kubelet "
                "never updates subPath mounts, so live config changes would not arrive. Mount the ConfigMap as a directory"
            )
        directory = posixpath.dirname(fc.config_path)
        if posixpath.normpath(str(mount.get("mountPath"))) != directory:
            errors.append(f"{fc.name}: the ConfigMap is mounted at {mount.get('mountPath')}; mount it at {directory}, the directory the service watches")
        if not mount.get("readOnly"):
            errors.append(f"{fc.name}: mount the config volume readOnly")
        cm_ref = volume["configMap"]
        if cm_ref.get("optional"):
            errors.append(f"{fc.name}: the config volume is optional; a pod without its config must not start")
        cm = m.get("ConfigMap", cm_ref.get("name"))
        if cm is not None:
            if HASH_SUFFIX.search(str(meta(cm).get("name"))):
                errors.append(f"{ref(cm)}: has a kustomize hash suffix, so each edit makes a new ConfigMap and a rollout instead of a live change (disableNameSuffixHash: true)")
            if cm.get("immutable"):
                errors.append(f"{ref(cm)}: is immutable, so it cannot be edited live")
        if fc.problem:
            errors.append(f"{fc.name}: cannot read its configuration: {fc.problem}")
    return errors


def secret_mount(fc: FerryContainer, path: str) -> tuple[dict | None, str | None]:
    """The Secret volume that holds `path`, or a problem."""
    mount = mount_for(fc.container, path)
    if mount is None:
        return None, f"{path} is on no volume mount"
    volume = volume_named(fc.workload, mount.get("name")) or {}
    if "secret" not in volume:
        return None, f"{path} is on volume {mount.get('name')!r}, which is not a Secret"
    if not mount.get("readOnly"):
        return None, f"{path}: mount the secret volume {mount.get('name')!r} readOnly"
    items = volume["secret"].get("items")
    rel = posixpath.relpath(path, mount["mountPath"])
    if items and not any(i.get("path") == rel for i in items):
        return None, f"{path}: the secret volume {mount.get('name')!r} lists items without {rel}"
    return volume, None


CSI_DRIVER = "csi.cert-manager.io"
CSI = "csi.cert-manager.io/"
POD_NAME_VAR = "${POD_NAME}"


def own_volume(fc: FerryContainer, path: str) -> tuple[dict | None, dict | None, str | None]:
    """The volume and mount holding `path` in `fc`'s container, or a problem."""
    mount = mount_for(fc.container, path)
    if mount is None:
        return None, None, f"{path} is on no volume mount"
    volume = volume_named(fc.workload, mount.get("name"))
    return volume, mount, None


@rule("tls", "[tls] is enabled; its CA, certificate and key are this pod's own, issued into a CSI volume naming ${POD_NAME}.node.ferry")
def check_tls(m: Manifests) -> list[str]:
    errors = []
    certificates: dict[str, dict] = {}  # each certificate volume, once -> the attributes asking for it
    for fc in m.ferry_containers():
        if fc.config is None:
            continue
        tls = fc.config.get("tls")
        if not isinstance(tls, dict) or tls.get("enabled") is not True:
            enabled = lookup(tls, "enabled")
            shown = str(enabled).lower() if isinstance(enabled, bool) else repr(enabled)
            errors.append(f"{fc.name}: [tls] enabled is {shown}; it must be true, or peers, clients and ferryctl talk in plaintext")
            continue
        files = {"ca_file": "ca-file", "cert_file": "certificate-file", "key_file": "privatekey-file"}
        for key, attribute in files.items():
            path = tls.get(key)
            if not isinstance(path, str):
                errors.append(f"{fc.name}: tls.{key} is not set")
                continue
            volume, mount, problem = own_volume(fc, path)
            if problem:
                errors.append(f"{fc.name}: tls.{key}: {problem}")
                continue
            csi = (volume or {}).get("csi")
            if not csi or csi.get("driver") != CSI_DRIVER:
                errors.append(
                    f"{fc.name}: tls.{key}: {path} is on volume {mount.get('name')!r}, which is not a {CSI_DRIVER} volume: "
                    "a Secret shared by the pods would give every pod every node's key"
                )
                continue
            if not mount.get("readOnly") or not csi.get("readOnly"):
                errors.append(f"{fc.name}: tls.{key}: mount the certificate volume {mount.get('name')!r} readOnly")
            attrs = csi.get("volumeAttributes") or {}
            rel = posixpath.relpath(path, mount["mountPath"])
            if attrs.get(CSI + attribute) != rel:
                errors.append(f"{fc.name}: tls.{key} is {rel} in the volume, but the driver writes {attrs.get(CSI + attribute)!r} ({CSI}{attribute})")
            certificates[f"{ref(fc.workload)} volume {mount['name']}"] = attrs
    for where, attrs in certificates.items():
        errors += [f"{where}: {problem}" for problem in certificate_problems(attrs)]
    return errors


def certificate_problems(attrs: dict) -> list[str]:
    """What is wrong with the certificate a cert-manager CSI volume asks for."""
    problems = []
    own = f"{POD_NAME_VAR}.node.ferry"
    names = [n.strip() for n in str(attrs.get(CSI + "dns-names", "")).split(",") if n.strip()]
    if own not in names or attrs.get(CSI + "common-name") != own:
        problems.append(f"the certificate must name {own} as its common name and a DNS name, got {attrs.get(CSI + 'common-name')!r} and {names}")
    if any(POD_NAME_VAR not in n for n in names):
        problems.append(f"every DNS name of the certificate must contain {POD_NAME_VAR} (no name shared between pods): {names}")
    usages = {u.strip() for u in str(attrs.get(CSI + "key-usages", "")).split(",")}
    if not {"server auth", "client auth"} <= usages:
        problems.append(f"the certificate's key-usages must include server auth and client auth, got {sorted(usages)}")
    if str(attrs.get(CSI + "fs-group")) != str(IMAGE_ID):
        problems.append(f"{CSI}fs-group must be {IMAGE_ID} so the services (group {IMAGE_ID}) read the key")
    return problems


@rule("identity", "each pod's node key is made on its own claim by an init step and read-only to the services; no pod mounts a Secret")
def check_identity(m: Manifests) -> list[str]:
    errors = []
    for fc in m.ferry_containers():
        if fc.config is None:
            continue
        path = fc.config.get("key_file")
        if not isinstance(path, str) or not path.startswith("/"):
            errors.append(f"{fc.name}: key_file is {path!r}; it must be an absolute path on the pod's identity claim")
            continue
        _, mount, problem = own_volume(fc, path)
        if problem:
            errors.append(f"{fc.name}: key_file: {problem}")
            continue
        templates = {meta(t).get("name") for t in (fc.workload.get("spec") or {}).get("volumeClaimTemplates") or []}
        if mount.get("name") not in templates or volume_named(fc.workload, mount.get("name")) is not None:
            errors.append(f"{fc.name}: key_file {path} is on {mount.get('name')!r}, not on one of the pod's own claims {sorted(templates)}")
            continue
        if not mount.get("readOnly"):
            errors.append(f"{fc.name}: the identity claim {mount.get('name')!r} must be mounted readOnly in the service")
        makers = []
        for init in containers(fc.workload, init=True):
            init_mount = mount_for(init, path)
            command = argv(init)
            if init_mount and init_mount.get("name") == mount.get("name") and "keygen" in command and "--keep-existing" in command and path in command:
                makers.append(init.get("name"))
        if not makers:
            errors.append(f"{fc.name}: no init container makes {path} on claim {mount.get('name')!r} (ferryctl keygen --keep-existing --out {path})")
    for w in m.ferry_workloads():
        for v in pod_spec(w).get("volumes") or []:
            sources = [v] + [s for s in (v.get("projected") or {}).get("sources") or []]
            if any("secret" in s for s in sources):
                errors.append(
                    f"{ref(w)}: volume {v.get('name')!r} mounts a Secret; a Secret is the same in every pod, so it would give each pod "
                    "the other nodes' keys (or the operator's certificate)"
                )
    return errors


@rule("network-policy", "a NetworkPolicy isolates the Ferry pods and admits exactly the traffic Ferry needs")
def check_network_policy(m: Manifests) -> list[str]:
    errors = []
    for w in m.ferry_workloads():
        labels = pod_labels(w)
        names = named_ports(w)
        ingress = policies_for(m, labels, "Ingress")
        egress = policies_for(m, labels, "Egress")
        if not ingress:
            errors.append(f"{ref(w)}: no NetworkPolicy selects its pods for Ingress; they accept traffic from anywhere")
        if not egress:
            errors.append(f"{ref(w)}: no NetworkPolicy selects its pods for Egress")
        fcs = [fc for fc in ferry_containers_of(m, w) if fc.config is not None]
        for fc in fcs:
            listen, health, metrics = (fc.port(k) for k in PORT_KEYS)
            if ingress and listen is not None:
                if not allows(ingress, "Ingress", listen, "TCP", peer_is_pods(labels), names):
                    errors.append(f"{fc.name}: ingress to port {listen} from the other Ferry pods is not allowed")
                if not allows(ingress, "Ingress", listen, "TCP", peer_is_pods(CLIENT_LABELS), names):
                    errors.append(f"{fc.name}: ingress to port {listen} from client pods labelled {CLIENT_LABELS} is not allowed")
            if ingress and health is not None and not allows(ingress, "Ingress", health, "TCP", peer_is_anyone, names):
                errors.append(f"{fc.name}: ingress to the health port {health} must be open to every source (kubelet probes come from the node)")
            if ingress and metrics is not None and not allows(ingress, "Ingress", metrics, "TCP", peer_is_namespace, names):
                errors.append(f"{fc.name}: ingress to the metrics port {metrics} from a monitoring namespace is not allowed")
            if egress and listen is not None and not allows(egress, "Egress", listen, "TCP", peer_is_pods(labels), names):
                errors.append(f"{fc.name}: egress to the other Ferry pods on port {listen} is not allowed")
            for endpoint in lookup(fc.config, "control_plane", "etcd_endpoints") or []:
                errors += check_etcd_path(m, w, egress, str(endpoint), fc.name)
        for protocol in ("UDP", "TCP"):
            if egress and not allows(egress, "Egress", 53, protocol, lambda peer: True):
                errors.append(f"{ref(w)}: egress to DNS (53/{protocol}) is not allowed; peer and etcd names would not resolve")
    return errors


def check_etcd_path(m: Manifests, w: dict, egress: list[dict], endpoint: str, who: str) -> list[str]:
    """Ferry pods can reach an etcd endpoint: their own egress, and, when the endpoint is a
    Service of these manifests, the ingress policies of the pods behind it."""
    try:
        url = urlsplit(endpoint)
        host, port = url.hostname, url.port or 2379
    except ValueError:
        return [f"{who}: etcd endpoint {endpoint!r} is not a URL"]
    if url.scheme not in ("http", "https") or not host:
        return [f"{who}: etcd endpoint {endpoint!r} is not an http(s)://host:port URL"]
    errors = []
    if egress and not allows(egress, "Egress", port, "TCP", lambda peer: True):
        errors.append(f"{who}: egress to etcd ({endpoint}) on port {port} is not allowed")
    namespace = meta(w).get("namespace", "default")
    for svc in m.of_kind("Service"):
        name = meta(svc).get("name")
        if host not in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
            continue
        svc_port = next((p for p in (svc.get("spec") or {}).get("ports") or [] if p.get("port") == port), None)
        if svc_port is None:
            errors.append(f"{who}: etcd endpoint {endpoint} names {ref(svc)}, which has no port {port}")
            continue
        for backend in m.workloads():
            if not service_selects(svc, pod_labels(backend)):
                continue
            target = svc_port.get("targetPort", port)
            target = named_ports(backend).get(target) if isinstance(target, str) else target
            isolated = policies_for(m, pod_labels(backend), "Ingress")
            if target is None:
                errors.append(f"{ref(svc)}: targetPort {svc_port.get('targetPort')!r} is not a port of {ref(backend)}")
            elif isolated and not allows(isolated, "Ingress", target, "TCP", peer_is_pods(pod_labels(w)), named_ports(backend)):
                errors.append(f"{ref(backend)}: its NetworkPolicy does not admit the Ferry pods on port {target} ({endpoint})")
    return errors


# ---------------------------------------------------------------------------------------------
# Running


def kubectl() -> str:
    found = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if found is None:
        print(
            "validate.py: kubectl is not on PATH. It renders the overlays (`kubectl kustomize`, offline); "
            "install kubectl 1.27 or newer (https://kubernetes.io/docs/tasks/tools/).",
            file=sys.stderr,
        )
        sys.exit(2)
    return found


def render(overlay: str) -> list[dict]:
    path = OVERLAYS_DIR / overlay
    result = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed:\n{result.stderr.strip()}")
    try:
        return [d for d in yaml.safe_load_all(result.stdout) if d]
    except yaml.YAMLError as e:
        raise RenderError(f"kubectl kustomize {path} printed invalid YAML: {e}") from e


class RenderError(Exception):
    pass


def check_schemas(docs: list[dict]) -> list[str]:
    errors = []
    for version in KUBE_VERSIONS:
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path) or "(top level)"
                errors.append(f"{ref(doc)} against Kubernetes {version}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{ref(doc)}: {e.message}")
            except Exception as e:  # e.g. a kubernetes-validate without schemas for this version
                errors.append(f"{ref(doc)} against Kubernetes {version}: cannot validate: {type(e).__name__}: {getattr(e, 'message', e)}")
    return errors


def run_rules(docs: list[dict]) -> dict[str, list[str]]:
    manifests = Manifests(docs)
    # A problem seen from both containers of a pod is reported once.
    return {name: list(dict.fromkeys(fn(manifests))) for name, (_, fn) in RULES.items()}


def summary(docs: list[dict]) -> str:
    kinds: dict[str, int] = {}
    for d in docs:
        kinds[d.get("kind", "?")] = kinds.get(d.get("kind", "?"), 0) + 1
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items())


def validate_overlays(overlays: list[str]) -> int:
    failed = []
    for overlay in overlays:
        try:
            docs = render(overlay)
        except RenderError as e:
            print(f"{overlay}: FAIL\n  {e}")
            failed.append(overlay)
            continue
        print(f"{overlay}: {len(docs)} documents ({summary(docs)})")
        results = {"schema": check_schemas(docs), **run_rules(docs)}
        describe = {"schema": f"strict OpenAPI schemas of Kubernetes {' and '.join(KUBE_VERSIONS)} (kubernetes-validate {kubernetes_validate.__version__})"}
        describe.update({name: text for name, (text, _) in RULES.items()})
        for name, errors in results.items():
            print(f"  {'ok  ' if not errors else 'FAIL'}  {name:<18} {describe[name]}")
            for error in errors:
                print(f"          - {error}")
        bad = sum(1 for e in results.values() if e)
        print(f"{overlay}: {'PASS' if not bad else f'FAIL ({bad} of {len(results)} checks)'}")
        if bad:
            failed.append(overlay)
    if failed:
        print(f"validate.py: {', '.join(failed)} failed")
        return 1
    print(f"validate.py: {len(overlays)} overlays pass")
    return 0


# ---------------------------------------------------------------------------------------------
# Self-test: each mutation breaks one thing, and the rule meant for it must say so.


def ferry_sts(docs: list[dict]) -> dict:
    return Manifests(docs).ferry_workloads()[0]


def ferry_pod(docs: list[dict]) -> dict:
    return pod_spec(ferry_sts(docs))


def container_named(docs: list[dict], name: str) -> dict:
    return next(c for c in ferry_pod(docs)["containers"] if c["name"] == name)


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"{len(found)} {kind}s to mutate, expected one"
    return found[0]


def edit_config(docs: list[dict], file: str, pattern: str, replacement: str) -> None:
    cm = only(docs, "ConfigMap")
    text = cm["data"][file]
    changed, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert count == 1, f"{file}: {pattern!r} not found"
    cm["data"][file] = changed


def mutate_drop_readiness(docs):
    del container_named(docs, "sync-service")["readinessProbe"]


def mutate_pdb_replicas(docs):
    only(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] = ferry_sts(docs)["spec"]["replicas"]


def mutate_container_port(docs):
    port = next(p for p in container_named(docs, "sync-service")["ports"] if p["containerPort"] == 7400)
    port["containerPort"] = 7499


def mutate_remove_limits(docs):
    del container_named(docs, "recovery-service")["resources"]["limits"]


def mutate_run_as_root(docs):
    ferry_pod(docs)["securityContext"]["runAsNonRoot"] = False


def mutate_tls_off(docs):
    edit_config(docs, "sync-service.toml", r"^(\[tls\]\s*\n(?:[^\[\n].*\n|\n)*?)enabled = true", r"\1enabled = false")


def mutate_config_subpath(docs):
    mount = next(v for v in container_named(docs, "sync-service")["volumeMounts"] if v["name"] == "config")
    mount["mountPath"] = "/etc/ferry/config/sync-service.toml"
    mount["subPath"] = "sync-service.toml"


def mutate_readiness_wrong_service(docs):
    container_named(docs, "recovery-service")["readinessProbe"]["grpc"]["service"] = "ferry.v1.SyncService"


def mutate_health_port_in_config(docs):
    edit_config(docs, "recovery-service.toml", r'^health_listen = "0\.0\.0\.0:7411"', 'health_listen = "0.0.0.0:7419"')


def mutate_headless_not_published(docs):
    name = ferry_sts(docs)["spec"]["serviceName"]
    svc = next(d for d in docs if d.get("kind") == "Service" and meta(d)["name"] == name)
    svc["spec"]["publishNotReadyAddresses"] = False


def mutate_shared_claim(docs):
    mount = next(v for v in container_named(docs, "recovery-service")["volumeMounts"] if v["name"] == "recovery-data")
    mount["name"] = "sync-data"


def mutate_store_path(docs):
    edit_config(docs, "sync-service.toml", r'^path = "/var/lib/ferry/sync"', 'path = "/var/lib/ferry/data"')


def mutate_hashed_configmap(docs):
    cm = only(docs, "ConfigMap")
    cm["metadata"]["name"] = "ferry-config-7h8bf2m5kd"
    for v in ferry_pod(docs)["volumes"]:
        if "configMap" in v:
            v["configMap"]["name"] = "ferry-config-7h8bf2m5kd"


def tls_volume(docs):
    return next(v for v in ferry_pod(docs)["volumes"] if v["name"] == "tls")


def mutate_shared_tls_secret(docs):
    volume = tls_volume(docs)
    del volume["csi"]
    volume["secret"] = {"secretName": "ferry-tls", "defaultMode": 0o440}


def mutate_fixed_certificate_name(docs):
    attrs = tls_volume(docs)["csi"]["volumeAttributes"]
    attrs[CSI + "dns-names"] = attrs[CSI + "dns-names"].replace("${POD_NAME}.node.ferry", "ferry-0.node.ferry")


def mutate_node_keys_secret(docs):
    ferry_pod(docs)["volumes"].append({"name": "node-keys", "secret": {"secretName": "ferry-node-keys", "defaultMode": 0o440}})
    container_named(docs, "sync-service")["volumeMounts"].append({"name": "node-keys", "mountPath": "/etc/ferry/keys", "readOnly": True})


def mutate_drop_keygen(docs):
    del ferry_pod(docs)["initContainers"]


def mutate_ordered_ready(docs):
    ferry_sts(docs)["spec"]["podManagementPolicy"] = "OrderedReady"


def mutate_fixed_node_id(docs):
    env = next(e for e in container_named(docs, "recovery-service")["env"] if e["name"] == "FERRY_RECOVERY__NODE_ID")
    env["value"] = "node-0"


def mutate_drop_network_policy(docs):
    labels = pod_labels(ferry_sts(docs))
    docs[:] = [d for d in docs if not (d.get("kind") == "NetworkPolicy" and selector_matches(d["spec"]["podSelector"], labels))]


def mutate_unknown_field(docs):
    ferry_pod(docs)["terminationGracePeriod"] = 60  # not a PodSpec field


def mutate_loopback_listen(docs):
    edit_config(docs, "sync-service.toml", r'^listen = "0\.0\.0\.0:7400"', 'listen = "127.0.0.1:7400"')


MUTATIONS: list[tuple[str, str, Callable[[list[dict]], None]]] = [
    ("drop sync-service's readinessProbe", "probes", mutate_drop_readiness),
    ("PDB maxUnavailable = replicas", "pdb", mutate_pdb_replicas),
    ("containerPort 7400 -> 7499, config unchanged", "ports", mutate_container_port),
    ("remove recovery-service's limits", "resources", mutate_remove_limits),
    ("pod runAsNonRoot: false", "security-context", mutate_run_as_root),
    ("[tls] enabled = false in sync-service.toml", "tls", mutate_tls_off),
    ("config mounted with subPath", "config-volume", mutate_config_subpath),
    ("readiness asks for the other service", "readiness-service", mutate_readiness_wrong_service),
    ("health_listen moved in the config only", "probes", mutate_health_port_in_config),
    ("sync-service listens on loopback", "ports", mutate_loopback_listen),
    ("peer Service without publishNotReadyAddresses", "services", mutate_headless_not_published),
    ("recovery store on the sync-data claim", "storage", mutate_shared_claim),
    ("store.path moved in the config only", "storage", mutate_store_path),
    ("ConfigMap with a hash suffix", "config-volume", mutate_hashed_configmap),
    ("TLS from a Secret every pod mounts", "tls", mutate_shared_tls_secret),
    ("certificate names ferry-0 in every pod", "tls", mutate_fixed_certificate_name),
    ("node keys from a Secret every pod mounts", "identity", mutate_node_keys_secret),
    ("no init step makes the node key", "identity", mutate_drop_keygen),
    ("podManagementPolicy OrderedReady", "statefulset", mutate_ordered_ready),
    ("recovery-service node_id fixed", "consistency", mutate_fixed_node_id),
    ("Ferry NetworkPolicy removed", "network-policy", mutate_drop_network_policy),
    ("unknown PodSpec field terminationGracePeriod", "schema", mutate_unknown_field),
]


def self_test(overlays: list[str]) -> int:
    failures = []
    for overlay in overlays:
        try:
            docs = render(overlay)
        except RenderError as e:
            print(f"self-test {overlay}: FAIL\n  {e}")
            failures.append(f"{overlay}: does not render")
            continue
        baseline = {"schema": check_schemas(docs), **run_rules(docs)}
        broken = {k: v for k, v in baseline.items() if v}
        if broken:
            print(f"self-test {overlay}: the unmutated manifests fail {', '.join(broken)}:")
            for name, errors in broken.items():
                for error in errors:
                    print(f"    {name}: {error}")
            failures.append(f"{overlay}: unmutated manifests fail")
            continue
        print(f"self-test {overlay}: unmutated manifests pass the schema and all {len(RULES)} rules; mutations:")
        for description, expected, mutate in MUTATIONS:
            assert expected in RULES or expected == "schema", expected
            mutated = copy.deepcopy(docs)
            try:
                mutate(mutated)
            except (AssertionError, KeyError, StopIteration, IndexError) as e:
                print(f"  ERROR   {description}: could not apply ({type(e).__name__}: {e}); the manifests changed shape")
                failures.append(f"{overlay}: {description}: not applied")
                continue
            results = run_rules(mutated)
            if expected == "schema":
                results = {"schema": check_schemas(mutated), **results}
            fired = [name for name, errors in results.items() if errors]
            if results[expected]:
                others = [f for f in fired if f != expected]
                also = f" (also: {', '.join(others)})" if others else ""
                print(f"  caught  {description:<48} by {expected}{also}")
                print(f"            {results[expected][0]}")
            else:
                print(f"  MISSED  {description:<48} {expected} passed; fired: {', '.join(fired) or 'nothing'}")
                failures.append(f"{overlay}: {description} slipped past {expected}")
    if failures:
        print(f"self-test: FAIL ({len(failures)}):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print(f"self-test: {len(MUTATIONS)} mutations x {len(overlays)} overlays, each caught by its rule")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Render Ferry's kustomize overlays and check them offline.")
    parser.add_argument("--self-test", action="store_true", help="break rendered manifests on purpose and check each break is caught")
    parser.add_argument("overlays", nargs="*", default=list(OVERLAYS), help=f"overlays to check (default: {' '.join(OVERLAYS)})")
    args = parser.parse_args()
    unknown = [o for o in args.overlays if not (OVERLAYS_DIR / o / "kustomization.yaml").exists()]
    if unknown:
        parser.error(f"no overlay {', '.join(unknown)} under {OVERLAYS_DIR}")
    kubectl()
    return self_test(args.overlays) if args.self_test else validate_overlays(args.overlays)


if __name__ == "__main__":
    sys.exit(main())
