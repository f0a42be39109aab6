"""API keys for apps, a separate admin key for changing the served policy."""

import pytest
from fastapi.testclient import TestClient

from common.registry import PolicyRegistry
from serving.app import build_app
from tests.serving.test_policy import publish_fake_adapter

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def secured(settings, engine, events):
    settings = settings.model_copy(update={"api_keys": ["app-key"], "admin_key": "admin-key"})
    with TestClient(build_app(settings, lambda: engine, lambda: events)) as client:
        yield client


def auth(key):
    return {"authorization": f"Bearer {key}"}


def test_api_needs_a_valid_key(secured):
    for headers in ({}, auth("wrong"), {"authorization": "Basic app-key"}):
        response = secured.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert secured.get("/v1/models", headers={}).status_code == 401
    assert secured.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1},
                        headers=auth("app-key")).status_code == 200
    assert secured.get("/healthz").status_code == 200  # probes need no key


def test_admin_needs_the_admin_key(secured, settings, tmp_path):
    publish_fake_adapter(PolicyRegistry(settings.registry_dir), tmp_path)
    assert secured.post("/v1/admin/policy", json={"version": "v1"}, headers=auth("app-key")).status_code == 403
    assert secured.post("/v1/admin/policy", json={"version": "v1"}).status_code == 401
    response = secured.post("/v1/admin/policy", json={"version": "v1"}, headers=auth("admin-key"))
    assert response.status_code == 200 and response.json()["current"] == "v1"


def test_rollback_through_admin(client, settings, tmp_path):
    registry = PolicyRegistry(settings.registry_dir)
    publish_fake_adapter(registry, tmp_path)
    assert client.post("/v1/admin/policy", json={"version": "v1"}).json()["current"] == "v1"
    assert client.post("/v1/admin/policy", json={"version": "v0"}).json() == {
        "current": "v0", "candidate": None, "canary": None, "versions": ["v0", "v1"], "rolled_back": [],
        "gates": {}}
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
    assert response.headers["x-policy-version"] == "v0"
    assert client.post("/v1/admin/policy", json={"version": "v9"}).status_code == 404
    assert client.post("/v1/admin/policy", json={"version": "latest"}).status_code == 400
