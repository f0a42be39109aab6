"""Session-wide real parts: one broker and one tiny base model per test run.

Set KAFKA_BOOTSTRAP_SERVERS to run every Kafka test against that cluster instead of the embedded
Tansu broker; topics get a per-run prefix so runs never see each other's events.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.kafka import wait_for_broker
from common.settings import SharedSettings

ROOT = Path(__file__).resolve().parent.parent

# Serving's default (SERVING_AUTH=keys) refuses to start without keys: the suite runs it in local mode, in
# this process and in the services it starts, except where a test asks for keys (tests/serving/test_auth.py).
os.environ["SERVING_AUTH"] = "local"

CACHE = ROOT / "var" / "test-cache"


@pytest.fixture(scope="session")
def kafka_settings() -> SharedSettings:
    prefix = f"test-{uuid.uuid4().hex[:8]}."
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if servers:
        settings = SharedSettings(kafka_bootstrap_servers=servers, topic_prefix=prefix)
        wait_for_broker(settings)
        yield settings
        return
    from deploy.local_broker import LocalBroker

    with LocalBroker() as broker:
        settings = SharedSettings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix)
        wait_for_broker(settings)
        yield settings


def _model_sources_digest() -> str:
    digest = hashlib.sha256()
    for name in ("trainer/data/corpus.py", "trainer/init_model.py"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The tiny preset of the default base model, cached across runs until its sources change."""
    from trainer.init_model import build_base_model

    out = CACHE / f"base-tiny-{_model_sources_digest()}"
    if not (out / "config.json").is_file():
        # Build beside the cache entry and rename into place: two sessions building at once both succeed.
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=CACHE))
        build_base_model(staging, preset="tiny", seed=0)
        try:
            staging.rename(out)
        except OSError:
            shutil.rmtree(staging)  # another session finished first; its copy is the same model
    return out


ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class Service:
    url: str
    env: dict[str, str]
    process: subprocess.Popen
    log_path: Path


def start_logged_service(name: str, module_args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """A `python -m ...` child whose output goes to test-artifacts/<name>.log (kept for CI debugging)."""
    from deploy.local import start_service

    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / f"{name}.log"
    return start_service(module_args, env, log_file=open(log_path, "wb")), log_path


@pytest.fixture(scope="session")
def serving(kafka_settings, base_model_dir, tmp_path_factory) -> Service:
    """One real serving process (vLLM engine, Kafka event log, policy follower) for the whole session."""
    from deploy.local import stop_service, wait_http_ok
    from deploy.local_broker import free_port

    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.kafka_bootstrap_servers,
        "RLHF_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "RLHF_BASE_MODEL": str(base_model_dir),
        "RLHF_REGISTRY_DIR": str(tmp_path_factory.mktemp("registry")),
        "SERVING_PORT": str(port),
        "SERVING_MAX_MODEL_LEN": "256",
        # A canary short enough for a test: half the traffic, promoted after 10 requests without ratings.
        "SERVING_CANARY__FRACTION": "0.5",
        "SERVING_CANARY__MIN_REQUESTS": "10",
        "SERVING_CANARY__MIN_SECONDS": "0",
        "SERVING_CANARY__MIN_RATINGS": "0",
        "SERVING_CANARY__CHECK_INTERVAL_S": "0.5",
    }
    process, log_path = start_logged_service("serving", ["serving"], env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/healthz", process, timeout_s=300)
    except Exception:
        stop_service(process)
        raise RuntimeError(f"serving did not start; see {log_path}:\n{log_path.read_text()[-3000:]}") from None
    yield Service(url=url, env=env, process=process, log_path=log_path)
    stop_service(process)
