"""The policy registry: numbered, whole versions; the base model is v0; one version per source. Every test
runs against both stores: a directory, and a real local S3 server (moto's server mode)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from common.registry import MANIFEST, VERDICT, DirectoryStore, PolicyRegistry, open_registry, version_number
from common.registry_s3 import S3Store
from common.settings import SharedSettings


@pytest.fixture
def adapter(tmp_path):
    return make_adapter(tmp_path / "adapter", b"weights-a")


def make_adapter(directory: Path, weights: bytes) -> Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def publish(registry: PolicyRegistry, adapter, source=None, parent="v0"):
    return registry.publish(adapter, base_model="base", parent=parent, metrics={"reward": 1.0}, source=source)


def corrupt_count(what: str) -> float:
    return REGISTRY.get_sample_value("rlhf_registry_corrupt_total", {"what": what}) or 0.0


def test_versions_are_numbered_in_order_and_read_back_whole(open_registry, adapter):
    registry = open_registry()
    assert registry.latest().name == "v0" and registry.latest().is_base
    first, second = publish(registry, adapter), publish(registry, adapter, parent="v1")
    assert (first.name, second.name) == ("v1", "v2")
    again = open_registry().get("v2")  # another client: read back from the store, files made local
    assert again.manifest["parent"] == "v1" and (again.path / "adapter_config.json").is_file()
    assert (again.path / "adapter_model.safetensors").read_bytes() == b"weights-a"
    assert [v.name for v in registry.list()] == ["v0", "v1", "v2"]


def test_a_half_written_version_is_not_listed(open_registry, adapter):
    registry = open_registry()
    publish(registry, adapter)
    registry._store.stage(adapter)  # a publisher that died after copying the files, before the manifest
    if isinstance(registry._store, DirectoryStore):
        (registry._store.root / "versions" / "000002").mkdir()  # or mid-rename
    assert registry.latest().name == "v1"
    with pytest.raises(KeyError):
        registry.get("v2")
    assert publish(registry, adapter).name == "v2"


def test_a_publisher_that_lost_the_race_for_a_number_takes_the_next(open_registry, tmp_path):
    winner, loser = open_registry(), open_registry()
    publish(winner, make_adapter(tmp_path / "a", b"weights-a"))
    loser._latest_number = lambda: 0  # it looked before the winner's manifest existed
    assert publish(loser, make_adapter(tmp_path / "b", b"weights-b")).name == "v2"
    reader = open_registry()
    assert (reader.get("v1").path / "adapter_model.safetensors").read_bytes() == b"weights-a"
    assert (reader.get("v2").path / "adapter_model.safetensors").read_bytes() == b"weights-b"


def test_publishing_again_from_one_source_returns_the_first_version(open_registry, adapter):
    registry = open_registry()
    first = publish(registry, adapter, source="round-a")
    other = publish(registry, adapter, source="round-b")
    assert publish(registry, adapter, source="round-a").name == first.name == "v1"
    assert other.name == "v2" and registry.latest().name == "v2"
    assert registry.find("round-c") is None


@pytest.mark.parametrize("name", ["1", "v", "v1.5", "latest", "V1", ""])
def test_version_names_are_v_and_a_number(name):
    with pytest.raises(ValueError):
        version_number(name)


def test_verdicts_steer_latest_and_latest_promoted(open_registry, adapter):
    registry = open_registry()
    publish(registry, adapter), publish(registry, adapter), publish(registry, adapter)
    assert (registry.latest().name, registry.latest_promoted().name) == ("v3", "v0")
    registry.record_verdict("v1", "promoted", "good", {"canary_requests": 200.0})
    registry.record_verdict("v3", "rolled_back", "approval fell", {})
    again = open_registry()
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
    with pytest.raises(KeyError):
        registry.record_verdict("v9", "promoted", "no such version", {})


@pytest.mark.parametrize("content", [b'{"verdict": "prom', b'["promoted"]', b'{"verdict": "maybe", "reason": ""}',
                                     b"\xff\xfe"])
def test_a_corrupt_verdict_counts_once_and_reads_as_no_verdict(open_registry, adapter, content):
    registry = open_registry()
    publish(registry, adapter), publish(registry, adapter)
    registry.record_verdict("v2", "rolled_back", "worse", {})
    before = corrupt_count("verdict")
    registry._store.replace(2, VERDICT, content)
    for _ in range(3):  # read many times (every /v1/models does): logged and counted once
        assert registry.get("v2").verdict is None and not registry.get("v2").rolled_back
        assert registry.latest().name == "v2"
    assert corrupt_count("verdict") == before + 1
    registry.record_verdict("v2", "promoted", "a new verdict replaces it", {})
    assert registry.latest_promoted().name == "v2"


def test_a_corrupt_manifest_leaves_its_version_out(open_registry, adapter):
    registry = open_registry()
    publish(registry, adapter), publish(registry, adapter)
    before = corrupt_count("manifest")
    if isinstance(registry._store, DirectoryStore):
        (registry._store.root / "versions" / "000002" / MANIFEST).write_text("{trunc")
    else:
        store = registry._store
        store._client.put_object(Bucket=store.bucket, Key=store._key(2, MANIFEST), Body=b'{"version": "v7"}')
    registry = open_registry()
    assert [v.name for v in registry.list()] == ["v0", "v1"]
    with pytest.raises(KeyError):
        registry.get("v2")
    assert corrupt_count("manifest") == before + 1


def test_directory_writes_are_fsynced_file_then_directory(tmp_path, adapter, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    registry = PolicyRegistry(tmp_path / "registry")
    version = publish(registry, adapter)
    version_dir = str(version.path)
    staged = [p for p in synced if "/staging/" in p]
    assert any(p.endswith("adapter_model.safetensors") for p in staged)
    assert any(os.path.basename(p).startswith(f".{MANIFEST}.") for p in staged)
    assert str(tmp_path / "registry" / "versions") in synced  # the rename itself
    synced.clear()
    registry.record_verdict("v1", "promoted", "good", {})
    file = next(i for i, p in enumerate(synced) if os.path.basename(p).startswith(f".{VERDICT}."))
    assert version_dir in synced[file + 1:]  # the verdict's data first, then its name


def test_the_settings_choose_the_store(tmp_path):
    directory = open_registry(SharedSettings(registry_dir=tmp_path / "r"))
    assert isinstance(directory._store, DirectoryStore) and directory._store.root == tmp_path / "r"
    s3 = open_registry(SharedSettings(registry_url="s3://bucket/some/prefix", registry_cache_dir=tmp_path / "c",
                                      AWS_DEFAULT_REGION="us-east-1"))
    assert isinstance(s3._store, S3Store)
    assert (s3._store.bucket, s3._store.prefix) == ("bucket", "some/prefix/")
    with pytest.raises(ValueError):
        S3Store("http://bucket/prefix", tmp_path)


def test_listing_a_remote_registry_downloads_nothing(open_registry, adapter):
    registry = open_registry()
    publish(registry, adapter)
    reader = open_registry()
    if isinstance(reader._store, DirectoryStore):
        pytest.skip("a directory's versions are local already")
    assert reader.list()[1].path is None and reader.latest().path is None
    fetched = reader.get("v1")
    assert fetched.path.is_dir() and reader.list()[1].path == fetched.path
