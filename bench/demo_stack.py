"""The stack under test, started exactly as `make up` starts it (`python -m deploy.local`, shipped
defaults) but with a directory of its own and free ports where the default ones are taken.

Its registry and trainer work dir go under the demo's directory, its output to `stack.log` there. Stopping
sends SIGTERM to the launcher, which stops the trainer, serving and the broker in order; a launcher that
does not exit within `stop_timeout_s` is killed with its process group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

from deploy.local import start_service, stop_service, wait_http_ok
from deploy.local_broker import free_port


def port_or_free(default: int) -> int:
    """`default` if nothing listens there, else a free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", default))
        except OSError:
            return free_port()
    return default


class DemoStack:
    def __init__(self, directory: Path, start_timeout_s: float = 900.0, stop_timeout_s: float = 120.0):
        self.directory = directory
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.serving_port = port_or_free(int(os.environ.get("SERVING_PORT", "8000")))
        self.trainer_metrics_port = port_or_free(int(os.environ.get("TRAINER_METRICS_PORT", "8001")))
        self.log_path = directory / "stack.log"
        self.process: subprocess.Popen | None = None

    @property
    def serving_url(self) -> str:
        return f"http://127.0.0.1:{self.serving_port}"

    @property
    def trainer_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.trainer_metrics_port}/metrics"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RLHF_REGISTRY_DIR=str(self.directory / "registry"),
            TRAINER_WORK_DIR=str(self.directory / "trainer"),
            SERVING_PORT=str(self.serving_port),
            TRAINER_METRICS_PORT=str(self.trainer_metrics_port),
        )
        if "KAFKA_BOOTSTRAP_SERVERS" in env:  # a shared cluster: topics of this run's own
            env["RLHF_TOPIC_PREFIX"] = f"demo-{uuid.uuid4().hex[:8]}."
        else:
            env["RLHF_LOCAL_BROKER_PORT"] = str(port_or_free(int(env.get("RLHF_LOCAL_BROKER_PORT", "9092"))))
        return env

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own handle
            self.process = start_service(["deploy.local"], self.environment(), log_file=log)

    def wait_ready(self) -> None:
        """Block until serving answers /healthz; raises if the launcher exits first."""
        wait_http_ok(f"{self.serving_url}/healthz", self.process, timeout_s=self.start_timeout_s)

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the stack exited with code {self.process.returncode}; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None:
            stop_service(self.process, timeout_s=self.stop_timeout_s)

    def __enter__(self) -> DemoStack:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
