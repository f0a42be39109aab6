"""What the demo reads from the stack (StackObserver against canned endpoint answers) and what it reports:
the verdict against the benchmark's bar, a one-screen summary, the plot."""

import asyncio
import json
import random

import httpx
import pytest

from bench.demo_report import build_results, plot, render_summary, verdict
from bench.hidden_preferences import PREFERENCES
from bench.pinned_eval import Measurement
from bench.simulated_users import UserLog
from bench.stack_observer import StackObserver, finished_rounds

TRAINER = "http://trainer/metrics"


def prometheus(version: int, kl: float) -> str:
    return (
        "# TYPE rlhf_trainer_policy_version gauge\n"
        f"rlhf_trainer_policy_version {version}\n"
        "# TYPE rlhf_trainer_last_round_metric gauge\n"
        f'rlhf_trainer_last_round_metric{{name="eval/kl"}} {kl}\n'
        'rlhf_trainer_last_round_metric{name="time/ppo_seconds"} 120.0\n'
        "# TYPE rlhf_trainer_rounds_total counter\n"
        f'rlhf_trainer_rounds_total{{status="published"}} {version}\n'
    )


def observe(states: list[dict]) -> StackObserver:
    """Poll once per state: {"versions": [(name, parent)], "current", "canary", "rolled_back", "trainer"}."""
    state = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            cards = [{"id": "rlhf-policy", "parent": None}] + [
                {"id": f"rlhf-policy@{name}", "parent": parent} for name, parent in state["versions"]]
            return httpx.Response(200, json={"data": cards})
        if request.url.path == "/v1/admin/policy":
            canary = state.get("canary")
            return httpx.Response(200, json={
                "current": state["current"], "candidate": None, "versions": [n for n, _ in state["versions"]],
                "canary": canary and {"version": canary, "baseline": state["current"], "figures": {"requests": 5}},
                "rolled_back": state.get("rolled_back", []), "gates": {"v1": ["pass kl 1.0 <= 20"]}})
        if str(request.url) == TRAINER:
            if "trainer" not in state:
                return httpx.Response(503)
            return httpx.Response(200, text=prometheus(*state["trainer"]))
        return httpx.Response(404)

    async def poll_all() -> StackObserver:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://serving") as http:
            observer = StackObserver(http, TRAINER)
            for t, s in enumerate(states):
                state.clear()
                state.update(s)
                await observer.poll(float(t))
            return observer

    return asyncio.run(poll_all())


def test_observer_follows_each_version_through_the_canary():
    v0 = [("v0", None)]
    observer = observe([
        {"versions": v0, "current": "v0"},
        {"versions": v0 + [("v1", "v0")], "current": "v0", "canary": "v1", "trainer": (1, 1.5)},
        {"versions": v0 + [("v1", "v0"), ("v2", "v1")], "current": "v0", "canary": "v2", "trainer": (2, 2.5)},
        {"versions": v0 + [("v1", "v0"), ("v2", "v1"), ("v3", "v2")], "current": "v2", "canary": "v3",
         "trainer": (3, 3.5)},
        {"versions": v0 + [("v1", "v0"), ("v2", "v1"), ("v3", "v2")], "current": "v2", "rolled_back": ["v3"],
         "trainer": (3, 3.5)},
    ])  # fmt: skip
    statuses = {name: record.status for name, record in observer.versions.items()}
    assert statuses == {"v0": "base", "v1": "superseded", "v2": "promoted", "v3": "rolled back"}
    assert [observer.versions[v].appeared_s for v in ("v1", "v2", "v3")] == [1.0, 2.0, 3.0]
    assert observer.versions["v1"].round_metrics == {"eval/kl": 1.5, "time/ppo_seconds": 120.0}
    assert observer.versions["v2"].round_metrics["eval/kl"] == 2.5
    assert observer.versions["v1"].gate == ["pass kl 1.0 <= 20"]
    assert observer.versions["v3"].canary_figures == {"requests": 5}
    assert observer.rounds_by_status == {"published": 3.0}


def test_observer_waits_for_the_trainer_metrics():
    observer = observe([{"versions": [("v0", None)], "current": "v0"}])
    assert observer.trainer_metrics_error is not None and observer.rounds_by_status == {}


def test_finished_rounds_come_from_the_trainer_log_lines(tmp_path):
    log = tmp_path / "stack.log"
    loop = {"logger": "trainer.loop"}
    lines = ["INFO some vLLM line",
             json.dumps({**loop, "event": "policy.rejected", "round": 1, "gate": ["fail kl 30 > 20", "pass judge"]}),
             json.dumps({**loop, "event": "round.finished", "round": 1, "status": "rejected", "version": None,
                         "seconds": 300.5, "metrics": {"eval/kl": 30.0}}),
             '{"logger": "trainer.loop", "event": "round.finished", broken',
             json.dumps({**loop, "event": "round.started", "round": 2}),
             json.dumps({**loop, "event": "round.finished", "round": 2, "status": "published", "version": "v1",
                         "seconds": 200.0, "metrics": {}})]  # fmt: skip
    log.write_text("\n".join(lines))
    rounds = finished_rounds(log)
    assert [(r["round"], r["status"], r["version"], r["seconds"], r["gate_failures"]) for r in rounds] == [
        (1, "rejected", None, 300.5, ["fail kl 30 > 20"]), (2, "published", "v1", 200.0, [])]
    assert finished_rounds(tmp_path / "missing.log") == []


def measurement(version: str, rates: list[float], seed: int) -> Measurement:
    rng = random.Random(seed)
    satisfied = [[rng.random() < p for _ in range(2)] for p in rates]
    return Measurement(version, satisfied, [["answer"] * 2 for _ in rates], truncated=0)


def results_for(v2_status: str, gain: float) -> dict:
    observer = observe([{"versions": [("v0", None), ("v1", "v0"), ("v2", "v1")], "current": "v0",
                         "trainer": (2, 2.0)}])  # fmt: skip
    observer.versions["v1"].status = "rolled back"
    observer.versions["v2"].status = v2_status
    base = [random.Random(i).uniform(0.2, 0.6) for i in range(100)]
    measurements = {
        "v0": measurement("v0", base, 0),
        "v1": measurement("v1", [p - 0.2 for p in base], 1),
        "v2": measurement("v2", [p + gain for p in base], 2),
    }
    users = UserLog(requests=10)
    users.feedback = [{"type": "thumbs", "versions": ["v0"], "up": up} for up in (True, False, False)]
    users.served = [{"version": "v0", "satisfied": True}]
    rounds = [{"round": 1, "status": "rejected", "version": None, "seconds": 90.0, "gate_failures": ["fail judge"],
               "metrics": {}},
              {"round": 2, "status": "published", "version": "v2", "seconds": 80.0, "gate_failures": [],
               "metrics": {"time/ppo_seconds": 60.0, "eval/kl": 2.0}}]  # fmt: skip
    return build_results(PREFERENCES["length"], 3.0, {}, users, 60.0, observer, measurements, rounds)


def test_the_bar_is_met_only_by_a_promoted_version_clearly_better_than_v0():
    met = results_for("promoted", gain=0.35)
    assert met["verdict"]["newest_promoted"] == "v2" and met["verdict"]["beats_v0"]
    assert met["verdict"]["difference"] == pytest.approx(0.35, abs=0.1) and met["verdict"]["z"] >= 2
    assert not results_for("promoted", gain=0.0)["verdict"]["beats_v0"]
    unpromoted = results_for("canary", gain=0.35)["verdict"]
    assert unpromoted["newest_promoted"] is None and not unpromoted["beats_v0"]
    assert unpromoted["newest_measured"]["name"] == "v2" and unpromoted["newest_measured"]["status"] == "canary"
    versions = met["versions"]
    assert versions[1]["vs_parent"]["z"] < -2 and versions[2]["vs_parent"]["difference"] > 0.4
    assert versions[0]["vs_v0"] is None and versions[2]["round_seconds"] == 80.0
    assert versions[0]["thumbs_up"]["n"] == 3 and versions[0]["thumbs_up"]["value"] == pytest.approx(1 / 3)
    json.dumps(met)  # results.json


def test_a_promoted_version_worse_than_its_parent_is_named():
    rows = [{"name": "v1", "status": "promoted", "vs_parent": {"difference": -0.2, "z": -3.0, "questions": 100},
             "vs_v0": {"difference": -0.2, "z": -3.0, "questions": 100}}]  # fmt: skip
    assert verdict(rows)["promoted_worse_than_parent"] == ["v1"]


def test_summary_fits_one_screen_and_the_plot_is_written(tmp_path):
    results = results_for("promoted", gain=0.35)
    summary = render_summary(results)
    assert len(summary.splitlines()) <= 24 and max(map(len, summary.splitlines())) <= 160
    assert "MEETS" in summary and "rolled back" in summary
    assert "trainer rounds: 2 (published 1, rejected 1; Prometheus: published 2)" in summary
    assert "seconds per round: 90 80 (median 85, max 90)" in summary
    assert "gate failures: fail judge x1; last: fail judge" in summary
    assert "promoted          80  ppo 120" in summary  # v2's row: round seconds, stage times
    unpromoted = render_summary(results_for("canary", gain=0.35))
    assert "no version was promoted" in unpromoted and "newest measured v2 (canary): +0.3" in unpromoted
    pytest.importorskip("matplotlib")  # the demo's optional dependencies (pip install -e '.[demo]')
    plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
