"""The policy registry: numbered, whole versions; the base model is v0; one version per source."""

from __future__ import annotations

import json

import pytest

from common.registry import PolicyRegistry, version_number


@pytest.fixture
def adapter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    return adapter


def publish(registry: PolicyRegistry, adapter, source=None, parent="v0"):
    return registry.publish(adapter, base_model="base", parent=parent, metrics={"reward": 1.0}, source=source)


def test_versions_are_numbered_in_order_and_read_back_whole(tmp_path, adapter):
    registry = PolicyRegistry(tmp_path / "registry")
    assert registry.latest().name == "v0" and registry.latest().is_base
    first, second = publish(registry, adapter), publish(registry, adapter, parent="v1")
    assert (first.name, second.name) == ("v1", "v2")
    again = PolicyRegistry(tmp_path / "registry").get("v2")
    assert again.manifest["parent"] == "v1" and (again.path / "adapter_config.json").is_file()
    assert [v.name for v in registry.list()] == ["v0", "v1", "v2"]


def test_a_half_written_version_is_not_listed(tmp_path, adapter):
    registry = PolicyRegistry(tmp_path / "registry")
    publish(registry, adapter)
    (tmp_path / "registry" / "versions" / "000002").mkdir()  # no manifest: a crash mid-copy
    assert registry.latest().name == "v1"
    with pytest.raises(KeyError):
        registry.get("v2")


def test_publishing_again_from_one_source_returns_the_first_version(tmp_path, adapter):
    registry = PolicyRegistry(tmp_path / "registry")
    first = publish(registry, adapter, source="round-a")
    other = publish(registry, adapter, source="round-b")
    assert publish(registry, adapter, source="round-a").name == first.name == "v1"
    assert other.name == "v2" and registry.latest().name == "v2"
    assert registry.find("round-c") is None


@pytest.mark.parametrize("name", ["1", "v", "v1.5", "latest", "V1", ""])
def test_version_names_are_v_and_a_number(name):
    with pytest.raises(ValueError):
        version_number(name)


def test_verdicts_steer_latest_and_latest_promoted(tmp_path, adapter):
    registry = PolicyRegistry(tmp_path / "registry")
    publish(registry, adapter), publish(registry, adapter), publish(registry, adapter)
    assert (registry.latest().name, registry.latest_promoted().name) == ("v3", "v0")
    registry.record_verdict("v1", "promoted", "good", {"canary_requests": 200.0})
    registry.record_verdict("v3", "rolled_back", "approval fell", {})
    again = PolicyRegistry(tmp_path / "registry")
    assert (again.latest().name, again.latest_promoted().name) == ("v2", "v1")
    v3 = again.get("v3")
    assert v3.rolled_back and not v3.promoted and v3.verdict["reason"] == "approval fell"
    assert v3.manifest["version"] == "v3"  # the version itself is unchanged
    assert again.get("v1").verdict["figures"] == {"canary_requests": 200.0}
    assert [v.name for v in again.list()] == ["v0", "v1", "v2", "v3"]
    with pytest.raises(ValueError):
        registry.record_verdict("v0", "rolled_back", "no", {})
    with pytest.raises(ValueError):
        registry.record_verdict("v2", "maybe", "no", {})
