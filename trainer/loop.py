"""The trainer's main loop: wait for feedback, train the reward model, run PPO, evaluate, publish.

A round publishes its policy only if the evaluation gate (trainer.evaluate) passes it: not measurably worse
than its parent on held-out prompts, and within the KL bound of the reference. A rejected round is recorded
(its feedback counts as trained on, its reward model seeds the next) and the next round starts again from
the same parent.

Rounds are crash-safe by construction: feedback counts as trained on only once its round is recorded. A
round that dies (or is abandoned on SIGTERM) resumes after the restart where it stopped, on the same data:
its plan (the feedback it trains on, its PPO prompts, its parent version) is written to `round.json` in the
round's directory first, a finished reward model is kept, and PPO continues after its last checkpointed
step (trainer.checkpoint). Feedback that arrived meanwhile waits for the next round. Every step is logged as
one JSON line on stdout and its metrics are set on the Prometheus gauges (trainer.metrics).
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import torch
from kafka import KafkaProducer
from prometheus_client import start_http_server

from common.kafka import ensure_topics, make_producer, wait_for_broker
from common.registry import PolicyRegistry, PolicyVersion
from trainer import metrics
from trainer.adapters import adapter_rank
from trainer.corpus import generate_dialogues, sample_prompts
from trainer.data import Demonstration, Prompt, prompt_from_messages, prompt_to_messages
from trainer.evaluate import EvalConfig, evaluate_candidate
from trainer.ingest import Ingestor
from trainer.ppo import PPOConfig, make_rollout, train_ppo
from trainer.publish import publish_policy
from trainer.reward_model import META_FILE as REWARD_MODEL_META
from trainer.reward_model import RewardModelConfig, train_reward_model
from trainer.rollout import RolloutBackend
from trainer.settings import TrainerSettings
from trainer.store import FeedbackStore, RoundRecord, TrainingData
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
    prompts: tuple[Prompt, ...]
    parent: str  # the policy version PPO continues
    resumed: bool = False  # read back from an earlier run of the round

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        fields = {"id": self.id, "feedback_ids": self.feedback_ids, "prompts": self.prompts, "parent": self.parent}
        staging.write_text(json.dumps(fields))
        staging.rename(path)  # atomic: a plan is whole or absent

    @classmethod
    def read(cls, path: Path) -> RoundPlan:
        fields = json.loads(path.read_text())
        prompts = tuple(tuple(tuple(message) for message in prompt) for prompt in fields["prompts"])
        return cls(fields["id"], tuple(fields["feedback_ids"]), prompts, fields["parent"], resumed=True)


@dataclass(frozen=True)
class Learners:
    """The training steps, the evaluation gate and PPO's rollout backend, as trainer.reward_model,
    trainer.ppo, trainer.evaluate and trainer.rollout define them; tests pass fakes."""

    train_reward_model: Callable[..., dict[str, float]] = train_reward_model
    train_ppo: Callable[..., dict[str, float]] = train_ppo
    evaluate: Callable[..., dict[str, float]] = evaluate_candidate
    make_rollout: Callable[[PPOConfig, Path, int], RolloutBackend] = make_rollout


def reward_model_config(settings: TrainerSettings) -> RewardModelConfig:
    # The seed stays the same across rounds: it decides which items are held out, and they must stay out.
    return _with_overrides(RewardModelConfig(seed=settings.seed), epochs=settings.rm_epochs)


def ppo_config(settings: TrainerSettings, round_number: int) -> PPOConfig:
    # A new seed each round, or every round would draw the same prompts and samples.
    return _with_overrides(
        PPOConfig(seed=settings.seed + round_number),
        steps=settings.ppo_steps,
        rollout_batch_size=settings.ppo_rollout_batch_size,
        max_new_tokens=settings.ppo_max_new_tokens,
        rollout_backend=settings.ppo_rollout_backend,
    )


def eval_config(settings: TrainerSettings) -> EvalConfig:
    return _with_overrides(
        EvalConfig(),
        prompts=settings.eval_prompts,
        max_reward_drop_se=settings.eval_max_reward_drop_se,
        max_kl=settings.eval_max_kl,
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
            if new >= self.settings.min_new_feedback or (new > 0 and waited >= self.settings.max_wait_s):
                return True
        return False

    def run_round(self) -> RoundRecord:
        """Train on all ready feedback and publish the result; the round is recorded unless abandoned."""
        number = self.store.next_round()
        started = datetime.now(UTC)
        round_dir = self.settings.work_dir / "rounds" / f"{number:06d}"
        plan = self._plan(number, round_dir)
        snapshot = self.store.training_snapshot(plan.feedback_ids)
        record = RoundRecord(number, started, "published", snapshot.feedback_total, snapshot.new_feedback_ids)
        _log(
            "round.started",
            round=number,
            resumed=plan.resumed,
            feedback_total=snapshot.feedback_total,
            feedback_new=len(snapshot.new_feedback_ids),
            reward_items=len(snapshot.data.reward),
        )
        if len(snapshot.data.reward) == 0:  # e.g. only ties so far: nothing a reward model can learn
            record = dataclasses.replace(record, status="skipped")
        else:
            try:
                record = self._train_and_publish(record, snapshot.data, plan, round_dir)
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
            return RoundPlan.read(path)
        shutil.rmtree(round_dir, ignore_errors=True)  # a round that crashed before writing its plan
        plan = RoundPlan(
            id=uuid.uuid4().hex,
            feedback_ids=self.store.training_snapshot().feedback_ids,
            prompts=self.ppo_prompts(number),
            parent=self.registry.latest().name,
        )
        plan.write(path)
        return plan

    def _train_and_publish(
        self, record: RoundRecord, data: TrainingData, plan: RoundPlan, round_dir: Path
    ) -> RoundRecord:
        parent = self.registry.get(plan.parent)
        source = f"trainer-round-{plan.id}"
        published = self.registry.find(source)
        if published is not None:  # killed after publishing, before recording: announce it again, record it
            round_metrics = published.manifest["metrics"]
        else:
            round_metrics = self._train(record, data, plan, round_dir, parent)
            if not round_metrics["eval/passed"]:
                _log("policy.rejected", round=record.round, parent=parent.name, metrics=round_metrics)
                return dataclasses.replace(
                    record,
                    status="rejected",
                    parent_version=parent.name,
                    reward_model_dir=round_dir / "reward_model",
                    metrics=round_metrics,
                )
        version = publish_policy(
            round_dir / "adapter",
            registry=self.registry,
            producer=self.producer,
            settings=self.settings,
            parent=parent.name,
            metrics=round_metrics,
            source=source,
        )
        metrics.show_round(round_metrics, version.number)
        _log("policy.published", round=record.round, version=version.name, parent=parent.name)
        return dataclasses.replace(
            record,
            parent_version=parent.name,
            version=version.name,
            reward_model_dir=round_dir / "reward_model",
            metrics=round_metrics,
        )

    def _train(
        self, record: RoundRecord, data: TrainingData, plan: RoundPlan, round_dir: Path, parent: PolicyVersion
    ) -> dict[str, float]:
        """The round's reward model, then PPO from `parent`; returns the round's metrics."""
        settings = self.settings
        reward_model_dir, adapter_dir = round_dir / "reward_model", round_dir / "adapter"
        previous_reward_model = self.store.last_reward_model_dir()
        if previous_reward_model is not None and not previous_reward_model.is_dir():
            previous_reward_model = None  # the work dir was cleared: start a fresh reward model

        if (reward_model_dir / REWARD_MODEL_META).is_file():  # written last: this round's RM is complete
            rm_metrics = json.loads((reward_model_dir / REWARD_MODEL_META).read_text())["metrics"]
            _log("reward_model.kept", round=record.round, metrics=rm_metrics)
        else:
            shutil.rmtree(reward_model_dir, ignore_errors=True)
            _log("reward_model.started", round=record.round, init_from=previous_reward_model)
            rm_metrics = self.learners.train_reward_model(
                settings.base_model,
                data.reward,
                reward_model_dir,
                reward_model_config(settings),
                init_from=previous_reward_model,
            )
            _log("reward_model.finished", round=record.round, metrics=rm_metrics)
        metrics.show_step("rm", rm_metrics)
        if self.stop.is_set():
            raise RoundAbandoned

        _log("ppo.started", round=record.round, parent=parent.name, prompts=len(plan.prompts))
        config = ppo_config(settings, record.round)
        if self.rollout is None:  # a vLLM engine starts in about 20 s: once per process, not per round
            # Every version descends from the SFT adapter (when set) or from a new adapter of lora_r.
            rank = adapter_rank(settings.sft_adapter) if settings.sft_adapter else config.lora_r
            self.rollout = self.learners.make_rollout(config, settings.base_model, rank)
        ppo_metrics = self.learners.train_ppo(
            settings.base_model,
            reward_model_dir,
            list(plan.prompts),
            adapter_dir,
            config,
            init_adapter=parent.path,
            reference_adapter=settings.sft_adapter,
            ptx_texts=ptx_texts(
                settings.base_model, data.demonstrations, settings.ptx_dialogues, settings.seed + record.round
            ),
            on_step=lambda step_metrics: self._on_ppo_step(record.round, step_metrics),
            checkpoint_dir=round_dir / "ppo_checkpoints",
            rollout=self.rollout,
        )

        # The gate: the new policy against its parent, on held-out prompts, scored by this round's RM.
        eval_metrics = self.learners.evaluate(
            settings.base_model,
            reward_model_dir,
            adapter_dir,
            parent.path,
            eval_config(settings),
            config,
            reference_adapter=settings.sft_adapter,
            rollout=self.rollout,
        )
        _log("evaluation.finished", round=record.round, metrics=eval_metrics)
        metrics.show_step("eval", eval_metrics)
        return {
            **{f"reward_model/{name}": value for name, value in rm_metrics.items()},
            **{f"ppo/{name}": value for name, value in ppo_metrics.items()},
            **{f"eval/{name}": value for name, value in eval_metrics.items()},
        }

    def ppo_prompts(self, round_number: int) -> list[Prompt]:
        """What users asked, then corpus prompts so that a few users' prompts do not narrow the policy."""
        users = self.store.user_prompts(self.settings.user_prompts)
        corpus = sample_prompts(self.settings.corpus_prompts, seed=self.settings.seed + round_number)
        return list(dict.fromkeys(users + [prompt_from_messages(p) for p in corpus]))

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
    registry = PolicyRegistry(settings.registry_dir)
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
