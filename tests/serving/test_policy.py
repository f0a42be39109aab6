"""Hot swap on the fake engine: a published version is loaded before it is served, and a request keeps the
version it started with."""

import asyncio
import threading

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from common.registry import VERDICT, PolicyRegistry
from serving.app import build_app
from tests.adapters import CORRUPTIONS, fake_base_model, write_adapter

USER = [{"role": "user", "content": "Hello"}]


def publish_fake_adapter(registry: PolicyRegistry, tmp_path, corrupt: str | None = None) -> str:
    """A version whose adapter fits the serving tests' stand-in base (or is broken as `corrupt` says)."""
    adapter = write_adapter(tmp_path / "adapter", fake_base_model(), corrupt=corrupt)
    return registry.publish(adapter, base_model="base", parent="v0", metrics={"reward": 1.0}).name


def test_swap_loads_then_serves_new_version(client, engine, settings, tmp_path):
    version = publish_fake_adapter(PolicyRegistry(settings.registry_dir), tmp_path)
    policies = client.app.state.policies
    client.portal.call(policies.activate, version)
    assert engine.loaded == ["v1"]
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
    assert response.headers["x-policy-version"] == "v1"
    assert response.json()["choices"][0]["message"]["content"].startswith("[v1]")
    assert "rlhf-policy@v1" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    metrics = client.get("/metrics").text
    assert 'rlhf_policy_version_info{version="v1"} 1.0' in metrics
    assert 'rlhf_policy_version_info{version="v0"} 0.0' in metrics


def test_request_in_flight_keeps_its_version(client, engine, settings, tmp_path):
    version = publish_fake_adapter(PolicyRegistry(settings.registry_dir), tmp_path)
    engine.word_delay_s = 0.05
    result = {}

    def slow_request():
        result["response"] = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 10})

    thread = threading.Thread(target=slow_request)
    thread.start()
    client.portal.call(asyncio.sleep, 0.1)  # the request is now generating on v0
    client.portal.call(client.app.state.policies.activate, version)
    thread.join()
    response = result["response"]
    assert response.status_code == 200
    assert response.headers["x-policy-version"] == "v0"
    assert response.json()["choices"][0]["message"]["content"].startswith("[v0]")


def test_pinning_an_older_version_after_swap(client, settings, tmp_path):
    client.portal.call(client.app.state.policies.activate,
                       publish_fake_adapter(PolicyRegistry(settings.registry_dir), tmp_path))
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "model": "rlhf-policy@v0"})
    assert response.headers["x-policy-version"] == "v0"


def test_stream_disconnect_aborts_generation(client, engine):
    engine.word_delay_s = 0.02
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": USER, "max_tokens": 40, "stream": True}) as response:
        for line in response.iter_lines():
            if "w2" in line:
                break
    for _ in range(50):
        if engine.aborted:
            break
        client.portal.call(asyncio.sleep, 0.02)
    assert len(engine.aborted) == 1


def corrupt_total(client, what: str) -> float:
    """rlhf_registry_corrupt_total{what=...} as serving's /metrics shows it."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "rlhf_registry_corrupt_total" and sample.labels == {"what": what}:
                return sample.value
    return 0.0


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_a_corrupt_adapter_is_skipped_with_the_metric_and_serving_keeps_answering(client, engine, settings,
                                                                                  tmp_path, corrupt):
    registry = PolicyRegistry(settings.registry_dir)
    policies = client.app.state.policies
    client.portal.call(policies.activate, publish_fake_adapter(registry, tmp_path))
    before = corrupt_total(client, "adapter")
    bad = publish_fake_adapter(registry, tmp_path, corrupt=corrupt)
    client.portal.call(policies.offer, bad)  # as the policy topic announces it
    assert engine.loaded == ["v1"] and policies.current.name == "v1" and policies.trial is None
    assert corrupt_total(client, "adapter") == before + 1
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
    assert response.status_code == 200 and response.headers["x-policy-version"] == "v1"
    pinned = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "model": f"rlhf-policy@{bad}"})
    assert pinned.status_code == 404 and "failed its check" in pinned.json()["error"]["message"]
    assert engine.loaded == ["v1"]  # the pinned request never reached the engine with it
    assert client.get("/v1/models").status_code == 200
    assert corrupt_total(client, "adapter") == before + 1  # checked once: a version never changes


def test_serving_starts_past_corrupt_adapters(settings, engine, events, tmp_path):
    """v1 good and promoted, v2 promoted but corrupt, v3 corrupt and new: serving starts on v1, no canary."""
    registry = PolicyRegistry(settings.registry_dir)
    publish_fake_adapter(registry, tmp_path)
    publish_fake_adapter(registry, tmp_path, corrupt="nan")
    publish_fake_adapter(registry, tmp_path, corrupt="truncated")
    registry.record_verdict("v1", "promoted", "canary", {})
    registry.record_verdict("v2", "promoted", "canary", {})
    with TestClient(build_app(settings, lambda: engine, lambda: events)) as client:
        assert corrupt_total(client, "adapter") >= 2
        policies = client.app.state.policies
        assert (policies.current.name, policies.trial, engine.loaded) == ("v1", None, ["v1"])
        response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
        assert response.status_code == 200 and response.headers["x-policy-version"] == "v1"


@pytest.mark.parametrize("content", [b"{not json", b'{"verdict": 7}', b"[]"])
def test_a_corrupt_verdict_is_skipped_with_the_metric_and_models_answers(client, settings, tmp_path, content):
    registry = PolicyRegistry(settings.registry_dir)
    version = publish_fake_adapter(registry, tmp_path)
    registry.record_verdict(version, "rolled_back", "worse", {})
    before = corrupt_total(client, "verdict")
    (registry.get(version).path / VERDICT).write_bytes(content)
    for _ in range(2):
        response = client.get("/v1/models")
        assert response.status_code == 200
        assert f"rlhf-policy@{version}" in [m["id"] for m in response.json()["data"]]
    assert corrupt_total(client, "verdict") == before + 1
    assert registry.get(version).verdict is None  # taken as having no verdict: servable by default again
