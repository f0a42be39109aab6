"""Closed-loop load against this server and against vLLM's own OpenAI server, one after the other, on the
same model and engine settings; prints requests/s, tokens/s and p50/p99 latency of each and the ratios.

    python bench/serving_bench.py [--model DIR] [--concurrency 16] [--requests 300] [--max-tokens 32]

This server runs with completion logging to Kafka on (the embedded broker, or KAFKA_BOOTSTRAP_SERVERS).
Both engines get the same LoRA settings, since this server always runs with runtime LoRA for hot swaps.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.vllm_cpu import prepare_cpu_engine  # noqa: E402
from deploy.local import start_service, stop_service, wait_http_ok  # noqa: E402
from deploy.local_broker import LocalBroker, free_port  # noqa: E402
from trainer.data.corpus import sample_prompts  # noqa: E402

MAX_MODEL_LEN, MAX_LORAS, MAX_LORA_RANK = 512, 4, 16


async def closed_loop(url: str, model: str, prompts: list, concurrency: int, total: int, max_tokens: int,
                      stream: bool) -> dict:
    latencies, tokens, errors = [], 0, 0
    issued = 0

    async def client_loop(http: httpx.AsyncClient):
        nonlocal issued, tokens, errors
        while issued < total:
            messages = prompts[issued % len(prompts)]
            issued += 1
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
            started = time.perf_counter()
            try:
                if stream:
                    body.update(stream=True, stream_options={"include_usage": True})
                    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                        response.raise_for_status()
                        async for line in response.aiter_lines():
                            if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                                tokens += httpx.Response(200, content=line[6:]).json()["usage"]["completion_tokens"]
                else:
                    response = await http.post(f"{url}/v1/chat/completions", json=body)
                    response.raise_for_status()
                    tokens += response.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - started)
            except httpx.HTTPError:
                errors += 1

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests/s": len(latencies) / elapsed,
        "tokens/s": tokens / elapsed,
        "p50 ms": 1000 * statistics.median(latencies),
        "p99 ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "errors": errors,
    }


def run_server(name: str, args: list[str], env: dict, port: int, load) -> dict[str, dict]:
    log = open(Path(tempfile.gettempdir()) / f"bench-{name}.log", "wb")
    process = start_service(args, env, log_file=log)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health" if name == "vllm" else f"http://127.0.0.1:{port}/healthz",
                     process, timeout_s=300)
        return load(f"http://127.0.0.1:{port}")
    finally:
        stop_service(process)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=os.environ.get("RLHF_BASE_MODEL", "var/models/base"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=32)
    options = parser.parse_args()
    if not (Path(options.model) / "config.json").is_file():
        sys.exit(f"no model at {options.model}: run `make model` (or pass --model DIR)")
    prompts = sample_prompts(64, seed=3)
    prepare_cpu_engine(kv_cache_gib=1)  # both servers get the CPU backend's environment serving sets itself
    env = dict(os.environ)

    def load(model: str):
        def run(url: str) -> dict[str, dict]:
            asyncio.run(closed_loop(url, model, prompts, options.concurrency, 32, options.max_tokens, False))  # warm-up
            return {mode: asyncio.run(closed_loop(url, model, prompts, options.concurrency, options.requests,
                                                  options.max_tokens, mode == "stream"))
                    for mode in ("non-stream", "stream")}
        return run

    results = {}
    with ExitStack() as stack:
        if "KAFKA_BOOTSTRAP_SERVERS" not in env:
            env["KAFKA_BOOTSTRAP_SERVERS"] = stack.enter_context(LocalBroker()).bootstrap_servers
        port = free_port()
        results["vllm"] = run_server("vllm", [
            "vllm.entrypoints.openai.api_server", "--model", options.model, "--served-model-name", "bench",
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--port", str(port), "--enable-lora",
            "--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK),
        ], env, port, load("bench"))
        port = free_port()
        ours_env = {**env, "RLHF_BASE_MODEL": options.model, "SERVING_PORT": str(port),
                    "SERVING_SERVED_MODEL_NAME": "bench", "SERVING_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
                    "SERVING_MAX_LORAS": str(MAX_LORAS), "SERVING_MAX_LORA_RANK": str(MAX_LORA_RANK),
                    "RLHF_REGISTRY_DIR": tempfile.mkdtemp(prefix="bench-registry-"),
                    "RLHF_TOPIC_PREFIX": f"bench-{port}.", "SERVING_AUTH": "local"}
        results["this server"] = run_server("ours", ["serving"], ours_env, port, load("bench"))

    print(f"\n{options.concurrency} concurrent clients, {options.requests} requests of up to {options.max_tokens} "
          f"tokens, greedy; model {options.model}\n")
    print(f"{'mode':<11} {'server':<12} {'requests/s':>10} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for mode in ("non-stream", "stream"):
        for server in ("vllm", "this server"):
            r = results[server][mode]
            print(f"{mode:<11} {server:<12} {r['requests/s']:>10.1f} {r['tokens/s']:>9.0f} {r['p50 ms']:>8.0f} "
                  f"{r['p99 ms']:>8.0f} {r['errors']:>6}")
        ours, theirs = results["this server"][mode], results["vllm"][mode]
        print(f"{mode:<11} {'ratio':<12} {ours['requests/s'] / theirs['requests/s']:>10.2f} "
              f"{ours['tokens/s'] / theirs['tokens/s']:>9.2f}\n")


if __name__ == "__main__":
    main()
