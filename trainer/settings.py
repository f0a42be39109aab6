"""The trainer's settings: TRAINER_* environment variables on top of the shared ones.

Defaults run locally from the repository root (relative paths under var/). The round-size knobs are
unset by default, which keeps the learners' own config defaults; tests set them to make a round fast.
"""

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import SharedSettings


class TrainerSettings(SharedSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRAINER_", extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    work_dir: Path = Field(
        Path("var/trainer"),
        description="Where rounds write their reward models and adapters before publishing.",
    )
    store_path: Path | None = Field(
        None,
        description="SQLite file of consumed events and finished rounds (unset: <work_dir>/store.sqlite3).",
    )
    group_id: str = Field(
        "rlhf-trainer", description="Kafka consumer group of the completions/feedback reader."
    )
    group_instance_id: str | None = Field(
        "rlhf-trainer-0",
        description="Static membership of that group (KIP-345), so that a restarted trainer takes its "
        "partitions back: Tansu, the embedded broker, never expires a dynamic member that left while "
        "joining, and the next trainer waited on it for 11 minutes. One running trainer per id: Kafka "
        "fences the older of two, Tansu lets both read (measured). Empty: dynamic membership.",
    )
    min_new_feedback: int = Field(
        32,
        ge=1,
        description="Start a round once this many feedback events no round has trained on are ready.",
    )
    max_wait_s: float = Field(
        600.0, gt=0, description="Start a round anyway after this many seconds if any new feedback is ready."
    )
    check_interval_s: float = Field(1.0, gt=0, description="How often the loop looks for new feedback.")
    metrics_port: int = Field(
        8001, ge=0, description="Port of the Prometheus /metrics endpoint; 0 disables it."
    )
    user_prompts: int = Field(
        256, ge=0, description="PPO trains on up to this many distinct prompts users sent, most recent first."
    )
    corpus_prompts: int = Field(
        64,
        ge=0,
        description="Corpus prompts mixed into each round's PPO prompts "
        "(trainer.data.corpus.sample_prompts).",
    )
    ptx_dialogues: int = Field(
        64,
        ge=0,
        description="Corpus dialogues in PPO's language-model (ptx) term, beside users' corrections.",
    )
    max_feedback_per_user: int = Field(
        1000, ge=0, description="A round trains on at most this many feedback events of one end user "
        "(`user_hash`), their latest: one user cannot outweigh everyone else. Anonymous feedback is not "
        "capped (serving's per-key rate limit bounds it). The events left out are counted in the round's "
        "metrics (feedback/capped_per_user). 0: no cap.",
    )
    seed: int = Field(0, description="Seed of a round's corpus sampling; the round number is added to it.")
    torch_threads: int = Field(
        1, ge=1, description="CPU threads of the trainer's torch (its training and, on the CPU, its rollout "
        "engine). 1 because `make up` puts serving on the same cores: torch's default, one per core, spins "
        "threads that wait on each other while serving holds a core (measured: a PPO round 8-54x slower, "
        "idle or under 3 requests/s; docs/training.md). On a host of its own, set the cores it has.",
    )

    rm_epochs: int | None = Field(
        None, ge=1, description="Reward-model epochs per round (unset: config default)."
    )
    ppo_steps: int | None = Field(None, ge=1, description="PPO iterations per round (unset: config default).")
    ppo_rollout_batch_size: int | None = Field(
        None, ge=1, description="Prompts per PPO rollout batch (unset: config default)."
    )
    ppo_max_new_tokens: int | None = Field(
        None, ge=1, description="Longest PPO rollout answer in tokens (unset: config default)."
    )
    ppo_ptx_coef: float | None = Field(
        None, ge=0, description="Weight of PPO's language-model term on users' corrections and corpus dialogues "
        "(PPO-ptx; unset: PPOConfig default).",
    )
    ppo_rollout_backend: Literal["hf", "vllm"] | None = Field(
        None,
        description="Who samples PPO's rollouts: 'vllm' (an engine of the trainer's own, started at the "
        "first round and kept) or 'hf' (transformers' generate); unset: PPOConfig's default, vllm.",
    )
    eval_prompts: int | None = Field(
        None, ge=1, description="Judge-side prompts the evaluation gate asks (unset: EvalConfig default, 64)."
    )
    eval_max_reward_drop_se: float | None = Field(
        None, description="The gate rejects a policy whose judge reward is below its parent's by more than "
        "this many clustered standard errors (unset: EvalConfig default, 3).",
    )
    eval_max_kl: float | None = Field(
        None, gt=0, description="The gate rejects a policy further than this from the reference, in nats per "
        "answer (unset: EvalConfig default, 10).",
    )
    eval_require_validated_judge: bool | None = Field(
        None, description="False lets the gate decide with a judge that held-out feedback has not validated "
        "(plumbing tests only: its verdict is noise). Unset: EvalConfig default, true.",
    )
    await_verdict_s: float = Field(
        7200.0, ge=0, description="A round waits until serving's canary has decided on the newest published "
        "version, at most this long: a version published while the last is still in canary would supersede "
        "it without a verdict, and with rounds faster than canaries nothing would ever be promoted. 0: never "
        "wait. Versions served without a canary (SERVING_CANARY__FRACTION=0) are recorded as promoted at once.",
    )
    sft_adapter: Path | None = Field(
        None,
        description="An SFT adapter (`python -m trainer sft`): PPO's reference policy, and the start of the "
        "first version's policy. Unset: the base model is the reference.",
    )

    @field_validator("group_instance_id")
    @classmethod
    def _empty_is_dynamic(cls, value: str | None) -> str | None:
        return value or None  # TRAINER_GROUP_INSTANCE_ID="" turns static membership off

    @model_validator(mode="after")
    def _store_in_work_dir(self) -> Self:
        if self.store_path is None:
            self.store_path = self.work_dir / "store.sqlite3"
        return self
