"""The deployment files agree with the code: ports, probe paths, settings, metric names, CLI commands.

Everything here runs without Docker or Kubernetes. Checks that need an external tool (promtool,
kubectl, the docker compose plugin) skip with the reason when the tool is absent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service import metrics
from service.app.cli import build_parser
from service.app.config import MetricsSettings, ServingSettings, Settings, load_settings
from service.serving.ops_http import HEALTH_PATH, READY_PATH, HealthReport, start_http_server

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRPC_PORT = ServingSettings.model_validate({}).grpc_port
HTTP_PORT = ServingSettings.model_validate({}).http_port
METRICS_PORT = MetricsSettings.model_validate({}).port
EXPECTED_ALERTS = {"EddyConsumerLagGrowing", "EddyNoRecentSwap", "EddyAccuracyDrop", "EddyDeadLetterRate",
                   "EddySnapshotTooOld", "EddyBrokerUnreachable", "EddyDown"}
METRIC_RE = re.compile(r"\beddy_[a-z0-9_]+")
POD_LABELS = {"app.kubernetes.io/name": "eddy", "app.kubernetes.io/component": "daemon"}


# -- helpers -----------------------------------------------------------------------------------------
def _metric_names() -> set[str]:
    """Every series name eddy can export (family names plus their sample suffixes)."""
    names = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + s for s in ("_total", "_bucket", "_sum", "_count", "_info", "_created"))
    return names


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend((path, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _k8s_docs()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _k8s("StatefulSet")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "eddy")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [r for g in groups if g["name"] == "eddy" for r in g["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "eddy-dashboard.json").read_text())


def _assert_setting_env(name: str) -> None:
    """``EDDY_<SECTION>__<KEY>`` must name a real setting (a typo would be silently ignored... or fatal)."""
    if name in ("EDDY_CONFIG", "EDDY_LOG_LEVEL", "EDDY_TOKEN"):
        return
    m = re.fullmatch(r"EDDY_([A-Z]+)__([A-Z_]+)", name)
    assert m, f"{name}: not of the form EDDY_<SECTION>__<KEY>"
    section, key = m.group(1).lower(), m.group(2).lower()
    assert section in Settings.model_fields, f"{name}: no settings section {section!r}"
    model = Settings.model_fields[section].annotation
    assert key in model.model_fields, f"{name}: section {section!r} has no key {key!r}"  # type: ignore[union-attr]


def _assert_cli(argv: list[str]) -> None:
    """The ``eddy`` subcommand line parses with the real CLI parser."""
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`eddy {' '.join(argv)}` is not a valid eddy command line")


# -- YAML --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# -- Kubernetes --------------------------------------------------------------------------------------
def test_k8s_manifests_are_named_and_namespace_less() -> None:
    docs = _k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert kinds >= {"StatefulSet", "Service", "ConfigMap", "ServiceMonitor", "PodDisruptionBudget"}
    for path, d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), path
        assert "namespace" not in d["metadata"], f"{path}: manifests must be namespace-less"


def test_statefulset_ports_and_probes_match_the_code() -> None:
    sts = _k8s("StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == _k8s("Service", "eddy-headless")["metadata"]["name"]
    c = _container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT}
    assert c["livenessProbe"]["httpGet"]["path"] == HEALTH_PATH
    assert c["readinessProbe"]["httpGet"]["path"] == READY_PATH
    assert c["startupProbe"]["httpGet"]["path"] == HEALTH_PATH
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert ports.get(port, port) == METRICS_PORT
    _assert_cli(c["args"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    for name in env:
        if name.startswith("EDDY_"):
            _assert_setting_env(name)
    # Bind addresses must be reachable from outside the pod.
    assert env["EDDY_SERVING__HOST"] == "0.0.0.0" and env["EDDY_METRICS__HOST"] == "0.0.0.0"


def test_statefulset_runs_non_root_read_only_with_state_on_the_volume() -> None:
    spec = _k8s("StatefulSet")["spec"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    c = _container()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    assert mounts["/var/lib/eddy"] in claims
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/eddy"]]["configMap"]["name"] == _k8s("ConfigMap")["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    for key in ("EDDY_CHECKPOINT__DIR", "EDDY_EXPORT__REGISTRY_DIR"):
        assert env[key].startswith("/var/lib/eddy/"), f"{key} must live on the volume"
    res = c["resources"]
    assert res["requests"]["cpu"] and res["limits"]["memory"]


def test_services_monitor_and_pdb_select_the_eddy_pods() -> None:
    pod_labels = _k8s("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels.items() >= POD_LABELS.items()
    container_ports = {p["name"] for p in _container()["ports"]}
    for name in ("eddy", "eddy-headless"):
        svc = _k8s("Service", name)
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
        assert {p["port"] for p in svc["spec"]["ports"]} == {GRPC_PORT, HTTP_PORT, METRICS_PORT}
    assert _k8s("Service", "eddy-headless")["spec"]["clusterIP"] == "None"
    monitor = _k8s("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    eddy_svc = _k8s("Service", "eddy")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= eddy_svc["metadata"]["labels"].items()
    svc_port_names = {p["name"] for p in eddy_svc["spec"]["ports"]}
    assert all(e["port"] in svc_port_names and e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    pdb = _k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_configmap_holds_a_valid_eddy_configuration(tmp_path: Path) -> None:
    text = _k8s("ConfigMap")["data"]["config.toml"]
    tomllib.loads(text)
    path = tmp_path / "config.toml"
    path.write_text(text)
    s = load_settings(path)  # raises ConfigError on any unknown key or bad value
    assert s.serving.grpc_port == GRPC_PORT and s.serving.http_port == HTTP_PORT and s.metrics.port == METRICS_PORT


def test_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(k["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_k8s_manifests_validate_strictly_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate as kv  # a dev dependency: ships the schemas, validates offline

    validated = []
    for path, doc in _k8s_docs():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in the Kubernetes bundle
        try:
            kv.validate(doc, "1.28.0", strict=True)  # the oldest version with GA gRPC probes is 1.27
        except Exception as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc}")
        validated.append(doc["kind"])
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(validated), validated


def test_the_schema_check_rejects_a_broken_manifest() -> None:
    import kubernetes_validate as kv

    _, deployment = next((p, d) for p, d in _k8s_docs() if d["kind"] == "StatefulSet")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"] = "8000"  # a list is required
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.28.0", strict=True)


def test_kubectl_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(kinds) == sorted(d["kind"] for _, d in _k8s_docs())


# -- docker compose ----------------------------------------------------------------------------------
def test_compose_stack_wires_kafka_eddy_producer_prometheus_grafana() -> None:
    c = _compose()
    services = c["services"]
    assert set(services) >= {"kafka", "eddy", "producer", "prometheus", "grafana"}
    eddy = services["eddy"]
    assert f"{GRPC_PORT}:{GRPC_PORT}" in eddy["ports"] and f"{METRICS_PORT}:{METRICS_PORT}" in eddy["ports"]
    assert f"{HTTP_PORT}:{HTTP_PORT}" in eddy["ports"]
    assert eddy["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["producer"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert (DEPLOY / eddy["build"]["context"] / eddy["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    assert any(v.endswith(":/var/lib/eddy") for v in eddy["volumes"])
    assert eddy["environment"]["EDDY_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert "healthcheck" in services["kafka"] and "healthcheck" in eddy
    for name, svc in services.items():
        for key in svc.get("environment", {}):
            if key.startswith("EDDY_"):
                _assert_setting_env(key)
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag, got {image!r}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: mounts missing {source}"
    assert set(c["volumes"]) >= {"eddy-data"}


def test_compose_commands_are_valid_eddy_command_lines() -> None:
    services = _compose()["services"]
    _assert_cli(services["eddy"]["command"])
    script = services["producer"]["command"][0]
    steps = [shlex.split(step) for step in script.split("&&")]
    assert [s[:2] for s in steps] == [["eddy", "demo-data"], ["eddy", "produce"]]
    for step in steps:
        _assert_cli(step[1:])


def test_docker_compose_config_validates() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    out = subprocess.run([docker, "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- Prometheus ----------------------------------------------------------------------------------------
def test_prometheus_scrapes_the_compose_eddy_service_and_loads_the_alerts() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "eddy")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"eddy:{METRICS_PORT}"]
    assert "eddy" in _compose()["services"]
    assert job.get("scrape_interval", cfg["global"]["scrape_interval"]) == "5s"
    for rule_file in cfg["rule_files"]:
        assert (PROM / rule_file).is_file()


def test_alert_rules_cover_the_operational_failures() -> None:
    rules = _alert_rules()
    names = {r["alert"] for r in rules}
    assert names == EXPECTED_ALERTS
    known = _metric_names()
    readme = (DEPLOY / "README.md").read_text()
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["alert"]
        assert f"#{r['alert'].lower()}" in r["annotations"]["runbook"]
        assert f"### {r['alert']}" in readme, f"deploy/README.md lacks a runbook section for {r['alert']}"
        unknown = set(METRIC_RE.findall(r["expr"])) - known
        assert not unknown, f"{r['alert']}: unknown metrics {unknown}"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert firing == EXPECTED_ALERTS and quiet == EXPECTED_ALERTS


@pytest.mark.parametrize("args", [
    ["check", "config", "prometheus.yml"],
    ["check", "rules", "alerts.yml"],
    ["test", "rules", "alerts_test.yml"],
], ids=lambda a: " ".join(a[:2]))
def test_promtool(args: list[str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; run `make tools`)")
    out = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# -- Grafana -----------------------------------------------------------------------------------------
def _panels() -> Iterator[dict[str, Any]]:
    for p in _dashboard()["panels"]:
        yield p
        yield from p.get("panels", [])


def test_dashboard_panels_query_only_metrics_eddy_exports() -> None:
    d = _dashboard()
    assert d["uid"] == "eddy" and d["schemaVersion"] >= 36
    assert "DS_PROMETHEUS" in {v["name"] for v in d["templating"]["list"]}
    known = _metric_names()
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels():
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            names = set(METRIC_RE.findall(t["expr"]))
            assert names, f"panel {p['title']!r}: {t['expr']!r} queries no eddy metric"
            assert names <= known, f"panel {p['title']!r}: unknown metrics {names - known}"
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_shows_every_operational_metric_and_readme_describes_every_panel() -> None:
    queried = {m for p in _panels() for t in p.get("targets", []) for m in METRIC_RE.findall(t["expr"])}
    families = {f.name for f in metrics.REGISTRY.collect()}
    not_on_dashboard = {"eddy_build", "eddy_forget_unknown_ids"}  # identity and a rare admin counter
    for family in families - not_on_dashboard:
        shown = any(q == family or q.startswith(family + "_") for q in queried)
        assert shown, f"{family} is not on the dashboard"
    readme = (DEPLOY / "README.md").read_text()
    for p in _panels():
        if p["type"] != "row":
            assert f"| {p['title']} |" in readme, f"deploy/README.md does not describe panel {p['title']!r}"


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["isDefault"]
    provider = yaml.safe_load((prov / "dashboards" / "eddy.yml").read_text())["providers"][0]
    grafana = _compose()["services"]["grafana"]
    dashboard_mount = next(v for v in grafana["volumes"] if "eddy-dashboard.json" in v)
    assert dashboard_mount.split(":")[1].startswith(provider["options"]["path"] + "/")


# -- Dockerfile ----------------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comments and heredoc bodies skipped."""
    out: list[tuple[str, str]] = []
    lines = iter((REPO / "Dockerfile").read_text().splitlines())
    pending = ""
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if line.endswith("\\"):
            continue
        keyword, _, args = pending.partition(" ")
        heredoc = re.search(r"<<-?'?(\w+)'?", args)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    instr = _dockerfile()
    global_args = {}
    for kw, args in instr:
        if kw == "FROM":
            break
        if kw == "ARG" and "=" in args:
            k, v = args.split("=", 1)
            global_args[k] = v
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], a.split()[0])
             for k, a in instr if k == "FROM"]
    assert len(froms) >= 2
    for image in froms:
        assert ":" in image and not image.endswith(":latest"), f"pin base images, got {image}"
    final = instr[max(i for i, (k, _) in enumerate(instr) if k == "FROM"):]
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(k == "HEALTHCHECK" and HEALTH_PATH in a for k, a in final)
    exposed = {int(p) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert exposed == {GRPC_PORT, HTTP_PORT, METRICS_PORT}
    assert ("ENTRYPOINT", '["eddy"]') in final and ("CMD", '["serve"]') in final


def test_dockerfile_environment_and_commands_match_the_code() -> None:
    instr = _dockerfile()
    env_text = " ".join(a for k, a in instr if k == "ENV")
    env = dict(re.findall(r"(\w+)=(\S+)", env_text))
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["EDDY_BACKBONE__CACHE_DIR"] == "/opt/eddy/cache"
    assert env["EDDY_CHECKPOINT__DIR"].startswith("/var/lib/eddy/")
    assert env["EDDY_EXPORT__REGISTRY_DIR"].startswith("/var/lib/eddy/")
    for name in env:
        if name.startswith("EDDY_"):
            _assert_setting_env(name)
    runs = " ".join(a for k, a in instr if k == "RUN")
    warmup = re.search(r"eddy (warmup [^;&]*)", runs)
    assert warmup, "the image must pre-export the backbone"
    _assert_cli(warmup.group(1).split())
    assert any(k == "ARG" and a.startswith("DEVICE=") for k, a in instr)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "gpu" in pyproject["project"]["optional-dependencies"]


def test_dockerfile_copies_only_sources_that_exist_and_are_not_ignored() -> None:
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".eddy", ".git", "tests"} <= ignored
    for kw, args in _dockerfile():
        if kw != "COPY" or "--from=" in args:
            continue
        for source in args.split()[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: missing"
            assert source not in ignored, f"COPY {source}: excluded by .dockerignore"


def test_dockerfile_healthcheck_command_follows_healthz(tmp_path: Path) -> None:
    cmd = next(a for k, a in _dockerfile() if k == "HEALTHCHECK")
    argv = json.loads(cmd[cmd.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    argv[0] = sys.executable
    for live, expected in ((True, 0), (False, 1)):
        server, port = start_http_server(
            "127.0.0.1", 0, health=lambda live=live: HealthReport(live=live, ready=False))  # type: ignore[misc]
        try:
            env = {**os.environ, "EDDY_METRICS__PORT": str(port)}
            rc = subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode
        finally:
            server.stop()
        assert rc == expected
