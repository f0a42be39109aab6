"""Hot swap on the fake engine: a published version is loaded before it is served, and a request keeps the
version it started with."""

import asyncio
import threading

from common.registry import PolicyRegistry

USER = [{"role": "user", "content": "Hello"}]


def publish_fake_adapter(registry: PolicyRegistry, tmp_path) -> str:
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
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
