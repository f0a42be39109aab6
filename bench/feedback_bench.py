"""Feedback through HTTP against a bare kafka-python producer: same broker, same run, both acks=all.

    python bench/feedback_bench.py [--concurrency 64] [--events 20000] [--batch 100] [--completions 200]

HTTP: the serving app with its real event log and spool, under uvicorn in a process of its own, with a fake
engine (only feedback is measured; the completions it rates come from the app's chat endpoint). Closed
loop: `--concurrency` clients (aiohttp), each posting a thumbs rating and waiting for its 202 before the next;
then the same through the batch endpoint (`--batch` thumbs a request, `--batch-concurrency` clients), as an
app that buffers its users' feedback would send it.
Bare producer, twice: sending everything at once and flushing (its ceiling), and closed loop with as many
events in flight as the HTTP path has clients (each acknowledgement sends the next). Afterwards each topic is
read to its end and counted by event id: lost (accepted, never arrived) and duplicated events.

The load generator, the server and the broker share this machine's cores: the figures are for all three.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.kafka import ensure_topics, make_producer, wait_for_broker  # noqa: E402
from common.settings import SharedSettings  # noqa: E402
from deploy.local import start_service, stop_service, wait_http_ok  # noqa: E402
from deploy.local_broker import LocalBroker, free_port  # noqa: E402
from feedback import FeedbackEvent, parse_feedback  # noqa: E402
from tests.feedback.topics import whole_topic  # noqa: E402

GOAL = {"events/s": 2000, "p99 ms": 50, "ratio": 0.5}


def serve() -> None:
    """The server process: the serving app on a fake engine, configured from the environment."""
    import uvicorn

    from serving.app import build_app
    from serving.event_log import KafkaEventLog
    from serving.settings import ServingSettings
    from tests.serving.fakes import FakeEngine

    settings = ServingSettings()
    app = build_app(settings, FakeEngine, lambda: KafkaEventLog.from_settings(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")  # no access log


def summary(latencies: list[float], elapsed: float) -> dict:
    if not latencies:
        return {"events/s": 0.0, "p50 ms": float("nan"), "p99 ms": float("nan")}
    latencies = sorted(latencies)
    return {"events/s": len(latencies) / elapsed, "p50 ms": 1000 * statistics.median(latencies),
            "p99 ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


async def http_load(url: str, completion_ids: list[str], concurrency: int, total: int,
                    batch: int = 1) -> tuple[dict, list[str]]:
    """Closed loop: `concurrency` clients, each posting one thumbs (batch 1: POST /v1/feedback) or `batch` of
    them (POST /v1/feedback/batch) and waiting for the answer; an event's latency is its request's."""
    latencies, accepted, refused = [], [], Counter()
    issued = 0

    def thumbs() -> dict:
        nonlocal issued
        issued += 1
        return {"type": "thumbs", "completion_id": completion_ids[issued % len(completion_ids)], "rating": "up"}

    async def client(http: aiohttp.ClientSession) -> None:
        while issued < total:
            items = [thumbs() for _ in range(min(batch, total - issued))]
            path, body = ("/v1/feedback", items[0]) if batch == 1 else ("/v1/feedback/batch", {"feedback": items})
            started = time.perf_counter()
            try:
                async with http.post(f"{url}{path}", json=body) as response:
                    answer = await response.json()
            except aiohttp.ClientError as exc:
                refused[type(exc).__name__] += len(items)
                continue
            took = time.perf_counter() - started
            results = [{**answer, "status": response.status}] if batch == 1 else answer.get("data", [])
            for result in results:
                if result["status"] == 202:
                    latencies.append(took)
                    accepted.append(result["id"])
                else:
                    refused[result["status"]] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {**summary(latencies, elapsed), "refused": dict(refused)}, accepted


def serve_completions(url: str, count: int) -> list[str]:
    async def run() -> list[str]:
        async with aiohttp.ClientSession() as http:
            ids = []
            for i in range(count):
                body = {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 2}
                async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                    ids.append((await response.json())["id"])
            return ids

    return asyncio.run(run())


def bare_events(completion_ids: list[str], total: int) -> list[tuple[str, str, str]]:
    """(key, value, event id) of `total` thumbs events, serialized before any timing starts."""
    events = []
    for i in range(total):
        completion_id = completion_ids[i % len(completion_ids)]
        event = FeedbackEvent(feedback=parse_feedback({"type": "thumbs", "completion_id": completion_id,
                                                       "rating": "up"}))
        events.append((completion_id, event.model_dump_json(), event.event_id))
    return events


def bare_blast(settings: SharedSettings, events: list[tuple[str, str, str]]) -> tuple[dict, list[str]]:
    """Every event sent at once, then a flush: the producer's ceiling (latency includes the queue)."""
    producer = make_producer(settings)
    latencies, accepted = [], []

    def acked(started: float, event_id: str, _metadata) -> None:
        latencies.append(time.perf_counter() - started)
        accepted.append(event_id)

    started = time.perf_counter()
    for key, value, event_id in events:
        producer.send(settings.feedback_topic, key=key, value=value).add_callback(
            acked, time.perf_counter(), event_id)
    producer.flush()
    elapsed = time.perf_counter() - started
    producer.close()
    return summary(latencies, elapsed), accepted


def bare_closed_loop(settings: SharedSettings, events: list[tuple[str, str, str]],
                     in_flight: int) -> tuple[dict, list[str]]:
    """`in_flight` events outstanding at all times: each acknowledgement sends the next."""
    producer = make_producer(settings)
    latencies, accepted = [], []
    remaining, lock, done = iter(events), threading.Lock(), threading.Event()
    outstanding = 0

    def send_next() -> None:
        nonlocal outstanding
        with lock:
            event = next(remaining, None)
            if event is None:
                if outstanding == 0:
                    done.set()
                return
            outstanding += 1
        key, value, event_id = event
        producer.send(settings.feedback_topic, key=key, value=value).add_callback(
            acked, time.perf_counter(), event_id)

    def acked(started: float, event_id: str, _metadata) -> None:
        nonlocal outstanding
        latencies.append(time.perf_counter() - started)
        accepted.append(event_id)
        with lock:
            outstanding -= 1
        send_next()

    started = time.perf_counter()
    for _ in range(in_flight):
        send_next()
    done.wait()
    elapsed = time.perf_counter() - started
    producer.close()
    return summary(latencies, elapsed), accepted


def arrivals(settings: SharedSettings, accepted: list[str]) -> dict:
    """Read the feedback topic to its end: accepted events that never arrived, and extra copies of accepted ones
    (the batch path shares the single path's topic)."""
    seen = Counter(FeedbackEvent.model_validate_json(record.value).event_id
                   for batch in whole_topic(settings, settings.feedback_topic).values() for record in batch)
    return {"accepted": len(accepted), "arrived": len(set(accepted) & set(seen)),
            "lost": len(set(accepted) - set(seen)), "duplicates": sum(seen[event_id] - 1 for event_id in set(accepted) if seen[event_id] > 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--events", type=int, default=20_000, help="measured events per path")
    parser.add_argument("--batch", type=int, default=100, help="events per request on the batch path")
    parser.add_argument("--batch-concurrency", type=int, default=3,
                        help="clients on the batch path (3 keep these 2 cores busy; 4 only queue: p99 +20 ms)")
    parser.add_argument("--completions", type=int, default=200, help="completions served, then rated")
    parser.add_argument("--warmup", type=int, default=1_000, help="HTTP feedback before the measured run")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0

    broker = None
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not servers:
        broker = LocalBroker().start()
        servers = broker.bootstrap_servers
    run = secrets.token_hex(4)
    http_topics = SharedSettings(kafka_bootstrap_servers=servers, topic_prefix=f"bench-{run}-http.")
    blast_topics = SharedSettings(kafka_bootstrap_servers=servers, topic_prefix=f"bench-{run}-blast.")
    loop_topics = SharedSettings(kafka_bootstrap_servers=servers, topic_prefix=f"bench-{run}-loop.")
    wait_for_broker(http_topics)
    for topics in (blast_topics, loop_topics):
        ensure_topics(topics, [topics.feedback_topic])
    port, work = free_port(), Path(tempfile.mkdtemp(prefix="feedback-bench-"))
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": servers, "RLHF_TOPIC_PREFIX": http_topics.topic_prefix,
           "RLHF_REGISTRY_DIR": str(work / "registry"), "SERVING_PORT": str(port),
           "SERVING_SPOOL_DIR": str(work / "spool"), "SERVING_COMPLETION_KEY": secrets.token_hex(32),
           "SERVING_AUTH": "local"}  # otherwise serving's defaults, as `make up` runs it
    server = start_service(["bench.feedback_bench", "--serve"], env, log_file=open(work / "server.log", "wb"))
    results = {}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{url}/healthz", server, timeout_s=120)
        completion_ids = serve_completions(url, args.completions)
        _, warmup = asyncio.run(http_load(url, completion_ids, args.concurrency, args.warmup))
        figures, accepted = asyncio.run(http_load(url, completion_ids, args.concurrency, args.events))
        results["HTTP, serving app"] = {**figures, **arrivals(http_topics, warmup + accepted)}
        figures, batched = asyncio.run(http_load(url, completion_ids, args.batch_concurrency, args.events,
                                                 batch=args.batch))
        results[f"HTTP batch of {args.batch}"] = {**figures, **arrivals(http_topics, batched)}
    finally:
        stop_service(server)
    events = bare_events(completion_ids, 2 * args.events)
    figures, accepted = bare_blast(blast_topics, events[:args.events])
    blast = results["bare producer, all at once"] = {**figures, **arrivals(blast_topics, accepted)}
    figures, accepted = bare_closed_loop(loop_topics, events[args.events:], args.concurrency)
    results[f"bare producer, {args.concurrency} in flight"] = {**figures, **arrivals(loop_topics, accepted)}
    if broker:
        broker.stop()

    print(f"feedback events, {args.concurrency} concurrent, {args.events} measured per path, acks=all; "
          f"load generator, server and broker on the same {os.cpu_count()} cores")
    print(f"{'path':32} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'accepted':>9} {'arrived':>8} {'lost':>5} "
          f"{'dup':>4}  refused")
    for name, r in results.items():
        print(f"{name:32} {r['events/s']:9.0f} {r['p50 ms']:8.1f} {r['p99 ms']:8.1f} {r['accepted']:9d} "
              f"{r['arrived']:8d} {r['lost']:5d} {r['duplicates']:4d}  {r.get('refused', '')}")
    closed = results[f"bare producer, {args.concurrency} in flight"]
    print(f"goal: >= {GOAL['events/s']} events/s, p99 < {GOAL['p99 ms']} ms, none lost, >= {GOAL['ratio']}x the "
          "bare producer (all at once, its ceiling)")
    for name in ("HTTP, serving app", f"HTTP batch of {args.batch}"):
        http = results[name]
        ratio = http["events/s"] / blast["events/s"]
        checks = {"events/s": http["events/s"] >= GOAL["events/s"], "p99": http["p99 ms"] < GOAL["p99 ms"],
                  "none lost": http["lost"] == 0, "ratio": ratio >= GOAL["ratio"]}
        missed = [check for check, ok in checks.items() if not ok]
        print(f"{name}: {ratio:.2f}x the bare producer all at once, {http['events/s'] / closed['events/s']:.2f}x "
              f"with {args.concurrency} in flight; goal {'met' if not missed else 'not met: ' + ', '.join(missed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
