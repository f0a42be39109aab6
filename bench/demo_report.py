"""The learning benchmark's figures: one JSON-ready dict, a one-screen summary, and a plot across versions."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter

from bench.demo_stats import clustered_rate, paired_comparison, proportion
from bench.hidden_preferences import HiddenPreference
from bench.pinned_eval import Measurement
from bench.simulated_users import UserLog
from bench.stack_observer import BASE, StackObserver

# The benchmark's bar (issue 13): the newest promoted version beats v0 by this much, with this z.
MIN_GAIN, MIN_Z = 0.15, 2.0

SOURCES = {
    "preference_rate": "pinned requests (model rlhf-policy@vN) on the fixed held-out questions; 95% Wilson "
                       "interval on the effective sample size (clustered by question)",
    "thumbs_up": "the simulated users' thumbs on answers of unpinned requests, by the version that wrote "
                 "them (x-policy-version / policy_version); 95% Wilson interval",
    "served_satisfied": "share of the unpinned answers users got that satisfied their hidden preference",
    "kl": "round metric eval/kl (the gate's KL to the reference, nats per answer), from the trainer's "
          "Prometheus endpoint (rlhf_trainer_last_round_metric)",
    "stage_seconds": "round metrics time/* from the trainer's Prometheus endpoint (per version) and from its "
                     "round.finished log line (per round, in trainer.rounds)",
    "round_seconds": "the trainer's round.finished log line (stack.log)",
    "gate_failures": "the gate's failed checks of a rejected round: the trainer's policy.rejected log line",
    "status": "GET /v1/admin/policy, polled (canary, promoted, rolled back, superseded)",
    "comparisons": "paired z-test over questions, same questions and request seeds for both versions",
}  # fmt: skip


def build_results(
    preference: HiddenPreference,
    minutes: float,
    configs: dict[str, dict],
    users: UserLog,
    users_seconds: float,
    observer: StackObserver,
    measurements: dict[str, Measurement],
    rounds: list[dict],
) -> dict:
    thumbs = users.thumbs_by_version()
    served = users.satisfied_by_version()
    round_seconds = {r["version"]: r["seconds"] for r in rounds if r.get("version")}
    versions = []
    for name, record in sorted(observer.versions.items(), key=lambda item: int(item[0][1:])):
        measured = measurements.get(name)
        parent = measurements.get(record.parent or "")
        entry = {
            **dataclasses.asdict(record),
            "preference_rate": clustered_rate(measured.satisfied).as_dict() if measured else None,
            "truncated": measured.truncated if measured else None,
            "thumbs_up": proportion(thumbs.get(name, [])).as_dict(),
            "served_satisfied": proportion(served.get(name, [])).as_dict(),
            "kl": record.round_metrics.get("eval/kl"),
            "stage_seconds": {k: v for k, v in record.round_metrics.items() if k.startswith("time/")},
            "round_seconds": round_seconds.get(name),
            "vs_parent": _compare(measured, parent),
            "vs_v0": _compare(measured, measurements.get(BASE)) if name != BASE else None,
        }
        versions.append(entry)
    return {
        "preference": {"name": preference.name, "kind": preference.kind, "description": preference.description},
        "minutes": minutes,
        "config": configs,
        "users": {
            "seconds": users_seconds,
            "requests": users.requests,
            "requests_per_s": users.requests / users_seconds if users_seconds else 0.0,
            "feedback": dict(users.feedback_counts()),
            "errors": dict(users.errors),
        },
        "trainer": {"rounds_by_status": observer.rounds_by_status, "rounds": rounds,
                    "metrics_error": observer.trainer_metrics_error},
        "final_current": observer.current,
        "versions": versions,
        "verdict": verdict(versions),
        "sources": SOURCES,
    }


def _compare(new: Measurement | None, old: Measurement | None) -> dict | None:
    if new is None or old is None:
        return None
    return dataclasses.asdict(paired_comparison(new.satisfied, old.satisfied))


def verdict(versions: list[dict]) -> dict:
    """Does the newest promoted version beat v0 by MIN_GAIN with z >= MIN_Z? Is any promoted version
    measurably worse than its parent (z <= -MIN_Z)? And how the newest measured version, whatever its
    status, compares with v0."""
    promoted = [v for v in versions if v["status"] == "promoted" and v["vs_v0"]]
    worse = [v["name"] for v in versions if v["status"] == "promoted" and v["vs_parent"]
             and v["vs_parent"]["z"] <= -MIN_Z]  # fmt: skip
    measured = [v for v in versions if v["vs_v0"]]
    newest_measured = measured and {"name": measured[-1]["name"], "status": measured[-1]["status"],
                                    **measured[-1]["vs_v0"]}  # fmt: skip
    result = {"criterion": f"newest promoted version - v0 >= {MIN_GAIN} with paired z >= {MIN_Z}",
              "promoted_worse_than_parent": worse, "newest_measured": newest_measured or None}
    if not promoted:
        return {**result, "newest_promoted": None, "beats_v0": False}
    newest = promoted[-1]
    gain, z = newest["vs_v0"]["difference"], newest["vs_v0"]["z"]
    return {**result, "newest_promoted": newest["name"], "difference": gain, "z": z,
            "beats_v0": gain >= MIN_GAIN and z >= MIN_Z}


def _rate(rate: dict | None) -> str:
    if not rate or rate["n"] == 0:
        return "-"
    return f"{rate['value']:.2f} [{rate['low']:.2f}, {rate['high']:.2f}]"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _comparison(comparison: dict | None) -> str:
    return f"{comparison['difference']:+.2f} z {comparison['z']:.1f}" if comparison else "-"


def _round_lines(trainer: dict, shown: int = 12) -> list[str]:
    """Rounds in a few lines: how many of each status, their durations, and why the gate rejected them."""
    rounds = trainer["rounds"]
    counts = Counter(r["status"] for r in rounds)
    prometheus = ", ".join(f"{status} {n:g}" for status, n in sorted(trainer["rounds_by_status"].items()))
    lines = [f"trainer rounds: {len(rounds)} ({', '.join(f'{s} {n}' for s, n in sorted(counts.items())) or 'none'}; "
             f"Prometheus: {prometheus or 'none'})"]  # fmt: skip
    if rounds:
        seconds = [r["seconds"] for r in rounds]
        durations = " ".join(f"{s:.0f}" for s in seconds[:shown]) + (" ..." if len(seconds) > shown else "")
        lines.append(f"  seconds per round: {durations} (median {statistics.median(seconds):.0f}, max {max(seconds):.0f})")
    failures = Counter(reason.split(":")[0] for r in rounds for reason in r.get("gate_failures", []))
    if failures:
        last = next(r["gate_failures"] for r in reversed(rounds) if r.get("gate_failures"))
        lines.append(f"  gate failures: {', '.join(f'{check} x{n}' for check, n in failures.items())}; "
                     f"last: {'; '.join(last)}")
    return lines


def _stages(stage_seconds: dict[str, float]) -> str:
    """time/reward_model_seconds 61.2 -> 'reward_model 61'."""
    return " ".join(f"{k.removeprefix('time/').removesuffix('_seconds')} {v:.0f}" for k, v in stage_seconds.items())


def render_summary(results: dict) -> str:
    preference, users, trainer = results["preference"], results["users"], results["trainer"]
    feedback = users["feedback"]
    lines = [
        f"Learning benchmark: preference '{preference['name']}' ({preference['kind']}: {preference['description']}),"
        f" {results['minutes']:g} min of users",
        f"users: {users['requests']} requests ({users['requests_per_s']:.2f}/s), {sum(feedback.values())} feedback "
        f"({', '.join(f'{k} {v}' for k, v in sorted(feedback.items())) or 'none'}), "
        f"errors {sum(users['errors'].values())}",
        *_round_lines(trainer),
        "",
        f"{'version':8}{'parent':7}{'seen':>6}  {'preference [95% CI]':22}{'n':>4}  {'thumbs-up [95% CI]':22}"
        f"{'n':>4}  {'vs parent':>12}  {'KL':>5}  {'status':12}{'round s':>8}  stage s",
    ]  # fmt: skip
    for v in results["versions"]:
        lines.append(
            f"{v['name']:8}{v['parent'] or '-':7}{clock(v['appeared_s']):>6}  {_rate(v['preference_rate']):22}"
            f"{(v['preference_rate'] or {}).get('n', 0):>4}  {_rate(v['thumbs_up']):22}{v['thumbs_up']['n']:>4}  "
            f"{_comparison(v['vs_parent']):>12}  "
            f"{_number(v['kl']):>5}  {v['status']:12}{_number(v['round_seconds'], 0):>8}  {_stages(v['stage_seconds'])}"
        .rstrip())  # fmt: skip
    lines.append("(preference: pinned, held-out questions where it is at stake; thumbs-up: users' thumbs on "
                 "every question they asked)")
    result = results["verdict"]
    lines.append("")
    if result["newest_promoted"] is None:
        lines.append(f"no version was promoted: the benchmark's bar ({result['criterion']}) is not met")
    else:
        lines.append(
            f"newest promoted {result['newest_promoted']}: {result['difference']:+.2f} over v0, z {result['z']:.1f} "
            f"-> {'MEETS' if result['beats_v0'] else 'does not meet'} the bar ({result['criterion']})"
        )
    if (newest := result["newest_measured"]) is not None:
        lines.append(f"newest measured {newest['name']} ({newest['status']}): {newest['difference']:+.2f} over v0, "
                     f"z {newest['z']:.1f}")
    if result["promoted_worse_than_parent"]:
        lines.append(f"promoted yet measurably worse than the parent: {', '.join(result['promoted_worse_than_parent'])}")
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    """Preference rate (pinned) and thumbs-up rate (users) per version, in order of appearance, with 95%
    intervals; each version labelled with when it appeared and what the canary did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = results["versions"]
    x = range(len(versions))
    figure, axes = plt.subplots(figsize=(max(6, 1.2 * len(versions) + 3), 4.5))
    for key, label, offset in (("preference_rate", "preference rate (pinned)", -0.06),
                               ("thumbs_up", "thumbs-up rate (users)", 0.06)):  # fmt: skip
        points = [(i + offset, v[key]) for i, v in zip(x, versions, strict=True) if v[key] and v[key]["n"]]
        if points:
            xs, rates = zip(*points, strict=True)
            values = [r["value"] for r in rates]
            errors = [[r["value"] - r["low"] for r in rates], [r["high"] - r["value"] for r in rates]]
            axes.errorbar(xs, values, yerr=errors, marker="o", capsize=4, label=label)
    axes.set_xticks(list(x), [f"{v['name']}\n{clock(v['appeared_s'])}\n{v['status']}" for v in versions])
    axes.set_xlim(-0.5, len(versions) - 0.5)
    axes.set_ylim(0, 1)
    axes.set_ylabel("rate (95% interval)")
    preference = results["preference"]
    axes.set_title(f"'{preference['name']}': {preference['description']}")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
