"""Serving shares its host with the trainer (`make up`, these tests): busy, its engine must leave every core
usable by other processes.

vLLM pins its CPU worker to the first cores unless told otherwise, and a process pinned beside it got next to
no CPU. Every process that imports torch is pinned for a moment (MKL binds itself to each core in turn to
count them): in CI the trainer stalled there for 15 minutes, before its first log line.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from trainer.data.corpus import sample_prompts

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

# Each core in turn, a little CPU time: what MKL's core count does, and what any pinned process needs.
ON_EVERY_CORE = """
import os, time
import torch  # MKL pins this process to each core in turn while it loads
for core in sorted(os.sched_getaffinity(0)):
    os.sched_setaffinity(0, {core})
    start = time.process_time()
    while time.process_time() - start < 0.1:
        pass
print("ran on every core")
"""


def keep_busy(url: str, stop: threading.Event, answered: list[int]) -> None:
    prompts = sample_prompts(8, seed=11)
    with httpx.Client(timeout=120) as client:
        i = 0
        while not stop.is_set():
            response = client.post(f"{url}/v1/chat/completions", json={
                "model": "rlhf-policy", "messages": prompts[i % len(prompts)], "max_tokens": 64})
            answered.append(response.status_code)
            i += 1


def test_a_process_importing_torch_gets_every_core_while_serving_is_busy(serving):
    stop, answered = threading.Event(), []
    clients = [threading.Thread(target=keep_busy, args=(serving.url, stop, answered), daemon=True) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        while len(answered) < 8:  # the engine is generating before the other process starts
            stop.wait(0.2)
        # A hang guard, not a speed goal: 4.9 s here; beside a pinned engine about 195 s, and over 900 s in CI.
        started = time.monotonic()
        child = subprocess.run([sys.executable, "-c", ON_EVERY_CORE], capture_output=True, text=True, timeout=90)
        print(f"a process importing torch and running on each core: {time.monotonic() - started:.1f} s")
        busy_throughout = len(answered)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    assert child.returncode == 0 and "ran on every core" in child.stdout, child.stderr[-2000:]
    assert set(answered) == {200} and busy_throughout > 8, (busy_throughout, set(answered))
