"""How long a PPO round takes on the host that serves, idle and under a paced request load, per torch thread
count (and niceness) of the trainer: the `make up` layout, serving and trainer sharing the same cores.

    python bench/trainer_beside_serving.py [--model DIR] [--steps 4] [--rate 3] [--repeats 2]
                                           [--variants 2 1 1/10]

Serving (`python -m serving`, with the embedded broker) runs throughout. Each variant "THREADS[/NICE]" is a
trainer process of its own: torch.set_num_threads(THREADS) (and os.nice(NICE)), the trainer's vLLM rollout
engine in that process (as the loop runs it), one warm-up PPO step, then rounds of --steps steps
(PPOConfig's defaults otherwise, an untrained reward model: a step costs the same whatever it learns),
alternately with serving idle and while clients send --rate chat requests per second (Poisson arrivals, up
to 32 tokens, temperature 1), --repeats times. Serving's latency is reported for the load alone (no
trainer) and during each loaded round. Ratios are taken between rounds of one trainer minutes apart: this
machine's other load moves between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.local import start_service, stop_service, wait_http_ok  # noqa: E402
from deploy.local_broker import LocalBroker, free_port  # noqa: E402
from trainer.data.corpus import sample_prompts  # noqa: E402

LOGS = Path(tempfile.gettempdir()) / "trainer-beside-serving"  # the trainers' and serving's logs
SETTLE_S = 5.0  # load runs this long before a round starts, so serving is in its steady state


def trainer(model: Path, reward_model: Path, steps: int, threads: int, niceness: int) -> None:
    """The trainer process: a warm-up step, then one timed round per line on stdin, one JSON line each."""
    import torch

    from trainer.data import prompt_from_messages
    from trainer.policy.ppo import PPOConfig, make_rollout, train_ppo

    os.nice(niceness)
    torch.set_num_threads(threads)
    prompts = [prompt_from_messages(m) for m in sample_prompts(64, seed=0)]
    rollout = make_rollout(PPOConfig(), model, PPOConfig().lora_r)
    with tempfile.TemporaryDirectory() as work:
        train_ppo(model, reward_model, prompts, Path(work) / "warm-up", PPOConfig(steps=1), rollout=rollout)
        print("READY", flush=True)
        for _ in sys.stdin:
            started, history = time.monotonic(), []
            train_ppo(model, reward_model, prompts, Path(work) / "round", PPOConfig(steps=steps),
                      rollout=rollout, on_step=history.append)  # fmt: skip
            print(json.dumps({"round_s": time.monotonic() - started, "torch_threads": torch.get_num_threads(),
                              "step_s": [round(m["seconds"], 2) for m in history]}), flush=True)  # fmt: skip
    rollout.close()


class PacedLoad:
    """Chat requests at `rate` per second on average (Poisson arrivals), on a thread, until stopped."""

    def __init__(self, url: str, rate: float):
        self.url, self.rate = url, rate
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        prompts, rng, pending = sample_prompts(64, seed=7), random.Random(0), set()
        async with httpx.AsyncClient(timeout=300) as http:
            while not self._stop.is_set():
                task = asyncio.create_task(self._request(http, rng.choice(prompts)))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(rng.expovariate(self.rate))
            await asyncio.gather(*pending)

    async def _request(self, http: httpx.AsyncClient, messages: list) -> None:
        body = {"model": "bench", "messages": messages, "max_tokens": 32, "temperature": 1.0}
        started = time.perf_counter()
        try:
            (await http.post(f"{self.url}/v1/chat/completions", json=body)).raise_for_status()
            self.latencies.append(time.perf_counter() - started)
        except httpx.HTTPError:
            self.errors += 1

    def __enter__(self) -> PacedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        latencies = sorted(self.latencies) or [float("nan")]
        return {"requests": len(self.latencies), "errors": self.errors,
                "p50_ms": round(1000 * statistics.median(latencies)),
                "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))])}  # fmt: skip


class Trainer:
    """A trainer process of one variant, "THREADS[/NICE]", driven round by round."""

    def __init__(self, options, reward_model: Path, variant: str):
        threads, _, niceness = variant.partition("/")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--trainer", "--model", str(options.model), "--reward-model",
             str(reward_model), "--steps", str(options.steps), "--threads", threads, "--nice", niceness or "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            stderr=open(LOGS / f"trainer-{threads}-{niceness or 0}.log", "wb"),
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stdout], daemon=True).start()
        while self.lines.get(timeout=600).strip() != "READY":  # vLLM logs on stdout too
            pass

    def round(self, timeout_s: float) -> dict:
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return {"round_s": float("inf"), "timed_out_after_s": timeout_s}
            if line.startswith("{"):
                return json.loads(line)

    def close(self) -> None:
        self.process.kill()  # a timed-out round may still be running
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("RLHF_BASE_MODEL", "var/models/base")))
    parser.add_argument("--steps", type=int, default=4, help="PPO steps per timed round")
    parser.add_argument("--rate", type=float, default=3.0, help="serving requests per second under load")
    parser.add_argument("--repeats", type=int, default=2, help="idle and loaded rounds per variant")
    parser.add_argument("--variants", nargs="+", default=["2", "1", "1/10"], help="THREADS[/NICE] per trainer")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest timed round, in seconds")
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reward-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.trainer:
        return trainer(options.model, options.reward_model, options.steps, options.threads, options.nice)
    if not (options.model / "config.json").is_file():
        sys.exit(f"no model at {options.model}: run `make model` (or pass --model DIR)")

    from trainer.reward.reward_model import RewardModel, RewardModelConfig

    LOGS.mkdir(exist_ok=True)
    rounds: dict[tuple[str, str], list[dict]] = {}
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trainer-beside-serving-")))
        config = RewardModelConfig()
        RewardModel.create(options.model, config).save(work / "rm", config, {})
        env = dict(os.environ)
        if "KAFKA_BOOTSTRAP_SERVERS" not in env:
            env["KAFKA_BOOTSTRAP_SERVERS"] = stack.enter_context(LocalBroker()).bootstrap_servers
        port = free_port()
        env.update({"RLHF_BASE_MODEL": str(options.model), "SERVING_PORT": str(port),
                    "SERVING_SERVED_MODEL_NAME": "bench", "RLHF_REGISTRY_DIR": str(work / "registry"),
                    "RLHF_TOPIC_PREFIX": f"bench-{port}.", "SERVING_AUTH": "local"})  # fmt: skip
        serving = start_service(["serving"], env, log_file=open(LOGS / "serving.log", "wb"))
        stack.callback(stop_service, serving)
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{url}/healthz", serving, timeout_s=300)
        with PacedLoad(url, options.rate) as alone:
            time.sleep(4 * SETTLE_S)
        print("serving alone under load", json.dumps(alone.summary()), flush=True)

        for variant in options.variants:
            trainer_process = Trainer(options, work / "rm", variant)
            try:
                for mode in ("idle", "load") * options.repeats:
                    with PacedLoad(url, options.rate) if mode == "load" else nullcontext() as load:
                        time.sleep(SETTLE_S if load else 0)
                        result = trainer_process.round(options.timeout)
                    result |= {"serving": load.summary()} if load else {}
                    rounds.setdefault((variant, mode), []).append(result)
                    print(variant, mode, json.dumps(result), flush=True)
                    if "timed_out_after_s" in result:
                        break  # the trainer is still in that round: its next rounds would queue behind it
            finally:
                trainer_process.close()

    print(f"\nPPO rounds of {options.steps} steps (PPOConfig defaults), model {options.model}; load: "
          f"{options.rate} chat requests/s; serving alone under that load: p50/p99 "
          f"{alone.summary()['p50_ms']}/{alone.summary()['p99_ms']} ms\n")
    print(f"{'threads/nice':<13} {'idle s':>13} {'loaded s':>15} {'loaded/idle':>12}  serving p50/p99 ms in rounds")
    for variant in options.variants:
        idle, loaded = ([r["round_s"] for r in rounds.get((variant, mode), [])] for mode in ("idle", "load"))
        latency = ", ".join(f"{r['serving']['p50_ms']}/{r['serving']['p99_ms']}"
                            for r in rounds.get((variant, "load"), []))  # fmt: skip
        ratios = ", ".join(f"{b / a:.1f}" for a, b in zip(idle, loaded, strict=False))  # over the idle one before
        print(f"{variant:<13} {', '.join(f'{s:.1f}' for s in idle):>13} {', '.join(f'{s:.1f}' for s in loaded):>15} "
              f"{ratios:>12}  {latency}")


if __name__ == "__main__":
    main()
