"""A broker that keeps its data across a restart, for outage tests: Tansu on an S3 store (moto's server).

Stopping a broker is only possible for one the tests start, so a test that needs this skips when
KAFKA_BOOTSTRAP_SERVERS names a cluster of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from deploy.local_broker import LocalBroker
from tests.s3_server import local_s3_server

BUCKET = "tansu"


def skip_on_external_cluster() -> None:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("stops and restarts its own broker; a cluster named by KAFKA_BOOTSTRAP_SERVERS cannot be")


@contextmanager
def durable_broker(log_path=None) -> Iterator[LocalBroker]:
    """A started broker whose stop() and start() keep topics, records and group offsets."""
    with local_s3_server() as store:
        store.client().create_bucket(Bucket=BUCKET)
        # Tansu reads its store's address as AWS_ENDPOINT and needs leave to use plain HTTP.
        env = {**os.environ, **store.env, "AWS_ENDPOINT": store.endpoint, "AWS_ALLOW_HTTP": "true"}
        with LocalBroker(log_path=log_path, storage_engine=f"s3://{BUCKET}/", env=env) as broker:
            yield broker
