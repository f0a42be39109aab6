"""The deployment files, checked by the real tools that install here: hadolint (Dockerfile), the compose
spec's JSON schema (compose files, after interpolation with the example secrets), promtool (compose's
Prometheus configuration, and every query of the Grafana dashboard), kustomize (`kubectl kustomize`) and
Kubernetes' own schemas (manifests). No Docker engine, cluster or Grafana runs
here: what they alone would catch is not caught (README, Deployment)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"]
SECRETS_EXAMPLE = DEPLOY / "compose" / "secrets.env.example"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "rlhf-dashboard.json"
KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]  # the oldest and newest this file is checked against
VENV_BIN = Path(sys.executable).parent

# Variables the deployment files set ahead of the settings that will read them. The test fails once one is
# read, so that it leaves this list.
NOT_READ_YET: set[str] = set()
# Read by others than the settings: boto3 (AWS_*) and the image's health check.
READ_ELSEWHERE = re.compile(r"AWS_[A-Z_]+|HEALTHCHECK_URL")

# Metrics of the dashboard that come from outside the project: vLLM's engine (checked in vLLM's source
# below) and the Kafka lag exporter in deploy/compose.yaml (danielqsj/kafka-exporter; its README's list).
KAFKA_EXPORTER_METRICS = {"kafka_consumergroup_lag", "kafka_consumergroup_lag_sum",
                          "kafka_consumergroup_current_offset", "kafka_topic_partition_current_offset"}


def tool(name: str) -> str:
    """A validator from the `test` extra (in the venv's bin) or the machine's (Debian's promtool, kubectl)."""
    found = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if found is None:
        pytest.fail(f"{name} not found: `make install` installs the test extra, `make test` Debian's prometheus")
    return found


def run(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


# --- Dockerfile


def test_dockerfile_passes_hadolint():
    run(tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "Dockerfile")


def test_image_runs_as_non_root_with_a_health_check():
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line and line[0].isupper()]
    final = max(i for i, words in enumerate(lines) if words[0] == "FROM")
    users = [words[1] for words in lines[final:] if words[0] == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert any(words[0] == "HEALTHCHECK" for words in lines[final:])


# --- compose


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {name: value for name, value in pairs}


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, ${X}, $X, ${X:-default}, ${X-default}, ${X:?error}, ${X?error}."""

    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        given = env.get(name)
        unset = given is None or (given == "" and operator and operator.startswith(":"))
        if operator and operator.endswith("?") and unset:
            pytest.fail(f"${{{name}}} is required ({argument}) but the example secrets do not set it")
        if operator and operator.endswith("-") and unset:
            return argument
        return given or ""

    return _VARIABLE.sub(value, text)


def compose_document(path: Path) -> dict:
    """The file as `docker compose config` reads it: parsed first, then each string interpolated."""
    env = env_file(SECRETS_EXAMPLE)

    def walk(node):
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return interpolate(node, env) if isinstance(node, str) else node

    return walk(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec(path, tmp_path):
    resolved = tmp_path / path.name
    resolved.write_text(yaml.safe_dump(compose_document(path)))
    run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(resolved))


def test_compose_mounts_and_build_context_exist():
    services = compose_document(DEPLOY / "compose.yaml")["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source == "../var/models/base":  # built by `make model`, not in git: the Makefile must build it there
                assert "BASE_MODEL ?= var/models/base" in (DEPLOY.parent / "Makefile").read_text()
            elif source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / "Dockerfile").is_file()


def test_compose_prometheus_config_passes_promtool(tmp_path):
    """The configuration as the container sees it: each mounted file at its path in the container."""
    prometheus = compose_document(DEPLOY / "compose.yaml")["services"]["prometheus"]
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            (tmp_path / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DEPLOY / source, tmp_path / target.lstrip("/"))
    run(tool("promtool"), "check", "config", str(tmp_path / "etc/prometheus/prometheus.yml"))


def test_grafana_provisioning_matches_the_dashboard():
    grafana = compose_document(DEPLOY / "compose.yaml")["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("."))
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "rlhf.yaml").read_text())["providers"]
    assert Path(mounts["./grafana/rlhf-dashboard.json"]).parent == Path(provider["options"]["path"])
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    [variable] = json.loads(DASHBOARD.read_text())["templating"]["list"]
    assert (variable["type"], variable["current"]["value"]) == ("datasource", source["uid"])
    assert source["url"].split("//")[1].split(":")[0] in compose_document(DEPLOY / "compose.yaml")["services"]


# --- Kubernetes


def kustomize_resources() -> list[Path]:
    return [K8S / name for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]]


def validate_all(documents: list[dict]) -> None:
    for document in documents:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{document['kind']}/{document['metadata']['name']} (Kubernetes {version}): {exc}")


def test_every_manifest_is_in_the_kustomization():
    assert set(kustomize_resources()) == set(K8S.glob("*.yaml")) - {K8S / "kustomization.yaml"}


def test_manifests_match_kubernetes_schemas():
    validate_all([document for path in kustomize_resources() for document in yaml.safe_load_all(path.read_text())])


def kustomized() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed and no registry here offers it")
    return list(yaml.safe_load_all(run(kubectl, "kustomize", str(K8S))))


def test_kustomize_build_matches_kubernetes_schemas():
    documents = kustomized()
    validate_all(documents)
    assert {d["metadata"].get("namespace") for d in documents if d["kind"] != "Namespace"} == {"rlhf"}


def pod_specs(documents: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in documents
            if d["kind"] in ("Deployment", "StatefulSet")}


def test_workloads_are_non_root_on_gpus_and_probed():
    documents = kustomized()
    workloads = {d["metadata"]["name"]: d for d in documents if d["kind"] in ("Deployment", "StatefulSet")}
    for name, spec in pod_specs(documents).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        [container] = spec["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
    [serving] = pod_specs(documents)["rlhf-serving"]["containers"]
    assert serving["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert workloads["rlhf-serving"]["spec"]["replicas"] >= 2
    assert workloads["rlhf-trainer"]["spec"]["replicas"] == 1
    assert workloads["rlhf-trainer"]["spec"]["strategy"]["type"] == "Recreate"
    services = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == "rlhf-serving"]
    assert services[0]["spec"]["selector"] == workloads["rlhf-serving"]["spec"]["selector"]["matchLabels"]


def test_secrets_are_referenced_never_valued():
    documents = kustomized()
    assert not [d for d in documents if d["kind"] == "Secret"]
    for name, spec in pod_specs(documents).items():
        for variable in spec["containers"][0]["env"]:
            assert "secretKeyRef" in variable["valueFrom"], f"{name}: {variable['name']} is not from a Secret"


# --- every variable the files set is one the code reads


def variables_read() -> set[str]:
    from serving.settings import ServingSettings
    from trainer.settings import TrainerSettings

    names = set()
    for settings in (ServingSettings, TrainerSettings):
        prefix = settings.model_config.get("env_prefix", "")
        for name, field in settings.model_fields.items():
            names.add(field.alias or f"{prefix}{name}".upper())
    return names


def variables_set() -> dict[str, str]:
    """Each variable the deployment files set, with where."""
    found = {}
    for path in COMPOSE_FILES:
        for name, service in compose_document(path)["services"].items():
            if name in ("serving", "trainer"):
                found |= {variable: f"{path.name} ({name})" for variable in service.get("environment", {})}
    for document in kustomized():
        if document["kind"] == "ConfigMap":
            found |= {variable: f"ConfigMap {document['metadata']['name']}" for variable in document["data"]}
        for spec in pod_specs([document]).values():
            found |= {v["name"]: f"{document['kind']} {document['metadata']['name']}" for v in spec["containers"][0]["env"]}
    for line in (ROOT / "Dockerfile").read_text().split("\nENV ")[1:]:
        found |= {m: "Dockerfile" for m in re.findall(r"(\w+)=", line.split("\n\n")[0])}
    return found


def test_every_variable_set_is_read():
    read = variables_read()
    unread = {name: where for name, where in variables_set().items()
              if name not in read and name not in NOT_READ_YET and not READ_ELSEWHERE.fullmatch(name)
              and not name.startswith("SERVING_CANARY__")
              and not name.startswith(("PIP_", "PYTHON"))}
    assert not unread, f"set but read by no settings object: {unread}"
    assert not NOT_READ_YET & read, f"now read by the settings: take them out of NOT_READ_YET: {NOT_READ_YET & read}"


# --- the Grafana dashboard


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return queries + [annotation["expr"] for annotation in dashboard["annotations"]["list"] if "expr" in annotation]


def test_dashboard_layout():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


_LABELS = re.compile(r'\{[^}]*\}|"[^"]*"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)|\[[^\]]*\]')
_NOT_METRICS = {"sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "and", "or",
                "unless", "offset", "bool", "changes", "topk", "abs", "clamp_min", "le"}


def metric_names(query: str) -> set[str]:
    names = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", _LABELS.sub(" ", query))
    return {name for name in names if name not in _NOT_METRICS and not name.startswith("__")}


def exported_metrics() -> set[str]:
    """The families the project's modules register (each module that defines one is imported), with the
    suffixes they expose."""
    import importlib

    import prometheus_client

    for package in ("common", "feedback", "serving", "trainer"):
        for path in (ROOT / package).rglob("*.py"):
            if re.search(r"^\w+ = (Counter|Gauge|Histogram|Summary)\(", path.read_text(), re.MULTILINE):
                importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    names = set()
    for family in prometheus_client.REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def vllm_exports(name: str) -> bool:
    import importlib.util

    package = Path(importlib.util.find_spec("vllm").origin).parent
    return any(f'"{name}"' in path.read_text() for path in (package / "v1" / "metrics").glob("*.py"))


def test_dashboard_uses_only_exported_metrics():
    exported = exported_metrics()
    used = set().union(*map(metric_names, dashboard_queries()))
    assert used & exported, "no project metric found: the name parser is broken"
    unknown = {name for name in used - exported - KAFKA_EXPORTER_METRICS
               if not (name.startswith("vllm:") and vllm_exports(name))}
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"


def test_dashboard_queries_parse_in_promtool(tmp_path):
    """promtool evaluates every panel and annotation query (on no data): a syntax error fails here, not as an
    empty panel discovered later."""
    cases = [{"expr": query.replace("$__rate_interval", "1m"), "eval_time": "5m", "exp_samples": []}
             for query in dashboard_queries()]
    tests = {"rule_files": [], "tests": [{"interval": "1m", "input_series": [], "promql_expr_test": cases}]}
    (tmp_path / "dashboard.test.yml").write_text(yaml.safe_dump(tests))
    run(tool("promtool"), "test", "rules", str(tmp_path / "dashboard.test.yml"))
