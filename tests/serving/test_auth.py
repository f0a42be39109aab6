"""Authentication (SERVING_AUTH): keys by default, app keys never on admin routes, the page's own session
tokens, and local mode only when asked for."""

import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from common.registry import PolicyRegistry
from serving.app import build_app
from serving.page_sessions import PageSessions
from serving.settings import ServingSettings
from tests.conftest import ROOT
from tests.serving.test_policy import publish_fake_adapter

USER = [{"role": "user", "content": "Hi"}]
COMPLETION_KEY, SIGNING_KEY = "c" * 32, "s" * 32
KEYS = {"auth": "keys", "api_keys": ["app-key"], "admin_key": "admin-key",
        "completion_key": SecretStr(COMPLETION_KEY), "policy_signing_key": SecretStr(SIGNING_KEY)}


def keyed(settings: ServingSettings, **changes) -> ServingSettings:
    """`settings` with authentication on (validated as serving's start validates it)."""
    return ServingSettings.model_validate({**settings.model_dump(), **KEYS, **changes})


@pytest.fixture
def secured(settings, engine, events):
    with TestClient(build_app(keyed(settings), lambda: engine, lambda: events)) as client:
        yield client


def auth(key):
    return {"authorization": f"Bearer {key}"}


def chat(client, headers):
    return client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}, headers=headers)


def test_api_needs_a_valid_key(secured):
    for headers in ({}, auth("wrong"), {"authorization": "Basic app-key"}):
        response = chat(secured, headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert secured.get("/v1/models", headers={}).status_code == 401
    assert chat(secured, auth("app-key")).status_code == 200
    assert secured.get("/healthz").status_code == 200  # probes need no key


def test_admin_needs_the_admin_key(secured, settings, tmp_path):
    publish_fake_adapter(PolicyRegistry(settings.registry_dir), tmp_path)
    assert secured.post("/v1/admin/policy", json={"version": "v1"}, headers=auth("app-key")).status_code == 403
    assert secured.get("/v1/admin/policy", headers=auth("app-key")).status_code == 403
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


# --- Refusing to start open ------------------------------------------------------------------------


def test_keys_are_the_default_and_start_needs_every_key(monkeypatch, tmp_path):
    monkeypatch.delenv("SERVING_AUTH")
    with pytest.raises(ValidationError) as refused:
        ServingSettings(registry_dir=tmp_path)
    message = str(refused.value)
    for name in ("SERVING_API_KEYS", "SERVING_ADMIN_KEY", "SERVING_COMPLETION_KEY", "RLHF_POLICY_SIGNING_KEY"):
        assert name in message
    with pytest.raises(ValidationError, match="SERVING_ADMIN_KEY"):
        ServingSettings(**{**KEYS, "admin_key": None})
    with pytest.raises(ValidationError, match="must differ from every app key"):
        ServingSettings(**{**KEYS, "api_keys": ["app-key", "admin-key"]})
    assert ServingSettings(**KEYS).auth == "keys"
    assert ServingSettings(auth="local").auth == "local"


def test_python_m_serving_refuses_to_start_without_keys(tmp_path):
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SERVING_", "RLHF_POLICY_SIGNING"))}
    result = subprocess.run([sys.executable, "-m", "serving"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "SERVING_AUTH=keys (the default) needs SERVING_API_KEYS, SERVING_ADMIN_KEY" in result.stderr


# --- The end-user page's session tokens -----------------------------------------------------------


def session(client) -> str:
    response = client.post("/page/session")
    assert response.status_code == 200
    return response.json()["token"]


def test_the_page_works_with_auth_on_and_its_token_opens_no_admin_route(secured, events):
    assert secured.get("/").status_code == 200  # the page itself needs no key
    token = session(secured)
    completion = chat(secured, auth(token))
    assert completion.status_code == 200
    feedback = {"type": "thumbs", "completion_id": completion.json()["id"], "rating": "up"}
    assert secured.post("/v1/feedback", json=feedback, headers=auth(token)).status_code == 202
    assert events.feedback[0].app_key_id.startswith("page-")
    assert secured.get("/v1/admin/policy", headers=auth(token)).status_code == 403
    assert secured.post("/v1/admin/policy", json={"version": "v0"}, headers=auth(token)).status_code == 403


def test_a_session_token_is_refused_once_expired_altered_or_foreign(secured):
    sessions: PageSessions = secured.app.state.page_sessions
    old = sessions.issue(now=1_000_000)
    assert sessions.valid(old, now=1_000_000 + sessions.ttl_s) and not sessions.valid(old, now=1_000_001 + sessions.ttl_s)
    token = session(secured)
    issued_at = token.split(".")[1]
    forged = token.replace(f".{issued_at}.", f".{int(issued_at) + 1}.")
    foreign = PageSessions("f" * 32).issue()
    for bad in (sessions.issue(now=1_000_000), forged, foreign, token[:-1], "page."):
        assert chat(secured, auth(bad)).status_code == 401, bad
    # Minted under the completion key: a replica with the same key (another process) accepts it.
    assert PageSessions(COMPLETION_KEY).valid(token)
    assert chat(secured, auth(token)).status_code == 200


def test_without_the_page_no_session_is_minted_nor_accepted(settings, engine, events):
    token = PageSessions(COMPLETION_KEY).issue()
    with TestClient(build_app(keyed(settings, page=False), lambda: engine, lambda: events)) as client:
        assert client.get("/").status_code == 404
        assert client.post("/page/session").status_code == 404
        assert chat(client, auth(token)).status_code == 401
        assert chat(client, auth("app-key")).status_code == 200
