"""The trainer's main loop: wait for feedback, train two reward models, run PPO, evaluate, publish.

Every piece of feedback belongs to one side of the split (trainer.data.split, by its prompt). Each round
refreshes two reward models incrementally (trainer.reward.reward_model: from the previous round's model, on
the side's new feedback plus a replay sample of its old): the policy's, on the train side, which PPO
optimises on train-side prompts; and the judge, on the judge side, which the evaluation gate
(trainer.evaluation.gate) asks about judge-side prompts. Both are measured on the held-out side. A round
publishes its policy only if the gate passes it; its reasons go into the version's manifest (`gate`), or,
for a rejected round, into the round's record (`error`). A round whose judge is not validated on held-out
feedback is rejected before PPO: the gate could not pass its policy, so PPO's time is saved. A rejected
round is recorded (its feedback counts as trained on, its reward models seed the next round's) and the next
round starts again from the same parent.

Rounds are crash-safe by construction: feedback counts as trained on only once its round is recorded. A
round that dies (or is abandoned on SIGTERM) resumes after the restart where it stopped, on the same data:
its plan (the feedback it trains on, its PPO and gate prompts, its parent version) is written to
`round.json` in the round's directory first, finished reward models are kept, and PPO continues after its
last checkpointed step (trainer.policy.checkpoint). Feedback that arrived meanwhile waits for the next round.
Every step is logged as one JSON line on stdout and its metrics are set on the Prometheus gauges
(trainer.metrics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import torch
from kafka import KafkaProducer
from prometheus_client import start_http_server

from common.kafka import ensure_topics, make_producer, wait_for_broker
from common.registry import PolicyRegistry, PolicyVersion, open_registry
from trainer import metrics
from trainer.adapters import adapter_rank
from trainer.data import Demonstration, Prompt, RewardDataset, prompt_to_messages
from trainer.data.corpus import generate_dialogues
from trainer.data.ingest import Ingestor
from trainer.data.prompts import corpus_prompts, mixed, on_side
from trainer.data.split import Side, split_dataset
from trainer.data.store import FeedbackStore, RoundRecord, TrainingSnapshot
from trainer.evaluation.gate import (
    EvalConfig,
    GateResult,
    evaluate_candidate,
    judge_check,
    reward_model_metrics,
)
from trainer.policy.ppo import PPOConfig, make_rollout, train_ppo
from trainer.policy.rollout import RolloutBackend
from trainer.publish import publish_policy
from trainer.reward.reward_model import META_FILE as REWARD_MODEL_META
from trainer.reward.reward_model import RewardModelConfig, train_reward_model
from trainer.settings import TrainerSettings
from trainer.tokens import load_tokenizer

log = logging.getLogger("trainer.loop")


class RoundAbandoned(Exception):
    """The trainer was asked to stop in the middle of a round."""


@dataclass(frozen=True)
class RoundPlan:
    """What a round trains on, fixed when it starts so that a resumed round trains on the same."""

    FILE: ClassVar[str] = "round.json"

    id: str  # unique across work dirs: the registry knows a version published from this round by it
    feedback_ids: tuple[str, ...]
    prompts: tuple[Prompt, ...]  # PPO's, all on the train side of the split
    gate_prompts: tuple[Prompt, ...]  # the evaluation gate's, all on the judge side
    parent: str  # the policy version PPO continues
    resumed: bool = False  # read back from an earlier run of the round

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        fields = {"id": self.id, "feedback_ids": self.feedback_ids, "prompts": self.prompts,
                  "gate_prompts": self.gate_prompts, "parent": self.parent}  # fmt: skip
        staging.write_text(json.dumps(fields))
        staging.rename(path)  # atomic: a plan is whole or absent

    @classmethod
    def read(cls, path: Path) -> RoundPlan:
        """The plan at `path`; KeyError if an older trainer wrote it without gate prompts."""
        fields = json.loads(path.read_text())

        def prompts(name: str) -> tuple[Prompt, ...]:
            return tuple(tuple(tuple(message) for message in prompt) for prompt in fields[name])

        return cls(fields["id"], tuple(fields["feedback_ids"]), prompts("prompts"), prompts("gate_prompts"),
                   fields["parent"], resumed=True)  # fmt: skip


@dataclass(frozen=True)
class Learners:
    """The training steps, the evaluation gate and PPO's rollout backend, as trainer.reward.reward_model,
    trainer.policy.ppo, trainer.evaluation.gate and trainer.policy.rollout define them; tests pass fakes."""

    train_reward_model: Callable[..., dict[str, float]] = train_reward_model
    train_ppo: Callable[..., dict[str, float]] = train_ppo
    evaluate: Callable[..., GateResult] = evaluate_candidate
    make_rollout: Callable[[PPOConfig, Path, int], RolloutBackend] = make_rollout


def reward_model_config(settings: TrainerSettings) -> RewardModelConfig:
    return _with_overrides(RewardModelConfig(seed=settings.seed), epochs=settings.rm_epochs)


def ppo_config(settings: TrainerSettings, round_number: int) -> PPOConfig:
    # A new seed each round, or every round would draw the same prompts and samples.
    return _with_overrides(
        PPOConfig(seed=settings.seed + round_number),
        steps=settings.ppo_steps,
        rollout_batch_size=settings.ppo_rollout_batch_size,
        max_new_tokens=settings.ppo_max_new_tokens,
        ptx_coef=settings.ppo_ptx_coef,
        rollout_backend=settings.ppo_rollout_backend,
    )


def eval_config(settings: TrainerSettings) -> EvalConfig:
    return _with_overrides(
        EvalConfig(),
        prompts=settings.eval_prompts,
        max_new_tokens=settings.ppo_max_new_tokens,  # the gate samples answers as PPO does
        max_reward_drop_se=settings.eval_max_reward_drop_se,
        max_kl=settings.eval_max_kl,
        require_validated_judge=settings.eval_require_validated_judge,
    )


def _with_overrides(config, **overrides):
    """The config with the settings that are set; unset ones keep the config's default."""
    return dataclasses.replace(
        config, **{name: value for name, value in overrides.items() if value is not None}
    )


def ptx_texts(
    base_model: Path, demonstrations: list[Demonstration], corpus_dialogues: int, seed: int
) -> list[str]:
    """Text for PPO's language-model term: users' corrections and base-corpus dialogues, in chat format."""
    dialogues = [
        prompt_to_messages(d.prompt) + [{"role": "assistant", "content": d.response}] for d in demonstrations
    ]
    dialogues += generate_dialogues(corpus_dialogues, seed=seed)
    if not dialogues:
        return []
    tokenizer = load_tokenizer(base_model)
    return [tokenizer.apply_chat_template(dialogue, tokenize=False) for dialogue in dialogues]


class StageClock:
    """Wall time of a round's stages, as metrics `time/<stage>_seconds`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[stage] = time.monotonic() - started

    def metrics(self) -> dict[str, float]:
        return {f"time/{stage}_seconds": seconds for stage, seconds in self.seconds.items()}


class TrainingLoop:
    def __init__(
        self,
        settings: TrainerSettings,
        store: FeedbackStore,
        registry: PolicyRegistry,
        producer: KafkaProducer,
        stop: threading.Event,
        learners: Learners = Learners(),
    ):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.producer = producer
        self.stop = stop
        self.learners = learners
        self.rollout: RolloutBackend | None = None  # started by the first PPO run, kept across rounds
        self._awaiting: tuple[str, float] | None = None  # (version, since when) awaiting its canary verdict

    def run(self, ingestor: Ingestor) -> None:
        """Round after round until `stop` is set; raises if the ingest thread dies."""
        try:
            while self.wait_for_feedback(ingestor, since=time.monotonic()):
                try:
                    record = self.run_round()
                except RoundAbandoned:
                    _log("round.abandoned")
                    return
                if record.status == "failed":
                    self.stop.wait(self.settings.max_wait_s)  # do not spin on a round that keeps failing
        finally:
            self.close_rollout()

    def close_rollout(self) -> None:
        if self.rollout is not None:
            self.rollout.close()
            self.rollout = None

    def wait_for_feedback(self, ingestor: Ingestor, since: float) -> bool:
        """True once enough new feedback is ready, or some after max_wait_s; False when asked to stop."""
        while not self.stop.wait(self.settings.check_interval_s):
            if ingestor.error is not None:
                raise RuntimeError("the ingest thread died") from ingestor.error
            new = self.store.new_feedback_count()
            metrics.NEW_FEEDBACK.set(new)
            waited = time.monotonic() - since
            enough = new >= self.settings.min_new_feedback or (new > 0 and waited >= self.settings.max_wait_s)
            if enough and not self.awaiting_verdict():
                return True
        return False

    def awaiting_verdict(self) -> bool:
        """Whether the newest published version is still in serving's canary (see await_verdict_s)."""
        latest = self.registry.latest()
        if latest.is_base or latest.verdict is not None:
            return False
        if self._awaiting is None or self._awaiting[0] != latest.name:
            self._awaiting = (latest.name, time.monotonic())
            _log("round.awaiting_verdict", version=latest.name, at_most_s=self.settings.await_verdict_s)
        return time.monotonic() - self._awaiting[1] < self.settings.await_verdict_s

    def run_round(self) -> RoundRecord:
        """Train on all ready feedback and publish the result; the round is recorded unless abandoned."""
        number = self.store.next_round()
        started = datetime.now(UTC)
        round_dir = self.settings.work_dir / "rounds" / f"{number:06d}"
        plan = self._plan(number, round_dir)
        snapshot = self.store.training_snapshot(plan.feedback_ids, self.settings.max_feedback_per_user)
        record = RoundRecord(number, started, "published", snapshot.feedback_total, snapshot.new_feedback_ids)
        train_side = split_dataset(snapshot.data.reward)[Side.TRAIN]
        _log(
            "round.started",
            round=number,
            resumed=plan.resumed,
            feedback_total=snapshot.feedback_total,
            feedback_new=len(snapshot.new_feedback_ids),
            reward_items=len(snapshot.data.reward),
            train_side_items=len(train_side),
        )
        # E.g. only ties so far, or only feedback on judge-side and held-out prompts: nothing the policy's
        # reward model can learn (and no earlier round can have trained one).
        if len(train_side) == 0:
            record = dataclasses.replace(record, status="skipped")
        else:
            try:
                record = self._train_and_publish(record, snapshot, plan, round_dir)
            except RoundAbandoned:
                raise
            except Exception as exc:
                log.exception("round.failed", extra={"fields": {"round": number}})
                record = dataclasses.replace(record, status="failed", error=repr(exc))
                self.close_rollout()  # it may be what failed: the next round starts a new one
        self.store.record_round(record)
        metrics.ROUNDS.labels(status=record.status).inc()
        _log(
            "round.finished",
            round=number,
            status=record.status,
            version=record.version,
            seconds=(datetime.now(UTC) - started).total_seconds(),
            metrics=record.metrics,
        )
        return record

    def _plan(self, number: int, round_dir: Path) -> RoundPlan:
        """The plan of round `number`: the one an interrupted run of it left, or a new one, written first."""
        path = round_dir / RoundPlan.FILE
        if path.is_file():
            try:
                return RoundPlan.read(path)
            except KeyError:
                _log("round.plan_outdated", round=number)  # an older trainer's: the round starts over
        shutil.rmtree(round_dir, ignore_errors=True)  # a round that crashed before writing its plan
        ppo_prompts, gate_prompts = self.round_prompts(number)
        plan = RoundPlan(
            id=uuid.uuid4().hex,
            feedback_ids=self.store.training_snapshot().feedback_ids,
            prompts=tuple(ppo_prompts),
            gate_prompts=tuple(gate_prompts),
            parent=self.registry.latest().name,
        )
        plan.write(path)
        return plan

    def _train_and_publish(
        self, record: RoundRecord, snapshot: TrainingSnapshot, plan: RoundPlan, round_dir: Path
    ) -> RoundRecord:
        parent = self.registry.get(plan.parent)
        source = f"trainer-round-{plan.id}"
        record = dataclasses.replace(
            record, parent_version=parent.name, reward_model_dir=round_dir / "reward_model"
        )
        published = self.registry.find(source)
        if published is not None:  # killed after publishing, before recording: announce it again, record it
            round_metrics, reasons = published.manifest["metrics"], published.manifest.get("gate", [])
        else:
            round_metrics, reasons = self._train(record, snapshot, plan, round_dir, parent)
            if not round_metrics["eval/passed"]:
                _log("policy.rejected", round=record.round, parent=parent.name, gate=reasons)
                return dataclasses.replace(
                    record, status="rejected", metrics=round_metrics, error="\n".join(reasons)
                )
        version = publish_policy(
            round_dir / "adapter",
            registry=self.registry,
            producer=self.producer,
            settings=self.settings,
            parent=parent.name,
            metrics=round_metrics,
            gate=reasons,
            source=source,
        )
        metrics.show_round(round_metrics, version.number)
        _log("policy.published", round=record.round, version=version.name, parent=parent.name, gate=reasons)
        return dataclasses.replace(record, version=version.name, metrics=round_metrics)

    def _train(
        self, record: RoundRecord, snapshot: TrainingSnapshot, plan: RoundPlan, round_dir: Path,
        parent: PolicyVersion,
    ) -> tuple[dict[str, float], list[str]]:  # fmt: skip
        """The round's reward models, then PPO from `parent` and the gate; the round's metrics and the
        gate's reasons."""
        settings = self.settings
        reward_model_dir, judge_dir = round_dir / "reward_model", round_dir / "judge_model"
        adapter_dir = round_dir / "adapter"
        previous_reward_model = self.store.last_reward_model_dir()
        if previous_reward_model is not None and not previous_reward_model.is_dir():
            previous_reward_model = None  # the work dir was cleared: start fresh reward models
        previous_judge = previous_reward_model and previous_reward_model.parent / "judge_model"
        if previous_judge is not None and not previous_judge.is_dir():
            previous_judge = None  # that round had no judge-side feedback yet
        new, seen = split_dataset(snapshot.new_data.reward), split_dataset(snapshot.seen_data.reward)
        heldout = split_dataset(snapshot.data.reward)[Side.HELDOUT]

        # Each stage's wall time goes into the round's metrics (time/<stage>_seconds): what a round costs.
        clock = StageClock()
        with clock("reward_model"):
            rm_metrics = self._reward_model(
                "rm", record.round, reward_model_dir, new[Side.TRAIN], seen[Side.TRAIN], heldout,
                previous_reward_model,
            )  # fmt: skip
        with clock("judge"):
            judge_metrics = self._reward_model(
                "judge", record.round, judge_dir, new[Side.JUDGE], seen[Side.JUDGE], heldout, previous_judge
            )
        round_metrics = {
            "feedback/capped_per_user": float(snapshot.capped),
            **{f"reward_model/{name}": value for name, value in rm_metrics.items()},
            **{f"judge/{name}": value for name, value in (judge_metrics or {}).items()},
        }
        if self.stop.is_set():
            raise RoundAbandoned

        config = eval_config(settings)
        validated, judge_reason = (
            judge_check(judge_metrics, config) if judge_metrics is not None
            else (False, "fail judge: no judge-side feedback to train one on yet")
        )  # fmt: skip
        if not validated:  # the gate would reject whatever PPO made: skip PPO
            _log("ppo.skipped", round=record.round, reason=judge_reason)
            return {**round_metrics, **clock.metrics(), "eval/passed": 0.0}, [judge_reason, "info ppo: not run"]

        _log("ppo.started", round=record.round, parent=parent.name, prompts=len(plan.prompts))
        policy_config = ppo_config(settings, record.round)
        if self.rollout is None:  # a vLLM engine starts in about 20 s: once per process, not per round
            # Every version descends from the SFT adapter (when set) or from a new adapter of lora_r.
            rank = adapter_rank(settings.sft_adapter) if settings.sft_adapter else policy_config.lora_r
            self.rollout = self.learners.make_rollout(policy_config, settings.base_model, rank)
        with clock("ppo"):
            ppo_metrics = self._ppo(record, snapshot, plan, round_dir, parent, policy_config)

        # The gate: the new policy against its parent, on judge-side prompts, scored by the judge.
        with clock("gate"):
            gate = self.learners.evaluate(
                settings.base_model,
                adapter_dir,
                parent.path,
                list(plan.gate_prompts),
                judge_dir=judge_dir,
                policy_reward_model_dir=reward_model_dir,
                config=config,
                policy_config=policy_config,
                reference_adapter=settings.sft_adapter,
                rollout=self.rollout,
            )
        _log("evaluation.finished", round=record.round, metrics=gate.metrics, gate=gate.reasons)
        metrics.show_step("eval", gate.metrics)
        return {
            **round_metrics,
            **{f"ppo/{name}": value for name, value in ppo_metrics.items()},
            **{f"eval/{name}": value for name, value in gate.metrics.items()},
            **clock.metrics(),
        }, gate.reasons

    def _ppo(
        self, record: RoundRecord, snapshot: TrainingSnapshot, plan: RoundPlan, round_dir: Path,
        parent: PolicyVersion, policy_config: PPOConfig,
    ) -> dict[str, float]:  # fmt: skip
        """PPO from `parent` against the round's policy reward model; the adapter goes to round_dir."""
        settings = self.settings
        return self.learners.train_ppo(
            settings.base_model,
            round_dir / "reward_model",
            list(plan.prompts),
            round_dir / "adapter",
            policy_config,
            init_adapter=parent.path,
            reference_adapter=settings.sft_adapter,
            ptx_texts=ptx_texts(
                settings.base_model, snapshot.data.demonstrations, settings.ptx_dialogues,
                settings.seed + record.round,
            ),  # fmt: skip
            on_step=lambda step_metrics: self._on_ppo_step(record.round, step_metrics),
            checkpoint_dir=round_dir / "ppo_checkpoints",
            rollout=self.rollout,
        )

    def _reward_model(
        self, stage: str, round_number: int, out_dir: Path, new: RewardDataset, seen: RewardDataset,
        heldout: RewardDataset, previous: Path | None,
    ) -> dict[str, float] | None:  # fmt: skip
        """This round's reward model of one side of the split in `out_dir`, and its metrics: kept from an
        interrupted run of the round; else `previous` refreshed on the side's new feedback and a replay
        of its old; `previous` itself when nothing is new; a full retrain without a previous model; None
        when the side has no feedback at all."""
        if (out_dir / REWARD_MODEL_META).is_file():  # written last: this round's model is complete
            rm_metrics = reward_model_metrics(out_dir)
            _log(f"{stage}.kept", round=round_number, metrics=rm_metrics)
        elif previous is not None and len(new) == 0:
            shutil.rmtree(out_dir, ignore_errors=True)
            staging = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(previous, staging)
            staging.rename(out_dir)  # whole or absent, like a trained one
            rm_metrics = reward_model_metrics(out_dir)
            _log(f"{stage}.unchanged", round=round_number, copied_from=previous)
        elif len(new) + len(seen) == 0:
            return None
        else:
            if previous is None and len(new) == 0:
                new, seen = seen, RewardDataset()  # a full retrain on what there is
            shutil.rmtree(out_dir, ignore_errors=True)
            _log(f"{stage}.started", round=round_number, init_from=previous, new=len(new), replay=len(seen),
                 heldout=len(heldout))  # fmt: skip
            rm_metrics = self.learners.train_reward_model(
                self.settings.base_model, new, out_dir, reward_model_config(self.settings),
                init_from=previous, replay=seen, heldout=heldout,
            )  # fmt: skip
            _log(f"{stage}.finished", round=round_number, metrics=rm_metrics)
        metrics.show_step(stage, rm_metrics)
        return rm_metrics

    def round_prompts(self, round_number: int) -> tuple[list[Prompt], list[Prompt]]:
        """PPO's prompts and the gate's, from different sides of the split. Each: what users asked, most
        recent first, then corpus prompts, so that a few users' prompts do not narrow the policy (PPO, a
        new draw each round) and rounds are judged on a common set (the gate, the same draw each round)."""
        settings, config = self.settings, eval_config(self.settings)
        users = self.store.user_prompts(settings.user_prompts)
        ppo = mixed(
            on_side(users, Side.TRAIN),
            corpus_prompts(Side.TRAIN, settings.corpus_prompts, seed=settings.seed + round_number),
        )
        gate = mixed(
            on_side(users, Side.JUDGE)[: config.user_prompts],
            corpus_prompts(Side.JUDGE, config.prompts, seed=config.eval_seed),
            limit=config.prompts,
        )
        return ppo, gate

    def _on_ppo_step(self, round_number: int, step_metrics: dict[str, float]) -> None:
        _log("ppo.step", round=round_number, metrics=step_metrics)
        metrics.show_step("ppo", step_metrics)
        if self.stop.is_set():
            raise RoundAbandoned


# --- The process --------------------------------------------------------------------------------------


class JsonLines(logging.Formatter):
    """One JSON object per record: the message is the event name, `extra={"fields": {...}}` adds fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _log(event: str, **fields) -> None:
    log.info(event, extra={"fields": fields})


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum, _frame):
        _log("trainer.stopping", signal=signal.Signals(signum).name)
        stop.set()
        signal.signal(signum, signal.SIG_DFL)  # a second signal kills at once; the round is redone later

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


def main() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    settings = TrainerSettings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    stop = threading.Event()
    _stop_on_signals(stop)

    wait_for_broker(settings, timeout_s=60)
    ensure_topics(settings, [settings.completions_topic, settings.feedback_topic, settings.policy_topic])
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    store = FeedbackStore(settings.store_path)
    registry = open_registry(settings)
    metrics.POLICY_VERSION.set(registry.latest().number)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    _log(
        "trainer.started",
        store=settings.store_path,
        registry=settings.registry_dir,
        policy=registry.latest().name,
        metrics_port=settings.metrics_port,
    )

    ingestor = Ingestor(settings, store).start()
    producer = make_producer(settings)
    try:
        TrainingLoop(settings, store, registry, producer, stop).run(ingestor)
    finally:
        ingestor.stop()
        producer.close()
        store.close()
        _log("trainer.stopped")
