"""`python -m deploy.local` (what `make up` runs): the whole stack on this machine.

Starts the embedded broker (unless KAFKA_BOOTSTRAP_SERVERS names a cluster), the serving API and the
trainer loop as child processes sharing one environment; Ctrl-C (or SIGTERM) stops all of them, children
first, then the broker. If any child dies, the rest are stopped too and the exit code says so. Serving runs
in local mode, without authentication, unless SERVING_AUTH says otherwise; both sign and check policy
announcements with the key file under var/ unless RLHF_POLICY_SIGNING_KEY is set.

Serving and the trainer share the machine's cores, at the same priority: the trainer's torch runs on one
thread (TrainerSettings.torch_threads), which keeps its rounds bounded under serving load, where torch's
one thread per core made a PPO round 8-54x slower (bench/trainer_beside_serving.py, docs/training.md).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack

from common.settings import SharedSettings

log = logging.getLogger("deploy.local")


def start_service(module_args: list[str], env: dict[str, str], log_file=None) -> subprocess.Popen:
    # Own process group: the terminal's Ctrl-C reaches only us, and we stop children in order.
    return subprocess.Popen([sys.executable, "-m", *module_args], env=env, start_new_session=True,
                            stdout=log_file, stderr=subprocess.STDOUT if log_file else None)


def stop_service(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_http_ok(url: str, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Poll `url` until it answers 200; fail early if the process that should serve it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout_s} s")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = dict(os.environ)
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    with ExitStack() as stack:
        if "KAFKA_BOOTSTRAP_SERVERS" not in env:
            from deploy.local_broker import LocalBroker

            broker = stack.enter_context(LocalBroker(port=int(env.get("RLHF_LOCAL_BROKER_PORT", "9092"))))
            env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
            log.info("embedded Kafka-protocol broker (Tansu, in memory) on %s", broker.bootstrap_servers)
        else:
            log.info("using the Kafka cluster at %s", env["KAFKA_BOOTSTRAP_SERVERS"])

        # One machine, one user: serving runs without authentication, explicitly (its default refuses to start
        # without keys). SERVING_AUTH=keys with the keys set keeps them on.
        env.setdefault("SERVING_AUTH", "local")
        if env["SERVING_AUTH"] == "local":
            log.warning("local, no auth: serving checks no keys (SERVING_AUTH=local); keep it on this machine")
        children = {
            "serving": start_service(["serving"], env),
            "trainer": start_service(["trainer", "run"], env),
        }
        for process in children.values():
            stack.callback(stop_service, process)
        settings = SharedSettings()
        port = env.get("SERVING_PORT", "8000")
        log.info("serving on http://127.0.0.1:%s (OpenAI API under /v1), base model %s, registry %s; Ctrl-C stops",
                 port, settings.base_model, settings.registry_dir)

        while not stopping:
            for name, process in children.items():
                if process.poll() is not None:
                    log.error("%s exited with code %s; stopping the stack", name, process.returncode)
                    return 1
            time.sleep(0.5)
        log.info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
