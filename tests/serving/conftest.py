import pytest
from fastapi.testclient import TestClient

from serving.app import build_app
from serving.settings import ServingSettings
from tests.adapters import fake_base_model
from tests.serving.fakes import FakeEngine, MemoryEventSink


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def events() -> MemoryEventSink:
    return MemoryEventSink()


@pytest.fixture
def settings(tmp_path) -> ServingSettings:
    return ServingSettings(registry_dir=tmp_path / "registry", follow_policy_topic=False, max_n=4,
                           max_body_bytes=4096, base_model=fake_base_model())


@pytest.fixture
def client(settings, engine, events):
    app = build_app(settings, lambda: engine, lambda: events)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
