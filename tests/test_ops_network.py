"""Who else can reach the gateway's stores and services in the shipped deployments:
a neighbour container on the compose host, another pod of the cluster.

The compose file is read as compose reads it (`${VAR}` from the deploy/.env that
deploy/gen-env.sh prints, `$$` for a literal `$`) and its Redis is started as a real
redis-server with the shipped command and health check; the Kubernetes
NetworkPolicies are evaluated by the API's rules (`allowed`, below).
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from tests.harness import free_port
from tests.ops_processes import ROOT, require_tool
from tests.polling import wait_until

DEPLOY = ROOT / "deploy"

# --- compose ---------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def generated_env() -> dict[str, str]:
    """A fresh deploy/.env, as the quick start makes it."""
    printed = subprocess.run(
        ["bash", str(DEPLOY / "gen-env.sh")], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)


INTERPOLATION = re.compile(r"\$\$|\$\{([A-Z_][A-Z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def interpolate(raw: object, dotenv: dict[str, str]) -> str:
    """`raw` as compose passes it to the container when deploy/.env holds `dotenv`."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group(1), match.group(2), match.group(3)
        if dotenv.get(name):
            return dotenv[name]
        if op == ":?":
            raise AssertionError(f"compose refuses to start: {name} unset ({default})")
        return default if op == ":-" else ""

    return INTERPOLATION.sub(value, str(raw))


def service_env(service: dict[str, Any], dotenv: dict[str, str]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {name: interpolate(raw, dotenv) for name, raw in environment.items()}


def on_local_port(url: str, port: int) -> str:
    """`url` (a compose service name as its host) aimed at 127.0.0.1:`port`, its user
    and password kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return parts._replace(netloc=netloc).geturl()


@contextlib.contextmanager
def shipped_redis(tmp_path: Path, dotenv: dict[str, str]) -> Iterator[int]:
    """A real redis-server started with compose's command for it (on a free port of
    loopback, its files in `tmp_path`); yields the port."""
    service = compose()["services"]["redis"]
    command = [interpolate(arg, dotenv) for arg in service["command"]]
    assert command[0] == "redis-server", command
    port = free_port()
    process = subprocess.Popen(
        [require_tool("redis-server"), *command[1:],
         "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def listening() -> bool:
            assert process.poll() is None, "redis-server refused the shipped command"
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, "redis-server did not start", within=10)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def gateway_redis(dotenv: dict[str, str], port: int, service: str) -> redis.Redis:
    """A client with the Redis URL compose gives `service`, aimed at `port`."""
    url = service_env(compose()["services"][service], dotenv)["LLMGW_REDIS_URL"]
    return redis.Redis.from_url(on_local_port(url, port), socket_timeout=5)


def test_the_compose_redis_answers_only_clients_with_its_password(tmp_path: Path) -> None:
    """Redis holds the single-use marks, revocations, stream slots, the outbox of
    unbilled usage and (with transcripts on) the stashed prompts. Started as compose
    starts it, a client without the password is refused; the control plane and the
    edge, with the URLs compose gives them, get in; the health check still passes."""
    dotenv = generated_env()
    service = compose()["services"]["redis"]
    with shipped_redis(tmp_path, dotenv) as port:
        # A neighbour container on the same network: no password.
        neighbour = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            with pytest.raises(redis.AuthenticationError):
                neighbour.set("llmgw:revoked:parent-of-everything", "1")
            with pytest.raises(redis.AuthenticationError):
                neighbour.keys("llmgw:*")
        finally:
            neighbour.close()
        for name in ("control-plane", "stream-edge"):
            gateway = gateway_redis(dotenv, port, name)
            try:
                assert gateway.set(f"llmgw:probe:{name}", "1"), name
            finally:
                gateway.close()
        health = service["healthcheck"]["test"]
        assert health[:2] == ["CMD", "redis-cli"], health
        checked = subprocess.run(
            [require_tool("redis-cli"), "-p", str(port), *health[2:]],
            env={"PATH": "/usr/bin:/bin", **service_env(service, dotenv)},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert checked.stdout.strip() == "PONG", checked.stdout + checked.stderr


def test_the_compose_redis_is_bounded_and_never_evicts(tmp_path: Path) -> None:
    """A tenant's unstarted inits alone may stash 2,000 requests of up to 2 MiB each
    for their tokens' life (LLMGW_MAX_PENDING_INITS_PER_COMPANY,
    LLMGW_MAX_REQUEST_BYTES): 4 GiB per company. An unbounded Redis grows into the
    host's memory, where the kernel's OOM killer picks a victim (PostgreSQL and its
    ledger share the host); operations.md asks for a `maxmemory` with `noeviction`
    (a full Redis refuses writes: inits and streams answer 503, no used mark or outbox
    report is dropped). Compose's Redis, as started, has both."""
    dotenv = generated_env()
    with shipped_redis(tmp_path, dotenv) as port:
        gateway = gateway_redis(dotenv, port, "control-plane")
        try:
            maxmemory = int(gateway.config_get("maxmemory")["maxmemory"])
            policy = gateway.config_get("maxmemory-policy")["maxmemory-policy"]
        finally:
            gateway.close()
    assert maxmemory > 0, "compose's Redis grows until the host runs out of memory"
    assert policy == "noeviction", policy


def networks_of(service: dict[str, Any]) -> set[str]:
    """The compose networks a service joins (none named: the project's `default`)."""
    return set(service.get("networks") or ["default"])


# Who must reach whom for the stack to work at all.
NEEDED = {
    ("migrate", "postgres"),
    ("control-plane", "postgres"),
    ("control-plane", "redis"),
    ("stream-edge", "redis"),
    ("stream-edge", "control-plane"),
    ("stream-edge", "mock-llm"),
    ("prometheus", "control-plane"),
    ("prometheus", "stream-edge"),
    ("grafana", "prometheus"),
    ("nginx", "stream-edge"),
}
DATA_CLIENTS = {"migrate", "control-plane", "stream-edge"}


def test_compose_keeps_postgres_and_redis_on_a_network_of_their_own() -> None:
    """Grafana and nginx are published to every address, mock-llm stands for a vendor:
    none of them has any business with PostgreSQL or Redis, so a flaw in one of
    them must not put the ledger or the hot state one hop away."""
    doc = compose()
    services = doc["services"]
    networks = doc.get("networks") or {}

    def reaches(a: str, b: str) -> bool:
        return bool(networks_of(services[a]) & networks_of(services[b]))

    for a, b in sorted(NEEDED):
        assert reaches(a, b), f"{a} cannot reach {b}"
    for store in ("postgres", "redis"):
        neighbours = {name for name in services if name != store and reaches(name, store)}
        assert neighbours <= DATA_CLIENTS | {"postgres", "redis"}, (store, neighbours)
        # Nor do the stores reach anywhere else (an internal network has no way out).
        for network in networks_of(services[store]):
            assert (networks.get(network) or {}).get("internal") is True, (store, network)


# --- Kubernetes ------------------------------------------------------------------

K8S = DEPLOY / "k8s"
NAMESPACE = "llm-gateway"


@functools.cache
def k8s_docs() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s` applies: the kustomization's resources."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return docs


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) against `labels`; `{}` selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def pod_of(name: str) -> tuple[dict[str, str], dict[str, int]]:
    """A Deployment's pod labels and its container ports by name."""
    for doc in k8s_docs():
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == name:
            template = doc["spec"]["template"]
            ports = {
                p["name"]: p["containerPort"]
                for c in template["spec"]["containers"]
                for p in c.get("ports", [])
            }
            return template["metadata"]["labels"], ports
    raise AssertionError(f"no Deployment {name}")


def allowed(source_namespace: str, source_labels: dict[str, str], target: str, port: int) -> bool:
    """Whether a pod (`source_labels` in `source_namespace`) may open a TCP connection to
    `target`'s pods on `port`, by the NetworkPolicy API's rules: a pod no Ingress policy
    selects takes everything; one that some select takes what any of their rules
    allows. An ipBlock is taken to match every pod (the loosest reading)."""
    labels, named_ports = pod_of(target)
    policies = [
        doc
        for doc in k8s_docs()
        if doc["kind"] == "NetworkPolicy"
        and doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE
        and "Ingress" in doc["spec"].get("policyTypes", ["Ingress"])
        and selects(doc["spec"].get("podSelector"), labels)
    ]
    if not policies:
        return True
    namespace_labels = {"kubernetes.io/metadata.name": source_namespace}

    def peer_matches(peer: dict[str, Any]) -> bool:
        if "ipBlock" in peer:
            return True
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], namespace_labels):
                return False
        elif source_namespace != NAMESPACE:
            return False  # a podSelector alone means the policy's own namespace
        return selects(peer.get("podSelector"), source_labels)

    def port_matches(rule_port: dict[str, Any]) -> bool:
        if rule_port.get("protocol", "TCP") != "TCP":
            return False
        wanted = rule_port.get("port")
        if wanted is None:
            return True
        return (named_ports.get(wanted) if isinstance(wanted, str) else wanted) == port

    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            peers, ports = rule.get("from") or [], rule.get("ports") or []
            if (not peers or any(map(peer_matches, peers))) and (
                not ports or any(map(port_matches, ports))
            ):
                return True
    return False


CP, EDGE = 8000, 8001
EDGE_POD = pod_of("stream-edge")[0]
# Where the shipped Ingress's controller runs (deploy/k8s/ingress-nginx/) and, as
# deploy/k8s/networkpolicy.yaml assumes, Prometheus.
CONTROLLER = ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})


def test_other_pods_of_the_cluster_cannot_reach_the_gateways_pods() -> None:
    """Without a NetworkPolicy any pod of the cluster (another team's, a compromised
    one) reached both services directly, around the Ingress that routes only `/v1/…`:
    `/metrics` (revenue, volume, upstream errors), the control plane's login (where,
    with `FORWARDED_ALLOW_IPS` set to the pod network as config.yaml suggests, it sent
    its own X-Forwarded-For and picked its address for the login limit) and its
    internal and webhook routes. Only the ingress controller, Prometheus and, for the
    control plane, the edge get in."""
    outsiders = [
        ("default", {"app": "anything"}),
        ("kube-system", {"k8s-app": "kube-dns"}),
        (NAMESPACE, {"run": "debug"}),  # `kubectl run` in the gateway's own namespace
        ("other-team", EDGE_POD),  # a pod wearing the edge's labels elsewhere
    ]
    for namespace, labels in outsiders:
        assert not allowed(namespace, labels, "control-plane", CP), (namespace, labels)
        assert not allowed(namespace, labels, "stream-edge", EDGE), (namespace, labels)
    assert allowed(NAMESPACE, EDGE_POD, "control-plane", CP)  # keys, JWKS, usage webhooks
    for namespace, labels in (CONTROLLER, PROMETHEUS):
        assert allowed(namespace, labels, "stream-edge", EDGE), namespace
        # The control plane's public API goes through the operator's own Ingress.
        assert allowed(namespace, labels, "control-plane", CP), namespace
    # The edge serves nothing to the control plane, nor to another edge.
    assert not allowed(NAMESPACE, pod_of("control-plane")[0], "stream-edge", EDGE)


def test_no_gateway_pod_carries_a_kubernetes_api_token() -> None:
    """Nothing in the gateway talks to the Kubernetes API, yet each pod had the
    namespace's default service account token mounted (the default): an edge broken
    into from the internet handed its attacker a credential for the API server, worth
    whatever RBAC the cluster grants that account (CIS Kubernetes 5.1.6)."""
    pods = [
        (doc["kind"], doc["metadata"]["name"], doc["spec"]["template"]["spec"])
        for doc in k8s_docs()
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    ]
    assert {name for _, name, _ in pods} >= {"control-plane", "stream-edge", "llm-gateway-migrate"}
    for kind, name, spec in pods:
        assert spec.get("automountServiceAccountToken") is False, (kind, name)
