"""The training loop with fake learners: rounds publish versions, announce them, and keep their books."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.kafka import ensure_topics, make_consumer, make_producer
from common.registry import PolicyRegistry
from deploy.local_broker import free_port
from feedback.events import PolicyEvent
from tests.adapters import write_adapter
from tests.trainer.data.test_ingest import isolated_settings, produce, wait_until
from tests.trainer.data.test_store import COMPLETIONS, OTHER_PROMPT, PROMPT, completion, feedback, ref
from trainer.data import PointwiseLabel, PreferenceGroup, RewardDataset, prompt_from_messages
from trainer.data.split import Side, side_of
from trainer.data.store import EventBatch, FeedbackStore
from trainer.evaluation.gate import GateResult
from trainer.loop import Learners, RoundPlan, TrainingLoop

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]

# test_store's questions are on the judge side of the split; these are on the train and held-out sides.
TRAIN_QUESTION = [{"role": "user", "content": "What colour is grass?"}]
LATE_TRAIN_QUESTION = [{"role": "user", "content": "What is 3 plus 4?"}]
HELDOUT_QUESTION = [{"role": "user", "content": "What is 6 plus 2?"}]
TRAIN_PROMPT = prompt_from_messages(TRAIN_QUESTION)
LATE_TRAIN_PROMPT = prompt_from_messages(LATE_TRAIN_QUESTION)
COMPLETIONS = {
    **COMPLETIONS,
    "t1": completion("t1", ["Green.", "Grass is green.", "Red."], TRAIN_QUESTION),
    "t2": completion("t2", ["7.", "Seven.", "Eight."], LATE_TRAIN_QUESTION),
    "h1": completion("h1", ["8.", "Nine."], HELDOUT_QUESTION),
}


def test_the_fixtures_prompts_are_on_the_sides_the_tests_assume():
    assert side_of(PROMPT) == side_of(OTHER_PROMPT) == Side.JUDGE
    assert side_of(TRAIN_PROMPT) == side_of(LATE_TRAIN_PROMPT) == Side.TRAIN
    assert side_of(prompt_from_messages(HELDOUT_QUESTION)) == Side.HELDOUT


class Killed(BaseException):
    """Stands for the process being killed: no `except Exception` catches it."""


VALIDATED = {"train_loss": 0.25, "heldout_enough": 1.0, "heldout_ranking_n": 40.0,
             "heldout_ranking_accuracy": 0.8, "heldout_ranking_low": 0.65,
             "heldout_ranking_high": 0.9}  # fmt: skip
TOO_FEW = {"train_loss": 0.25, "heldout_enough": 0.0, "heldout_ranking_n": 3.0}
GATE_REASONS = ["pass judge: ...", "pass judge gain: +0.100", "pass kl: 1.00"]
ROUND_METRICS = {
    "feedback/capped_per_user": 0.0,
    **{f"reward_model/{name}": value for name, value in VALIDATED.items()},
    **{f"judge/{name}": value for name, value in VALIDATED.items()},
    "ppo/reward_mean": 0.5,
    "eval/judge_gain": 0.1,
    "eval/passed": 1.0,
}

STAGE_TIMES = {f"time/{stage}_seconds" for stage in ("reward_model", "judge", "ppo", "gate")}


def without_stage_times(round_metrics: dict[str, float]) -> dict[str, float]:
    """The round's metrics less its stages' wall times, after checking that every stage has one."""
    assert {name for name in round_metrics if name.startswith("time/")} == STAGE_TIMES, round_metrics
    assert all(round_metrics[name] >= 0 for name in STAGE_TIMES)
    return {name: value for name, value in round_metrics.items() if name not in STAGE_TIMES}


class FakeLearners:
    """Records what the loop hands the learners and writes stand-ins for their outputs."""

    def __init__(
        self, fail_ppo: bool = False, stop_during_ppo: threading.Event | None = None, kill_ppo: bool = False,
        reject: bool = False, judge_metrics: dict[str, float] = VALIDATED,
    ):  # fmt: skip
        self.fail_ppo = fail_ppo
        self.reject = reject
        self.judge_metrics = judge_metrics
        self.eval_calls: list[dict] = []
        self.kill_ppo = kill_ppo
        self.stop_during_ppo = stop_during_ppo
        self.reward_model_calls: list[dict] = []
        self.ppo_calls: list[dict] = []
        self.rollouts: list[SimpleNamespace] = []

    def learners(self) -> Learners:
        return Learners(train_reward_model=self.train_reward_model, train_ppo=self.train_ppo,
                        evaluate=self.evaluate, make_rollout=self.make_rollout)  # fmt: skip

    def calls_for(self, model: str) -> list[dict]:
        """The calls that trained the policy's reward model ("reward_model") or the judge ("judge_model")."""
        return [call for call in self.reward_model_calls if call["out_dir"].name == model]

    def evaluate(self, base_model, candidate_adapter, parent_adapter, prompts, *, judge_dir,
                 policy_reward_model_dir, config, policy_config, reference_adapter=None,
                 rollout=None):  # fmt: skip
        self.eval_calls.append(dict(candidate=candidate_adapter, parent=parent_adapter, prompts=prompts,
                                    judge_dir=judge_dir, policy_reward_model_dir=policy_reward_model_dir,
                                    config=config, rollout=rollout))  # fmt: skip
        if self.reject:
            return GateResult(False, ["fail judge gain: -0.100"], {"judge_gain": -0.1, "passed": 0.0})
        return GateResult(True, GATE_REASONS, {"judge_gain": 0.1, "passed": 1.0})

    def make_rollout(self, config, base_model, lora_rank):
        rollout = SimpleNamespace(backend=config.rollout_backend, lora_rank=lora_rank, closed=False)
        rollout.close = lambda: setattr(rollout, "closed", True)
        self.rollouts.append(rollout)
        return rollout

    def train_reward_model(self, base_model, data: RewardDataset, out_dir: Path, config, init_from=None, *,
                           replay: RewardDataset | None = None,
                           heldout: RewardDataset | None = None):  # fmt: skip
        self.reward_model_calls.append(dict(data=data, out_dir=out_dir, config=config, init_from=init_from,
                                            replay=replay, heldout=heldout))  # fmt: skip
        rm_metrics = self.judge_metrics if out_dir.name == "judge_model" else VALIDATED
        out_dir.mkdir(parents=True)
        (out_dir / "head.safetensors").write_text("fake")
        (out_dir / "reward_model.json").write_text(json.dumps({"metrics": rm_metrics}))
        return rm_metrics

    def train_ppo(self, base_model, reward_model_dir, prompts, out_adapter_dir: Path, config,
                  init_adapter=None, reference_adapter=None, ptx_texts=None, on_step=None,
                  checkpoint_dir=None, rollout=None):  # fmt: skip
        self.ppo_calls.append(
            dict(reward_model_dir=reward_model_dir, prompts=prompts, config=config, init_adapter=init_adapter,
                 ptx_texts=ptx_texts, checkpoint_dir=checkpoint_dir, rollout=rollout)
        )  # fmt: skip
        if self.fail_ppo:
            raise RuntimeError("PPO diverged")
        if self.kill_ppo:
            raise Killed
        if self.stop_during_ppo is not None:
            self.stop_during_ppo.set()
        on_step({"step": 1.0, "reward_mean": 0.5})
        write_adapter(out_adapter_dir, base_model)  # a real one: publishing checks it
        config = out_adapter_dir / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "call": len(self.ppo_calls)}))
        return {"reward_mean": 0.5}


@pytest.fixture
def settings(kafka_settings, tmp_path, base_model_dir):
    settings = isolated_settings(
        kafka_settings, tmp_path, base_model=base_model_dir, corpus_prompts=3, ptx_dialogues=2, rm_epochs=1,
        ppo_steps=2, ppo_rollout_batch_size=4, ppo_max_new_tokens=8, eval_prompts=6,
    )  # fmt: skip
    ensure_topics(settings, [settings.completions_topic, settings.feedback_topic, settings.policy_topic])
    return settings


@pytest.fixture
def store(settings):
    store = FeedbackStore(settings.store_path)
    yield store
    store.close()


@pytest.fixture
def producer(settings):
    producer = make_producer(settings)
    yield producer
    producer.close()


def make_loop(
    settings, store, producer, fakes: FakeLearners, stop: threading.Event | None = None
) -> TrainingLoop:
    registry = PolicyRegistry(settings.registry_dir)
    return TrainingLoop(settings, store, registry, producer, stop or threading.Event(), fakes.learners())


def read_policy_events(settings, count: int) -> list[PolicyEvent]:
    consumer = make_consumer(settings, [settings.policy_topic], group_id=None, consumer_timeout_ms=15_000)
    events = []
    for message in consumer:
        events.append(PolicyEvent.model_validate_json(message.value))
        if len(events) == count:
            break
    consumer.close()
    return events


def store_thumbs_up(store, *completion_ids: str) -> None:
    """A thumbs up on the first answer of each completion; on "t1" and "c1": enough for a round."""
    store.save_batch(EventBatch(
        completions=[COMPLETIONS[c] for c in completion_ids],
        feedback=[feedback(type="thumbs", rating="up", **ref(c)) for c in completion_ids],
    ))  # fmt: skip


def test_rounds_publish_versions_that_build_on_each_other(settings, store, producer):
    first_feedback = [
        feedback(type="pairwise", a=ref("c1", 0), b=ref("c1", 2), preference="a"),
        feedback(type="correction", text="Snow is white, of course.", **ref("c1", 2)),
        feedback(type="pairwise", a=ref("t1", 1), b=ref("t1", 2), preference="a"),
        feedback(type="thumbs", rating="up", **ref("h1", 0)),
    ]
    store.save_batch(EventBatch(completions=list(COMPLETIONS.values()), feedback=first_feedback))
    fakes = FakeLearners()
    loop = make_loop(settings, store, producer, fakes)

    first = loop.run_round()

    assert (first.status, first.version, first.parent_version) == ("published", "v1", "v0")
    # Two reward models, each on its side of the split, both measured on the held-out side.
    [rm_call], [judge_call] = fakes.calls_for("reward_model"), fakes.calls_for("judge_model")
    assert rm_call["data"].groups == [PreferenceGroup(TRAIN_PROMPT, (("Grass is green.", "Red."),))]
    assert [group.pairs for group in judge_call["data"].groups] == [
        (("White.", "Blue."),), (("Snow is white, of course.", "Blue."),)
    ]
    held_out = [PointwiseLabel(prompt_from_messages(HELDOUT_QUESTION), "8.", 1.0)]
    assert rm_call["heldout"].pointwise == judge_call["heldout"].pointwise == held_out
    assert rm_call["data"].pointwise == judge_call["data"].pointwise == []
    assert len(rm_call["replay"]) == len(judge_call["replay"]) == 0
    assert rm_call["init_from"] is judge_call["init_from"] is None and rm_call["config"].epochs == 1
    ppo_call = fakes.ppo_calls[0]
    assert (ppo_call["config"].steps, ppo_call["config"].rollout_batch_size) == (2, 4)
    assert ppo_call["reward_model_dir"] == rm_call["out_dir"] and ppo_call["init_adapter"] is None
    # PPO asks the train-side prompts users sent, then three from the corpus; the gate asks judge-side
    # ones (users' most recent first), scored by the judge: never a question PPO trained on.
    [evaluation] = fakes.eval_calls
    assert ppo_call["prompts"][:2] == [LATE_TRAIN_PROMPT, TRAIN_PROMPT] and len(ppo_call["prompts"]) == 5
    assert evaluation["prompts"][:2] == [PROMPT, OTHER_PROMPT] and len(evaluation["prompts"]) == 6
    assert {side_of(p) for p in ppo_call["prompts"]} == {Side.TRAIN}
    assert {side_of(p) for p in evaluation["prompts"]} == {Side.JUDGE}
    assert evaluation["judge_dir"] == judge_call["out_dir"]
    assert evaluation["policy_reward_model_dir"] == rm_call["out_dir"]
    assert len(ppo_call["ptx_texts"]) == 3 and "Snow is white, of course." in ppo_call["ptx_texts"][0]

    registry = PolicyRegistry(settings.registry_dir)
    v1 = registry.get("v1")
    assert json.loads((v1.path / "adapter_config.json").read_text())["call"] == 1
    assert without_stage_times(v1.manifest["metrics"]) == ROUND_METRICS and v1.manifest["gate"] == GATE_REASONS
    assert store.new_feedback_count() == 0

    # Only judge-side feedback is new: the judge is refreshed from round 1's on it with round 1's judge-side
    # data as replay; the policy's reward model has nothing new and stays as it was.
    store.save_batch(EventBatch(feedback=[feedback(type="thumbs", rating="down", **ref("c3", 1))]))
    second = loop.run_round()

    assert (second.status, second.version, second.parent_version) == ("published", "v2", "v1")
    # One rollout engine, started for the first round and kept for the next.
    [rollout] = fakes.rollouts
    assert (rollout.backend, rollout.lora_rank) == ("vllm", 8)
    assert fakes.ppo_calls[0]["rollout"] is fakes.ppo_calls[1]["rollout"] is rollout and not rollout.closed
    assert len(fakes.calls_for("reward_model")) == 1
    assert (second.reward_model_dir / "head.safetensors").read_text() == "fake"  # round 1's, copied
    judge_refresh = fakes.calls_for("judge_model")[1]
    assert judge_refresh["init_from"] == judge_call["out_dir"]
    assert judge_refresh["data"].pointwise == [PointwiseLabel(OTHER_PROMPT, "Five.", 0.0)]
    assert judge_refresh["replay"].groups == judge_call["data"].groups
    assert fakes.ppo_calls[1]["init_adapter"] == v1.path
    assert fakes.ppo_calls[1]["reward_model_dir"] == second.reward_model_dir
    assert registry.latest().manifest["parent"] == "v1"
    assert [(r["round"], r["status"], r["version"], r["feedback_new"]) for r in store.rounds()] == [
        (1, "published", "v1", 4),
        (2, "published", "v2", 1),
    ]

    announced = read_policy_events(settings, 2)
    assert [(e.version, e.base_model) for e in announced] == [("v1", str(settings.base_model))] + [
        ("v2", str(settings.base_model))
    ]
    assert announced[0].metrics == v1.manifest["metrics"]

    # Serving's canary rolls v2 back: the next round trains on from v1, not from the rolled-back version.
    # New train-side feedback refreshes the policy's reward model from round 2's.
    registry.record_verdict("v2", "rolled_back", "approval fell", figures={})
    store.save_batch(EventBatch(feedback=[feedback(type="thumbs", rating="up", **ref("t1", 0))]))
    third = loop.run_round()
    assert (third.status, third.version, third.parent_version) == ("published", "v3", "v1")
    assert fakes.ppo_calls[2]["init_adapter"] == v1.path
    rm_refresh = fakes.calls_for("reward_model")[1]
    assert rm_refresh["init_from"] == second.reward_model_dir
    assert rm_refresh["data"].pointwise == [PointwiseLabel(TRAIN_PROMPT, "Green.", 1.0)]
    assert rm_refresh["replay"].groups == rm_call["data"].groups


def test_a_failed_round_publishes_nothing_and_keeps_its_feedback_new(settings, store, producer):
    store_thumbs_up(store, "t1", "c1")
    fakes = FakeLearners(fail_ppo=True)
    loop = make_loop(settings, store, producer, fakes)
    record = loop.run_round()

    assert record.status == "failed" and "PPO diverged" in record.error
    assert fakes.rollouts[0].closed and loop.rollout is None  # the next round starts a fresh engine
    assert PolicyRegistry(settings.registry_dir).latest().name == "v0"
    assert store.new_feedback_count() == 2
    assert store.rounds()[0]["status"] == "failed"


def test_a_round_the_gate_rejects_publishes_nothing_and_the_next_starts_from_the_same_parent(
    settings, store, producer
):
    store_thumbs_up(store, "t1", "c1")
    rejecting = FakeLearners(reject=True)
    record = make_loop(settings, store, producer, rejecting).run_round()

    assert (record.status, record.version, record.parent_version) == ("rejected", None, "v0")
    [evaluation] = rejecting.eval_calls
    assert evaluation["candidate"] == rejecting.ppo_calls[0]["checkpoint_dir"].parent / "adapter"
    assert evaluation["parent"] is None  # v0: the base model
    assert evaluation["rollout"] is rejecting.rollouts[0]  # sampled by the loop's engine
    assert record.metrics["eval/passed"] == 0.0 and record.metrics["eval/judge_gain"] == -0.1
    assert store.rounds()[0]["error"] == "fail judge gain: -0.100"  # the gate's reasons, in the record
    assert PolicyRegistry(settings.registry_dir).latest().name == "v0"
    assert store.new_feedback_count() == 0  # its feedback is trained on: the reward model learned it

    store.save_batch(EventBatch(feedback=[feedback(type="thumbs", rating="down", **ref("t1", 2))]))
    accepting = FakeLearners()
    second = make_loop(settings, store, producer, accepting).run_round()
    assert (second.status, second.version, second.parent_version) == ("published", "v1", "v0")
    [rm_call] = accepting.calls_for("reward_model")
    assert rm_call["init_from"] == record.reward_model_dir  # the rejected round's RM
    assert [r["status"] for r in store.rounds()] == ["rejected", "published"]


def test_a_round_whose_judge_is_not_validated_is_rejected_before_ppo(settings, store, producer):
    store_thumbs_up(store, "t1", "c1")
    fakes = FakeLearners(judge_metrics=TOO_FEW)
    record = make_loop(settings, store, producer, fakes).run_round()

    assert (record.status, record.parent_version) == ("rejected", "v0")
    assert fakes.ppo_calls == fakes.eval_calls == []  # no PPO: the gate could not pass its policy
    assert record.metrics["eval/passed"] == 0.0 and record.metrics["judge/heldout_ranking_n"] == 3.0
    assert "fail judge: 3 held-out comparisons" in store.rounds()[0]["error"]
    assert store.new_feedback_count() == 0  # both reward models learned it

    # Without any judge-side feedback there is no judge at all: rejected the same way.
    no_judge_data = FakeLearners()
    other = settings.work_dir.parent / "other"
    fresh_settings = settings.model_copy(update=dict(work_dir=other, store_path=other / "store.sqlite3"))
    fresh_store = FeedbackStore(fresh_settings.store_path)
    store_thumbs_up(fresh_store, "t1")
    record = make_loop(fresh_settings, fresh_store, producer, no_judge_data).run_round()
    fresh_store.close()
    assert record.status == "rejected" and no_judge_data.calls_for("judge_model") == []
    assert "no judge-side feedback" in record.error and no_judge_data.ppo_calls == []


def test_a_round_without_train_side_feedback_is_skipped(settings, store, producer):
    # A tie on a train-side question teaches nothing; a thumbs on a judge-side one cannot train PPO's RM.
    tie = feedback(type="pairwise", a=ref("t1", 0), b=ref("t1", 1), preference="tie")
    judged = feedback(type="thumbs", rating="up", **ref("c1"))
    store.save_batch(EventBatch(completions=[COMPLETIONS["t1"], COMPLETIONS["c1"]], feedback=[tie, judged]))
    fakes = FakeLearners()
    record = make_loop(settings, store, producer, fakes).run_round()

    assert record.status == "skipped" and fakes.reward_model_calls == []
    assert store.new_feedback_count() == 0  # or it would trigger round after empty round


def test_a_stop_during_ppo_abandons_the_round_unrecorded(settings, store, producer):
    store_thumbs_up(store, "t1", "c1")
    settings = settings.model_copy(update=dict(min_new_feedback=1, check_interval_s=0.02))
    stop = threading.Event()
    fakes = FakeLearners(stop_during_ppo=stop)
    loop = make_loop(settings, store, producer, fakes, stop)

    loop.run(SimpleNamespace(error=None))  # returns once the round is abandoned
    assert len(fakes.ppo_calls) == 1 and fakes.rollouts[0].closed
    assert store.rounds() == [] and store.new_feedback_count() == 2
    assert PolicyRegistry(settings.registry_dir).latest().name == "v0"


def test_a_round_killed_during_ppo_resumes_on_the_same_data(settings, store, producer):
    store_thumbs_up(store, "t1", "c1")
    killed = FakeLearners(kill_ppo=True)
    with pytest.raises(Killed):
        make_loop(settings, store, producer, killed).run_round()
    # Meanwhile another prompt and more feedback arrive; the restarted trainer finishes the round first.
    late = feedback(type="thumbs", rating="down", **ref("t2", 1))
    store.save_batch(EventBatch(completions=[COMPLETIONS["t2"]], feedback=[late]))
    fakes = FakeLearners()
    record = make_loop(settings, store, producer, fakes).run_round()

    assert (record.round, record.status, record.version) == (1, "published", "v1")
    assert fakes.reward_model_calls == []  # the round's reward models were complete: kept, not retrained
    first, again = killed.ppo_calls[0], fakes.ppo_calls[0]
    assert again["prompts"] == first["prompts"] and LATE_TRAIN_PROMPT not in again["prompts"]
    plan = RoundPlan.read(settings.work_dir / "rounds" / "000001" / RoundPlan.FILE)
    assert fakes.eval_calls[0]["prompts"] == list(plan.gate_prompts) and plan.gate_prompts
    assert again["checkpoint_dir"] == first["checkpoint_dir"] and again["checkpoint_dir"] is not None
    assert store.rounds()[0]["feedback_new"] == 2 and store.new_feedback_count() == 1  # the late one waits


def test_a_round_killed_after_publishing_does_not_publish_twice(settings, store, producer, monkeypatch):
    store_thumbs_up(store, "t1", "c1")

    def killed_before_recording(record):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(store, "record_round", killed_before_recording)
        with pytest.raises(Killed):
            make_loop(settings, store, producer, FakeLearners()).run_round()
    assert PolicyRegistry(settings.registry_dir).latest().name == "v1" and store.rounds() == []

    restarted = FakeLearners()
    record = make_loop(settings, store, producer, restarted).run_round()
    assert (record.round, record.status, record.version) == (1, "published", "v1")
    assert restarted.reward_model_calls == restarted.ppo_calls == []  # nothing trained again
    assert without_stage_times(record.metrics) == ROUND_METRICS
    assert [v.name for v in PolicyRegistry(settings.registry_dir).list()] == ["v0", "v1"]
    assert store.new_feedback_count() == 0


def test_waiting_for_feedback(settings, store, producer):
    settings = settings.model_copy(update=dict(min_new_feedback=2, max_wait_s=0.5, check_interval_s=0.02))
    stop = threading.Event()
    loop = make_loop(settings, store, producer, FakeLearners(), stop)
    healthy = SimpleNamespace(error=None)

    def wait() -> tuple[bool, float]:
        started = time.monotonic()
        return loop.wait_for_feedback(healthy, since=started), time.monotonic() - started

    # Nothing new: waits past max_wait_s until stopped.
    threading.Timer(0.8, stop.set).start()
    assert wait()[0] is False
    stop.clear()
    # Feedback without its completion is not ready.
    store.save_batch(EventBatch(feedback=[feedback(type="thumbs", rating="up", **ref("c1"))]))
    threading.Timer(0.8, stop.set).start()
    assert wait()[0] is False
    stop.clear()
    # One ready event, fewer than min_new_feedback: a round after max_wait_s.
    store.save_batch(EventBatch(completions=[COMPLETIONS["c1"]]))
    ready, waited = wait()
    assert ready and waited >= 0.5
    # Two: a round at once.
    store.save_batch(EventBatch(feedback=[feedback(type="thumbs", rating="down", **ref("c1"))]))
    ready, waited = wait()
    assert ready and waited < 0.4
    # A dead ingest thread stops the loop.
    with pytest.raises(RuntimeError, match="ingest"):
        loop.wait_for_feedback(SimpleNamespace(error=OSError("disk full")), since=time.monotonic())


def test_a_round_waits_for_the_canary_verdict_on_the_newest_version(settings, store, producer):
    settings = settings.model_copy(update=dict(min_new_feedback=1, check_interval_s=0.02, await_verdict_s=1.5))
    stop = threading.Event()
    loop = make_loop(settings, store, producer, FakeLearners(), stop)
    store_thumbs_up(store, "t1", "c1")
    assert loop.run_round().version == "v1"  # serving now tries v1 in canary
    store_thumbs_up(store, "t2")
    healthy = SimpleNamespace(error=None)

    # Feedback is ready, but v1 has no verdict yet: a new version would supersede its canary.
    threading.Timer(0.5, stop.set).start()
    assert loop.wait_for_feedback(healthy, since=time.monotonic()) is False
    stop.clear()
    # The verdict arrives: the round starts at once.
    PolicyRegistry(settings.registry_dir).record_verdict("v1", "promoted", "canary", {})
    started = time.monotonic()
    assert loop.wait_for_feedback(healthy, since=started) and time.monotonic() - started < 0.5
    # A version whose canary never decides holds the trainer back for at most await_verdict_s.
    loop.run_round()
    store_thumbs_up(store, "c2")
    started = time.monotonic()
    assert loop.wait_for_feedback(healthy, since=started)
    assert 1.5 <= time.monotonic() - started < 5


def test_the_trainer_process_serves_metrics_logs_json_and_stops_on_sigterm(settings, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "RLHF_TOPIC_PREFIX": settings.topic_prefix,
        "RLHF_BASE_MODEL": str(settings.base_model),
        "RLHF_REGISTRY_DIR": str(settings.registry_dir),
        "TRAINER_WORK_DIR": str(settings.work_dir),
        "TRAINER_GROUP_ID": settings.group_id,
        "TRAINER_METRICS_PORT": str(port),
        "TRAINER_MIN_NEW_FEEDBACK": "1000",  # no round: this test is about the process around the rounds
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        produce(settings, [COMPLETIONS["c1"]], [])

        def ingested() -> bool:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                return False
            return 'rlhf_trainer_events_ingested_total{type="completion"} 1.0' in page

        wait_until(ingested, timeout_s=90, what="the trainer to ingest the completion")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr.decode()[-3000:]
    lines = [json.loads(line) for line in stdout.decode().splitlines()]  # every line is JSON
    events = [line["event"] for line in lines if line["logger"].startswith("trainer")]
    assert events[0] == "trainer.started" and events[-1] == "trainer.stopped"
    assert "ingest.batch" in events and "trainer.stopping" in events
    store = FeedbackStore(settings.store_path)
    assert store.row_counts()["completions"] == 1
    store.close()
