"""The trainer's Prometheus metrics, served on TRAINER_METRICS_PORT by the loop."""

from prometheus_client import Counter, Gauge

from trainer.data.store import StoredCounts

EVENTS_INGESTED = Counter(
    "rlhf_trainer_events_ingested_total",
    "Events stored for the first time, by type ('completion' or the feedback kind).",
    ["type"],
)
DUPLICATE_EVENTS = Counter(
    "rlhf_trainer_duplicate_events_total", "Re-delivered events ignored as already stored."
)
DEAD_LETTERS = Counter(
    "rlhf_trainer_dead_letters_total", "Records that did not parse, kept in the dead-letter table."
)
ROUNDS = Counter("rlhf_trainer_rounds_total", "Finished training rounds, by status.", ["status"])
NEW_FEEDBACK = Gauge("rlhf_trainer_new_feedback", "Ready feedback events that no round has trained on yet.")
LAST_ROUND = Gauge("rlhf_trainer_last_round_metric", "Metrics of the last published round.", ["name"])
POLICY_VERSION = Gauge(
    "rlhf_trainer_policy_version", "Number of the latest published policy version (0: base)."
)


def count_stored(counts: StoredCounts) -> None:
    for event_type, n in counts.stored.items():
        EVENTS_INGESTED.labels(type=event_type).inc(n)
    DUPLICATE_EVENTS.inc(counts.duplicates)
    DEAD_LETTERS.inc(counts.dead_letters)


def show_round(metrics: dict[str, float], version_number: int) -> None:
    LAST_ROUND.clear()  # a metric the last round did not report must not linger from an older round
    for name, value in metrics.items():
        LAST_ROUND.labels(name=name).set(value)
    POLICY_VERSION.set(version_number)


TRAINING_STEP = Gauge(
    "rlhf_trainer_step_metric",
    "Metrics of the latest training step by stage (sft, ppo; rm: of the last reward-model fit) and name: "
    "reward_mean/std, kl, entropy, clipfrac, approx_kl, policy/value/ptx loss, explained_variance, "
    "response_length, tokens_per_s, ...",
    ["stage", "name"],
)
TRAINING_STEPS = Counter("rlhf_trainer_steps_total", "Training steps completed, by stage.", ["stage"])


def show_step(stage: str, metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        TRAINING_STEP.labels(stage=stage, name=name).set(value)
    TRAINING_STEPS.labels(stage=stage).inc()
