"""A real Prometheus scrapes the real server with the project's own scrape and alert configuration, and
its query API returns serving's metrics."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from deploy.local import stop_service, wait_http_ok
from deploy.local_broker import free_port
from tests.conftest import ARTIFACTS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def test_project_config_passes_promtool():
    if PROMTOOL is None:
        pytest.fail("promtool not found: `make test` installs Debian's prometheus")
    for args in (["check", "config", "deploy/prometheus.yml"], ["check", "rules", "deploy/prometheus-rules.yml"],
                 ["test", "rules", "deploy/prometheus-rules.test.yml"]):  # fmt: skip
        result = subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_serving(serving, tmp_path):
    if PROMETHEUS is None:
        pytest.fail("prometheus not found: `make test` installs Debian's prometheus")
    # The project's configuration, pointed at this session's server and scraping every second.
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus-rules.yml")]
    serving_target = serving.url.removeprefix("http://")
    config["scrape_configs"] = [{"job_name": "serving", "static_configs": [{"targets": [serving_target]}]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(ARTIFACTS / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/-/ready", process, timeout_s=60)
        httpx.post(f"{serving.url}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).raise_for_status()

        def query(expr: str) -> list:
            return httpx.get(f"{api}/query", params={"query": expr}).json()["data"]["result"]

        deadline = time.monotonic() + 60
        while not query('rlhf_http_requests_total{route="/v1/chat/completions",status="200"}'):
            assert time.monotonic() < deadline, "Prometheus never saw a chat request"
            time.sleep(1)
        assert query('up{job="serving"}')[0]["value"][1] == "1"
        [current] = query("rlhf_policy_version_info == 1")
        assert current["metric"]["version"].startswith("v")
        assert query("vllm:num_requests_running"), "vLLM's engine metrics are not exposed"
        rules = httpx.get(f"{api}/rules").json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"ServingServerErrors", "FeedbackNotReachingKafka"}
    finally:
        stop_service(process)
