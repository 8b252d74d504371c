"""`deploy/` is checked, not just shipped: Prometheus config and alert rules with
promtool (including the alerts' unit tests), the dashboard and alerts against the
metrics that exist, compose and Kubernetes manifests against the CLI they run and the
drain they must outlast, the Dockerfiles for the rules they promise (multi-stage,
non-root, health-checked), and each alert's runbook against docs/operations.md.

Docker is not available here, so images are not built; everything that can be
checked without an engine is.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from llm_gateway.cli import build_parser
from shared.catalog import load_catalog
from shared.tokens import STREAM_TOKEN_MAX_BYTES
from tests.ops_processes import require_tool
from tests.test_ops_metrics import CP_METRICS, EDGE_METRICS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
KNOWN_METRICS = {n.removesuffix("_total") for n in {**EDGE_METRICS, **CP_METRICS}}
DRAIN_DEFAULT = 20.0
UVICORN_MARGIN = 10.0  # llm_gateway/cli.py: graceful shutdown = drain + 10 s
SERVICE_PORTS = {"control-plane": 8000, "stream-edge": 8001, "mock-llm": 8002}


def metric_names(expr: str) -> set[str]:
    """The llmgw_ families an expression reads (`_bucket`/`_count`/`_total` removed)."""
    names = set(re.findall(r"\bllmgw_[a-z_]+", expr))
    return {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in names}


def run(*args: str, cwd: Path = PROMETHEUS) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, timeout=60)
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, output
    return output


# --- Prometheus -----------------------------------------------------------------


def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = require_tool("promtool")
    assert "SUCCESS" in run(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS" in run(promtool, "check", "rules", "alerts.yml")


def test_alert_unit_tests_pass() -> None:
    """`promtool test rules`: each alert fires on its situation and not on a healthy one."""
    promtool = require_tool("promtool")
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts_test.yml")


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alerts_read_real_metrics_and_each_is_unit_tested() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "LLMGWOutboxBacklogGrowing",
        "LLMGWWebhookFailureRate",
        "LLMGWTimeToFirstTokenP95High",
        "LLMGWHoldsNotSettled",
    } <= names
    for rule in rules:
        assert metric_names(rule["expr"]) <= KNOWN_METRICS, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == names, f"alerts never shown firing: {names - tested}"


def test_every_alert_has_its_runbook_in_the_operations_guide() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", guide, re.MULTILINE)
    }
    for rule in alert_rules():
        runbook = rule["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert path == "docs/operations.md" and anchor in anchors, runbook


# --- Grafana --------------------------------------------------------------------


def test_the_dashboard_shows_every_metric_and_only_real_ones() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "llm-gateway.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    used: set[str] = set()
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names <= KNOWN_METRICS, (panel["title"], names - KNOWN_METRICS)
            used |= names
    assert used == KNOWN_METRICS, f"not on the dashboard: {KNOWN_METRICS - used}"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "llm-gateway.yaml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# --- compose --------------------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def assert_cli_accepts(args: list[str]) -> None:
    """The command an image, compose or Kubernetes runs is one the CLI knows."""
    try:
        build_parser().parse_args(args)
    except SystemExit:  # argparse's way of refusing
        pytest.fail(f"llm-gateway refuses {shlex.join(args)}")


def test_compose_runs_the_whole_stack() -> None:
    services = compose()["services"]
    assert {
        "postgres",
        "redis",
        "control-plane",
        "stream-edge",
        "mock-llm",
        "prometheus",
        "grafana",
    } <= set(services)
    for name in ("control-plane", "stream-edge", "mock-llm"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for name in ("migrate", "control-plane", "stream-edge"):
        assert_cli_accepts(services[name]["command"])
        env = services[name]["environment"]
        if name != "migrate":
            # `${…}` holds a message with slashes: a value in its place, as compose puts it.
            redis_url = urlsplit(re.sub(r"\$\{[^}]*\}", "pw", env["LLMGW_REDIS_URL"]))
            assert (redis_url.scheme, redis_url.hostname) == ("redis", "redis")
            assert redis_url.password, "compose's Redis asks for a password"
        if name != "stream-edge":
            assert env["LLMGW_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert services[name]["read_only"] is True
    # Migrations first; the edge waits for the control plane's keys.
    cp_deps = services["control-plane"]["depends_on"]
    assert cp_deps["migrate"]["condition"] == "service_completed_successfully"
    assert services["stream-edge"]["depends_on"]["control-plane"]["condition"] == "service_healthy"
    # The edge gets longer than its drain to stop.
    grace = float(services["stream-edge"]["stop_grace_period"].removesuffix("s"))
    drain = float(services["stream-edge"]["environment"]["LLMGW_DRAIN_SECONDS"])
    assert grace > drain + UVICORN_MARGIN
    # Every file compose mounts is in the repository.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    for job, service, port in (
        ("llmgw-control-plane", "control-plane", 8000),
        ("llmgw-stream-edge", "stream-edge", 8001),
    ):
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [service] and sd["port"] == port


# What only the control plane (or the database) may hold: an edge that is broken into
# must not hand over the database, the admin API or the ring that encrypts stored keys.
CONTROL_PLANE_ONLY = (
    "LLMGW_DATABASE_URL",
    "LLMGW_ADMIN_TOKEN",
    "LLMGW_ENCRYPTION_KEY",
    "POSTGRES_PASSWORD",
    "LLMGW_BACKEND_WEBHOOK_SECRETS",
)
PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY")


def assert_only_its_own(env: dict[str, Any], forbidden: tuple[str, ...]) -> None:
    for name in forbidden:
        assert name not in env, name
        # Nor smuggled inside another value (`${POSTGRES_PASSWORD}` in a URL).
        assert not any(name in str(value) for value in env.values()), name


def test_each_compose_service_gets_only_its_own_secrets() -> None:
    services = compose()["services"]
    edge = services["stream-edge"]["environment"]
    assert_only_its_own(edge, CONTROL_PLANE_ONLY)
    assert {"LLMGW_WEBHOOK_SECRET", "LLMGW_ROUTE_KEY", "LLMGW_REDIS_URL"} <= set(edge)
    cp = services["control-plane"]["environment"]
    assert_only_its_own(cp, (*PROVIDER_KEYS, "LLMGW_ROUTE_KEY"))
    migrate = services["migrate"]["environment"]
    needs_db = ("LLMGW_DATABASE_URL", "POSTGRES_PASSWORD")
    assert_only_its_own(
        migrate, tuple(n for n in CONTROL_PLANE_ONLY if n not in needs_db) + PROVIDER_KEYS
    )
    for name in ("mock-llm", "prometheus", "redis"):
        assert_only_its_own(services[name].get("environment", {}), CONTROL_PLANE_ONLY)


def test_gen_env_gives_the_edge_the_route_key_of_the_ring() -> None:
    from shared.route_claim import route_key

    out = run("bash", str(DEPLOY / "gen-env.sh"), cwd=ROOT)
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["LLMGW_ROUTE_KEY"] == route_key(env["LLMGW_ENCRYPTION_KEY"])
    # Every variable compose requires (`${VAR:?…}`) is one gen-env.sh prints.
    required = re.findall(r"\$\{([A-Z_]+):\?", (DEPLOY / "compose.yaml").read_text())
    assert "LLMGW_ROUTE_KEY" in required and set(required) <= set(env)


def test_the_compose_catalog_is_the_packaged_one_with_the_mock_reachable() -> None:
    packaged = yaml.safe_load((ROOT / "shared" / "models.yaml").read_text())
    composed = yaml.safe_load((DEPLOY / "compose" / "models.yaml").read_text())
    assert composed["providers"]["mock"]["base_url"] == "http://mock-llm:8002/v1"
    composed["providers"]["mock"]["base_url"] = packaged["providers"]["mock"]["base_url"]
    assert composed == packaged
    assert load_catalog(str(DEPLOY / "compose" / "models.yaml")).model("mock-fast") is not None


# --- Dockerfiles ----------------------------------------------------------------


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_dockerfiles_are_multi_stage_non_root_and_health_checked(service: str) -> None:
    text = (DEPLOY / "docker" / f"{service}.Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.MULTILINE)
    assert len(stages) >= 2, "multi-stage"
    final = text.split(f"AS {stages[-1]}")[1]
    assert "COPY --from=build" in final
    users = re.findall(r"^USER (\S+)$", final, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as non-root"
    port = SERVICE_PORTS[service]
    assert re.search(rf"^EXPOSE {port}$", final, re.MULTILINE)
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.+)$", final, re.MULTILINE)
    assert health and f"127.0.0.1:{port}/healthz" in health.group(1)
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.+)$", final, re.MULTILINE)[-1])
    command = json.loads(re.findall(r"^CMD (\[.+)$", final, re.MULTILINE)[-1])
    assert entrypoint == ["llm-gateway"] and command[0] == service
    assert command[command.index("--port") + 1] == str(port)
    assert_cli_accepts(command)
    ignore = DEPLOY / "docker" / f"{service}.Dockerfile.dockerignore"
    assert ".venv" in ignore.read_text().split()


# --- Kubernetes -----------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    for doc in manifests():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def test_every_manifest_is_well_formed_and_listed() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    for doc in manifests():
        assert {"apiVersion", "kind", "metadata"} <= set(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "llm-gateway", doc["metadata"]["name"]


@pytest.mark.parametrize("name", ["control-plane", "stream-edge"])
def test_deployments_have_probes_resources_and_run_locked_down(name: str) -> None:
    deployment = find("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["containers"]
    assert_cli_accepts(container["args"])
    port = SERVICE_PORTS[name]
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    service = find("Service", name)
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == port
    pdb = find("PodDisruptionBudget", name)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    template = deployment["spec"]["template"]["metadata"]["annotations"]
    assert template["prometheus.io/port"] == str(port)


def test_the_edge_outlasts_its_drain_and_scales_horizontally() -> None:
    deployment = find("Deployment", "stream-edge")
    pod = deployment["spec"]["template"]["spec"]
    config = find("ConfigMap", "llm-gateway")["data"]
    drain = float(config.get("LLMGW_DRAIN_SECONDS", DRAIN_DEFAULT))
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    # The kubelet's clock starts at preStop; the drain, uvicorn's margin and the
    # outbox flush (5 s) must all fit before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > sleep + drain + UVICORN_MARGIN + 5
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = find("HorizontalPodAutoscaler", "stream-edge")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "stream-edge",
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert find("PodDisruptionBudget", "stream-edge")["spec"]["maxUnavailable"] == 1


def test_the_kubernetes_catalog_loads_and_the_pods_mount_it(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(find("ConfigMap", "llm-gateway-models")["data"]["models.yaml"])
    catalog = load_catalog(str(models))
    assert catalog.model(catalog.default_model) is not None
    config = find("ConfigMap", "llm-gateway")["data"]
    assert config["LLMGW_MODELS_FILE"] == "/etc/llm-gateway/models.yaml"
    assert config["LLMGW_AUTO_MIGRATE"] == "0"
    job = find("Job", "llm-gateway-migrate")
    assert_cli_accepts(job["spec"]["template"]["spec"]["containers"][0]["args"])


def test_the_edge_secret_holds_only_the_edges_secrets() -> None:
    edge = find("Secret", "llm-gateway-stream-edge")["stringData"]
    assert_only_its_own(edge, CONTROL_PLANE_ONLY)
    assert {"LLMGW_WEBHOOK_SECRET", "LLMGW_ROUTE_KEY"} <= set(edge)
    cp = find("Secret", "llm-gateway-control-plane")["stringData"]
    assert_only_its_own(cp, (*PROVIDER_KEYS, "LLMGW_ROUTE_KEY"))


def test_the_ingress_does_not_buffer_event_streams() -> None:
    annotations = find("Ingress", "stream-edge")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 15


def ingress_routes(path: str) -> bool:
    """Whether any Ingress rule sends `path` to a service, by the Kubernetes matching
    rules (Prefix: whole path elements; ImplementationSpecific taken as a plain prefix,
    the loosest reading)."""
    for ingress in (d for d in manifests() if d["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for route in rule["http"]["paths"]:
                wanted, kind = route["path"], route["pathType"]
                if kind == "Exact" and path == wanted:
                    return True
                if kind == "Prefix":
                    elements = [e for e in wanted.split("/") if e]
                    if [e for e in path.split("/") if e][: len(elements)] == elements:
                        return True
                if kind == "ImplementationSpecific" and path.startswith(wanted):
                    return True
    return False


def test_the_ingress_controller_takes_the_largest_stream_token() -> None:
    """The controller's header buffers hold a request line or header of the largest
    stream token, as deploy/nginx/edge.conf's do (`test_ops_nginx` runs that one)."""
    config = yaml.safe_load((K8S / "ingress-nginx" / "controller-config.yaml").read_text())
    count, size = config["data"]["large-client-header-buffers"].split()
    assert int(count) >= 2 and int(size.removesuffix("k")) * 1024 > STREAM_TOKEN_MAX_BYTES + 4096
    edge_conf = (DEPLOY / "nginx" / "edge.conf").read_text()
    assert f"large_client_header_buffers {count} {size};" in edge_conf
    # Held no longer than the edge's own header timeout (default 10 s).
    assert "client_header_timeout 10s;" in edge_conf
    assert config["data"]["client-header-timeout"] == "10"


def test_the_ingress_does_not_publish_metrics() -> None:
    """Prometheus scrapes the pods (the PodMonitor); the public reaches only the API."""
    for public in ("/v1/chat/completions", "/v1/stream", "/v1/models"):
        assert ingress_routes(public), public
    for private in ("/metrics", "/metrics/", "/readyz", "/"):
        assert not ingress_routes(private), private
    (endpoint,) = find("PodMonitor", "llm-gateway")["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}


def test_compose_publishes_no_metrics_beyond_the_host() -> None:
    """Each service serves /metrics on its API port, and Prometheus shows the same
    without a login: published on loopback only. So is Grafana, which shows it behind
    a password its login form takes over plain HTTP. The public way in is the proxy,
    whose config refuses /metrics (tested in test_ops_nginx.py)."""
    services = compose()["services"]
    assert {"control-plane", "stream-edge", "prometheus", "grafana"} <= {
        name for name, service in services.items() if service.get("ports")
    }
    for name, service in services.items():
        if name == "nginx":
            continue
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), (name, published)
    nginx = services["nginx"]
    assert "./nginx/edge.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert re.search(
        r"location = /metrics \{\s*return 404;", (DEPLOY / "nginx" / "edge.conf").read_text()
    )


# nginx variables that carry the query string (`$request` is the whole request line).
QUERY_VARIABLES = re.compile(r"\$(request(?![_a-z])|request_uri|args|query_string|arg_\w+|is_args)")


def test_no_proxy_logs_the_stream_token() -> None:
    """The EventSource path carries the token in `?token=` (11.17): every access-log
    format we ship logs the path without its query string."""
    ingress = find("Ingress", "stream-edge")["metadata"]["annotations"]
    config = yaml.safe_load((K8S / "ingress-nginx" / "controller-config.yaml").read_text())
    controller_format = config["data"]["log-format-upstream"]
    # The Ingress logs only once the controller has our format; until then, not at all.
    assert ingress["nginx.ingress.kubernetes.io/enable-access-log"] == "false"
    edge_conf = (DEPLOY / "nginx" / "edge.conf").read_text()
    (nginx_format,) = re.findall(r"log_format\s+llmgw_edge\s+(.*?);", edge_conf, re.S)
    assert re.search(r"access_log\s+\S+\s+llmgw_edge;", edge_conf)
    for fmt in (controller_format, nginx_format):
        assert "$uri" in fmt and "$status" in fmt
        assert not QUERY_VARIABLES.search(fmt), fmt
    json.loads(re.sub(r"\$\w+", "0", controller_format))  # escape-json format is a JSON object
    # The checker itself catches ingress-nginx's default format.
    default = '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent'
    assert QUERY_VARIABLES.search(default)


# --- The edge's spool -----------------------------------------------------------


def edge_workdir() -> str:
    text = (DEPLOY / "docker" / "stream-edge.Dockerfile").read_text()
    return re.findall(r"^WORKDIR (\S+)$", text, re.MULTILINE)[-1]


def edge_spool_path(env: dict[str, Any]) -> str:
    """Where the edge image writes its spool under `env` (a relative path is taken
    from the image's working directory)."""
    spool = str(env.get("LLMGW_SPOOL_DIR") or "var/spool")
    return spool if spool.startswith("/") else f"{edge_workdir()}/{spool}"


def under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def test_the_edge_spool_is_on_a_writable_volume_in_compose_and_kubernetes() -> None:
    """The spool keeps the usage reports of streams that end while Redis is down.
    Both shipped deployments run the edge on a read-only root file system: a spool
    left there cannot be written, and those streams go unbilled."""
    edge = compose()["services"]["stream-edge"]
    assert edge["read_only"] is True
    path = edge_spool_path(edge["environment"])
    named = compose()["volumes"]
    mounts = [v.split(":") for v in edge.get("volumes", [])]
    # A named volume: the root is read-only, and /tmp (tmpfs) dies with the container.
    assert any(
        source in named and under(path, target) and "ro" not in rest
        for source, target, *rest in mounts
    ), f"compose: the edge's spool {path} is on its read-only root"
    # The image creates the directory as its user, so a new named volume (which copies
    # the image's directory) is writable by uid 10001, not root-owned.
    dockerfile = (DEPLOY / "docker" / "stream-edge.Dockerfile").read_text()
    assert re.search(rf"install -d -o llmgw -g llmgw .*{re.escape(path)}\b", dockerfile)

    deployment = find("Deployment", "stream-edge")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = find("ConfigMap", "llm-gateway")["data"]
    own = {e["name"]: e.get("value") for e in container.get("env", [])}
    path = edge_spool_path({**config, **own})
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [
        m
        for m in container["volumeMounts"]
        if under(path, m["mountPath"])
        and not m.get("readOnly")
        # A memory-backed volume counts against the pod's memory limit; the spool
        # grows for as long as Redis is down.
        and volumes[m["name"]].get("emptyDir", {}).get("medium") != "Memory"
    ]
    assert writable, f"kubernetes: the edge's spool {path} is on its read-only root"


def test_an_edge_that_cannot_write_its_spool_refuses_to_start(tmp_path: Path) -> None:
    """A careless deployment (a read-only root, a mistyped path) is told at start,
    not during the next Redis outage, when the reports it cannot keep are lost."""
    from cryptography.fernet import Fernet

    from shared.route_claim import route_key
    from tests.conftest import REDIS_URL, new_webhook_secret
    from tests.harness import free_port
    from tests.ops_processes import CLI

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # even root cannot make a directory under a file
    env = {
        "PATH": "/usr/bin:/bin",
        "LLMGW_WEBHOOK_SECRET": new_webhook_secret(),
        "LLMGW_ROUTE_KEY": route_key(Fernet.generate_key().decode()),
        "LLMGW_REDIS_URL": REDIS_URL,
        "LLMGW_SPOOL_DIR": str(blocker / "spool"),
    }
    process = subprocess.Popen(
        [*CLI, "stream-edge", "--port", str(free_port())],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the edge started with a spool it cannot write")
    assert process.returncode == 2
    (line,) = stderr.decode().strip().splitlines()
    assert line.startswith("llm-gateway: configuration error: LLMGW_SPOOL_DIR")
