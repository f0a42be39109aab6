"""A broker that keeps its data across a restart, for outage tests: Tansu on an S3 store (moto's server).

Stopping a broker is only possible for one the tests start, so a test that needs this skips when
KAFKA_BOOTSTRAP_SERVERS names a cluster of its own.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
import pytest

from deploy.local import start_service, stop_service, wait_http_ok
from deploy.local_broker import LocalBroker, free_port

BUCKET = "tansu"


def skip_on_external_cluster() -> None:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("stops and restarts its own broker; a cluster named by KAFKA_BOOTSTRAP_SERVERS cannot be")


@contextmanager
def durable_broker(log_path=None) -> Iterator[LocalBroker]:
    """A started broker whose stop() and start() keep topics, records and group offsets."""
    port = free_port()
    store = start_service(["moto.server", "-p", str(port)], dict(os.environ), log_file=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/", store, timeout_s=60)
        credentials = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, **credentials).create_bucket(Bucket=BUCKET)
        env = {**os.environ, "AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        broker = LocalBroker(log_path=log_path, storage_engine=f"s3://{BUCKET}/", env=env)
        with broker:
            yield broker
    finally:
        stop_service(store)
