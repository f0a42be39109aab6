"""Both registry stores, so that every registry test runs against the directory and a real S3 server."""

from __future__ import annotations

import uuid

import pytest

from common.registry import PolicyRegistry
from common.registry_s3 import S3Store
from tests.s3_server import local_s3_server


@pytest.fixture(scope="session")
def s3_server():
    with local_s3_server() as server:
        yield server


@pytest.fixture(params=["directory", "s3"])
def open_registry(request, tmp_path):
    """A function returning the registry of this test (called again: a second client of the same one)."""
    if request.param == "directory":
        return lambda: PolicyRegistry(tmp_path / "registry")
    server = request.getfixturevalue("s3_server")
    bucket = f"registry-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=bucket)
    counter = iter(range(1000))
    return lambda: PolicyRegistry(S3Store(f"s3://{bucket}/policies", tmp_path / f"cache-{next(counter)}",
                                          client=server.client()))
