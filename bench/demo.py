"""The learning benchmark: the whole loop on this machine, through the public HTTP API only.

    python bench/demo.py --preference length --minutes 5      (`make demo` runs every preference, 30 min)

Starts the stack as `make up` does (bench/demo_stack.py; shipped defaults, a fresh var/demo-<preference>/),
measures v0 on pinned requests (bench/pinned_eval.py), then lets simulated users with the hidden
preference chat and give feedback for --minutes (bench/simulated_users.py) while it watches for new
versions (bench/stack_observer.py) and measures each as it appears; at the end it measures any version
not yet measured, prints a one-screen summary and writes, under var/demo-<preference>/:

    results.json   every figure (bench/demo_report.py says where each comes from)
    plot.png       preference rate and thumbs-up rate per version, with 95% intervals
    answers.jsonl  every pinned answer, with whether it satisfied the preference
    users.jsonl    every answer the users got and every piece of feedback they sent
    stack.log      the stack's output (trainer rounds as JSON lines)

The stack is stopped (SIGTERM to its launcher) however the run ends, Ctrl-C included. Exit code 0 when
the run completed (whether or not the loop met the benchmark's bar: the summary says), 1 on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.demo_report import build_results, clock, plot, render_summary  # noqa: E402
from bench.demo_stack import DemoStack  # noqa: E402
from bench.hidden_preferences import PREFERENCES, HiddenPreference  # noqa: E402
from bench.pinned_eval import EvalConfig, Measurement, evaluation_questions, measure_version  # noqa: E402
from bench.simulated_users import SimulatedUsers, UserConfig  # noqa: E402
from bench.stack_observer import BASE, StackObserver, finished_rounds  # noqa: E402

POLL_S = 5.0  # how often serving's and the trainer's endpoints are read during the run


async def wait_ready(stack: DemoStack) -> None:
    with tqdm(desc="starting the stack (make up)", unit="s", bar_format="{desc}: {elapsed}") as bar:
        ready = asyncio.create_task(asyncio.to_thread(stack.wait_ready))
        while not ready.done():
            await asyncio.sleep(1)
            bar.update(1)
        ready.result()


class Measurer:
    """Measures versions one at a time, in the order they are queued, each with a progress bar."""

    def __init__(self, http: httpx.AsyncClient, preference: HiddenPreference, config: EvalConfig):
        self.http, self.preference, self.config = http, preference, config
        self.questions = evaluation_questions(preference, config)
        self.results: dict[str, Measurement] = {}
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    async def measure(self, version: str) -> None:
        total = len(self.questions) * self.config.answers_per_question
        with tqdm(total=total, desc=f"measuring {version} (pinned)", unit="answer", position=1, leave=False) as bar:
            self.results[version] = await measure_version(self.http, version, self.questions, self.preference,
                                                          self.config, on_answers=bar.update)
        rate = sum(map(sum, self.results[version].satisfied)) / total
        tqdm.write(f"{version}: preference rate {rate:.2f} on {total} pinned answers")

    async def work(self) -> None:
        while True:
            version = await self.queue.get()
            try:
                await self.measure(version)
            finally:
                self.queue.task_done()


async def run(stack: DemoStack, preference: HiddenPreference, minutes: float, users_config: UserConfig,
              eval_config: EvalConfig, directory: Path) -> dict:
    await wait_ready(stack)
    async with httpx.AsyncClient(base_url=stack.serving_url, timeout=httpx.Timeout(600, connect=10)) as http:
        observer = StackObserver(http, stack.trainer_metrics_url)
        measurer = Measurer(http, preference, eval_config)
        await observer.poll(0.0)
        await measurer.measure(BASE)

        users = SimulatedUsers(http, preference, users_config)
        stop = asyncio.Event()
        users_task = asyncio.create_task(users.run(stop))
        measuring = asyncio.create_task(measurer.work())
        started = time.monotonic()
        try:
            with tqdm(total=round(minutes * 60), desc="simulated users", unit="s", position=0) as bar:
                while (elapsed := time.monotonic() - started) < minutes * 60:
                    stack.check_alive()
                    for failed in (users_task, measuring):
                        if failed.done():
                            failed.result()  # raises what stopped it
                    for version in await observer.poll(elapsed):
                        tqdm.write(f"{clock(elapsed)} new version {version} (parent {observer.versions[version].parent})")
                        measurer.queue.put_nowait(version)
                    bar.n = min(round(elapsed), bar.total)
                    bar.set_postfix(requests=users.log.requests, feedback=len(users.log.feedback),
                                    current=observer.current, versions=len(observer.versions))
                    await asyncio.sleep(POLL_S)
                bar.n = bar.total
                bar.refresh()
            stop.set()
            await users_task
            users_seconds = time.monotonic() - started
            # The trainer may still publish from the users' last feedback (a round needs new feedback, so
            # this ends): every version seen before the last measurement ends is measured too.
            while True:
                await measurer.queue.join()
                if measuring.done():
                    measuring.result()  # raises what stopped a measurement
                new = await observer.poll(time.monotonic() - started)
                if not new:
                    break
                for version in new:
                    tqdm.write(f"{clock(time.monotonic() - started)} new version {version} (after the users)")
                    measurer.queue.put_nowait(version)
        finally:
            stop.set()
            measuring.cancel()
            users_task.cancel()

    rounds = finished_rounds(stack.log_path)
    configs = {"users": dataclasses.asdict(users_config), "eval": dataclasses.asdict(eval_config)}
    results = build_results(preference, minutes, configs, users.log, users_seconds, observer,
                            measurer.results, rounds)
    _write_jsonl(directory / "answers.jsonl", [
        {"version": m.version, "question": i, "messages": measurer.questions[i], "answer": answer, "satisfied": ok}
        for m in measurer.results.values() for i, (answers, oks) in enumerate(zip(m.answers, m.satisfied, strict=True))
        for answer, ok in zip(answers, oks, strict=True)
    ])  # fmt: skip
    _write_jsonl(directory / "users.jsonl", users.log.records())
    return results


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preference", choices=sorted(PREFERENCES), required=True,
                        help="the users' hidden preference: " + "; ".join(
                            f"{p.name} ({p.kind}): {p.description}" for p in PREFERENCES.values()))
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the users chat (default 30)")
    parser.add_argument("--users", type=int, default=UserConfig.users, help="simulated users")
    parser.add_argument("--rate", type=float, default=UserConfig.requests_per_s,
                        help="requests per second of all users together, at most")
    parser.add_argument("--questions", type=int, default=EvalConfig.questions,
                        help="held-out questions each version is measured on")
    parser.add_argument("--answers-per-question", type=int, default=EvalConfig.answers_per_question)
    parser.add_argument("--seed", type=int, default=0, help="seed of the users and of the evaluation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preference = PREFERENCES[args.preference]
    users_config = UserConfig(users=args.users, requests_per_s=args.rate, seed=args.seed)
    eval_config = EvalConfig(questions=args.questions, answers_per_question=args.answers_per_question,
                             seed=args.seed)
    directory = ROOT / "var" / f"demo-{preference.name}"
    shutil.rmtree(directory, ignore_errors=True)  # a fresh registry, store and log: each run starts at v0
    directory.mkdir(parents=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops the stack as Ctrl-C does
    try:
        with DemoStack(directory) as stack:
            results = asyncio.run(run(stack, preference, args.minutes, users_config, eval_config, directory))
            tqdm.write("stopping the stack")
    except KeyboardInterrupt:
        print("interrupted: the stack is stopped", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"demo failed (the stack's output: {directory / 'stack.log'})", file=sys.stderr)
        return 1
    (directory / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, directory / "plot.png")
    print(render_summary(results))
    print(f"\nfigures: {directory / 'results.json'}\nplot: {directory / 'plot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
