"""What the running stack says about its policy versions, read as an operator would, and where from:

- versions and their parents: GET /v1/models (serving);
- each version's fate in the canary (in canary, promoted, rolled back, or superseded by a newer version
  before a verdict), the canary's last figures and the gate's reasons: GET /v1/admin/policy (serving),
  polled, so a version's status is what the polls saw;
- the round metrics of each published version (the gate's `eval/kl`: KL to the reference in nats per
  answer; `time/*` stage times when the trainer reports them): the trainer's Prometheus endpoint
  (`rlhf_trainer_last_round_metric`, which describes the version in `rlhf_trainer_policy_version`), and
  the count of rounds by status (`rlhf_trainer_rounds_total`);
- every finished round, published or not, with its duration and metrics, and the gate's failed checks of a
  rejected one: the trainer's `round.finished` and `policy.rejected` log lines (JSON on the stack's
  stdout), the only record of rounds that published nothing.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

BASE = "v0"


@dataclass
class VersionRecord:
    name: str
    parent: str | None
    appeared_s: float  # seconds after the users started when a poll first saw it (v0: 0)
    status: str = "published"  # base, canary, promoted, rolled back, superseded, published (no canary seen)
    canary_figures: dict[str, float] = field(default_factory=dict)  # the last ones a poll saw
    gate: list[str] = field(default_factory=list)
    round_metrics: dict[str, float] = field(default_factory=dict)


async def send_retrying(http: httpx.AsyncClient, method: str, url: str, **kwargs) -> httpx.Response:
    """A request, sent again (up to twice, a second apart) when its connection drops: uvicorn closes a
    keep-alive connection idle for 5 s, the poll interval, and a request reusing it just then fails with
    ReadError though the server is fine. Only the demo's own reads (idempotent) go through here."""
    for attempt in range(3):
        try:
            return await http.request(method, url, **kwargs)
        except httpx.TransportError:
            if attempt == 2:
                raise
            await asyncio.sleep(1)
    raise AssertionError("unreachable")


class StackObserver:
    def __init__(self, http: httpx.AsyncClient, trainer_metrics_url: str):
        self.http = http
        self.trainer_metrics_url = trainer_metrics_url
        self.versions: dict[str, VersionRecord] = {BASE: VersionRecord(BASE, None, 0.0, status="base")}
        self.current = BASE
        self.rounds_by_status: dict[str, float] = {}
        self.trainer_metrics_error: str | None = None

    async def poll(self, now_s: float) -> list[str]:
        """Read serving's and the trainer's endpoints once; the names of versions seen for the first time."""
        new = await self._poll_models(now_s)
        await self._poll_admin()
        await self._poll_trainer()
        return new

    async def _poll_models(self, now_s: float) -> list[str]:
        response = await send_retrying(self.http, "GET", "/v1/models")
        response.raise_for_status()
        new = []
        for card in response.json()["data"]:
            _, _, name = card["id"].partition("@")
            if name and name not in self.versions:
                self.versions[name] = VersionRecord(name, card.get("parent"), now_s)
                new.append(name)
        return new

    async def _poll_admin(self) -> None:
        response = await send_retrying(self.http, "GET", "/v1/admin/policy")
        response.raise_for_status()
        state = response.json()
        self.current = state["current"]
        canary = state.get("canary") or {}
        for name, record in self.versions.items():
            if name == BASE:
                continue
            if name in state["rolled_back"]:
                record.status = "rolled back"
            elif name == self.current or record.status == "promoted":
                record.status = "promoted"  # it was served to everyone; an operator's later pin does not undo that
            elif name == canary.get("version"):
                record.status = "canary"
                record.canary_figures = canary.get("figures", {})
            elif record.status == "canary":
                record.status = "superseded"
            record.gate = state.get("gates", {}).get(name, record.gate)

    async def _poll_trainer(self) -> None:
        try:
            response = await self.http.get(self.trainer_metrics_url)
            response.raise_for_status()
        except httpx.HTTPError as exc:  # the trainer serves its metrics once its loop runs
            self.trainer_metrics_error = repr(exc)
            return
        self.trainer_metrics_error = None
        round_metrics, version_number, rounds = {}, 0, {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == "rlhf_trainer_last_round_metric":
                    round_metrics[sample.labels["name"]] = sample.value
                elif sample.name == "rlhf_trainer_policy_version":
                    version_number = int(sample.value)
                elif sample.name == "rlhf_trainer_rounds_total":
                    rounds[sample.labels["status"]] = sample.value
        self.rounds_by_status = rounds
        record = self.versions.get(f"v{version_number}")
        if version_number and record is not None and not record.round_metrics:
            record.round_metrics = round_metrics


def finished_rounds(stack_log: Path) -> list[dict]:
    """The trainer's rounds from its log lines in the stack's output: round, status, version, seconds and
    metrics (`round.finished`), and for a rejected round the gate's failed checks (`policy.rejected`)."""
    finished, failures = [], {}
    if not stack_log.is_file():
        return finished
    for line in stack_log.read_text(errors="replace").splitlines():
        if not line.startswith("{") or '"trainer.loop"' not in line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "round.finished":
            finished.append({k: event.get(k) for k in ("round", "status", "version", "seconds", "metrics")})
        elif event.get("event") == "policy.rejected":
            failures[event.get("round")] = [r for r in event.get("gate", []) if r.startswith("fail")]
    return [{**r, "gate_failures": failures.get(r["round"], [])} for r in finished]
