"""The store (idempotent batches, read-time join, round bookkeeping) and feedback -> training data."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common.dead_letters import DeadLetter
from feedback.events import CompletionChoice, CompletionEvent, FeedbackEvent, Message, SamplingRecord
from trainer.data import Demonstration, PointwiseLabel, PreferenceGroup, prompt_from_messages
from trainer.data.store import (
    ROUNDS_TABLE,
    SCHEMA,
    EventBatch,
    FeedbackStore,
    RoundRecord,
    to_training_data,
)

QUESTION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What colour is snow?"},
]
OTHER_QUESTION = [{"role": "user", "content": "What is 2 plus 2?"}]
PROMPT = prompt_from_messages(QUESTION)
OTHER_PROMPT = prompt_from_messages(OTHER_QUESTION)


def completion(completion_id: str, answers: list[str], messages: list[dict] = QUESTION) -> CompletionEvent:
    return CompletionEvent(
        completion_id=completion_id,
        model="policy",
        policy_version="v0",
        messages=[Message(**m) for m in messages],
        choices=[
            CompletionChoice(index=i, text=text, finish_reason="stop", completion_tokens=3)
            for i, text in enumerate(answers)
        ],
        sampling=SamplingRecord(temperature=1.0, top_p=1.0, max_tokens=16, n=len(answers)),
        prompt_tokens=7,
    )


def feedback(user: str | None = None, at: int | None = None, **fields) -> FeedbackEvent:
    """A feedback event of `user` (a user hash), received `at` seconds after 2025-01-01 if given."""
    times = {} if at is None else {"received_at": datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=at)}
    return FeedbackEvent.model_validate({"feedback": fields, "user_hash": user, **times})


def ref(completion_id: str, choice_index: int = 0) -> dict:
    return {"completion_id": completion_id, "choice_index": choice_index}


COMPLETIONS = {
    c.completion_id: c
    for c in [
        completion("c1", ["White.", "Snow is white.", "Blue."]),
        completion("c2", ["It is white."]),  # same prompt as c1, another request
        completion("c3", ["4.", "Five."], OTHER_QUESTION),
        completion("c4", ["Snow is white."]),  # the same text as c1's choice 1, another request
    ]
}


# --- Conversions ------------------------------------------------------------------------------------


def test_thumbs_become_pointwise_labels():
    data = to_training_data(
        [
            feedback(type="thumbs", rating="up", **ref("c1", 1)),
            feedback(type="thumbs", rating="down", **ref("c1", 2)),
        ],
        COMPLETIONS,
    )
    assert data.reward.pointwise == [
        PointwiseLabel(PROMPT, "Snow is white.", 1.0),
        PointwiseLabel(PROMPT, "Blue.", 0.0),
    ]
    assert data.reward.groups == [] and data.demonstrations == []


def test_ratings_become_scaled_labels_only_and_the_latest_rating_of_a_user_wins():
    data = to_training_data(
        [
            feedback(type="rating", score=7, user="u1", **ref("c1", 0)),
            feedback(type="rating", score=3, user="u1", **ref("c1", 2)),
            feedback(type="rating", score=7, user="u1", **ref("c2", 0)),
            feedback(type="rating", score=5, user="u1", **ref("c1", 2)),  # u1 changes its mind on "Blue."
            feedback(type="rating", score=1, user="u2", **ref("c1", 2)),  # another user: its own opinion
        ],
        COMPLETIONS,
    )
    # Scores 7, 7, 5 (not 3: replaced) and u2's 1, scaled by (score - 1) / 6; no pairs between rated
    # answers (a rating counts once, as a label), in the order of the events kept.
    assert data.reward.pointwise == [
        PointwiseLabel(PROMPT, "White.", 1.0),
        PointwiseLabel(PROMPT, "It is white.", 1.0),
        PointwiseLabel(PROMPT, "Blue.", 4 / 6),
        PointwiseLabel(PROMPT, "Blue.", 0.0),
    ]
    assert data.reward.groups == []


def test_an_answer_rated_many_times_weighs_once_and_the_latest_received_wins():
    events = [feedback(type="thumbs", rating="up", user="u1", at=i, **ref("c1", 1)) for i in range(50)]
    events.append(feedback(type="rating", score=2, user="u1", at=60, **ref("c1", 1)))  # latest, any kind
    events.append(feedback(type="thumbs", rating="up", user="u1", at=55, **ref("c1", 1)))  # arrives late
    # An answer is its prompt and text: c4's choice is the same answer as c1's choice 1.
    events.append(feedback(type="thumbs", rating="down", user="u1", at=30, **ref("c4", 0)))
    data = to_training_data(events, COMPLETIONS)
    assert data.reward.pointwise == [PointwiseLabel(PROMPT, "Snow is white.", 1 / 6)]


def test_without_a_user_hash_the_answer_itself_is_the_key():
    data = to_training_data(
        [
            feedback(type="thumbs", rating="up", **ref("c1", 0)),
            feedback(type="thumbs", rating="down", **ref("c1", 0)),
            feedback(type="thumbs", rating="up", user="u1", **ref("c1", 0)),
        ],
        COMPLETIONS,
    )
    # The anonymous "down" replaced the anonymous "up"; u1's opinion is its own.
    assert data.reward.pointwise == [
        PointwiseLabel(PROMPT, "White.", 0.0),
        PointwiseLabel(PROMPT, "White.", 1.0),
    ]


def test_pairwise_gives_one_pair_and_a_tie_none():
    data = to_training_data(
        [
            feedback(type="pairwise", a=ref("c1", 0), b=ref("c1", 2), preference="b"),
            feedback(type="pairwise", a=ref("c1", 0), b=ref("c2", 0), preference="tie"),
        ],
        COMPLETIONS,
    )
    assert data.reward.groups == [PreferenceGroup(PROMPT, (("Blue.", "White."),))]
    assert data.reward.pointwise == []


def test_both_bad_is_a_thumbs_down_on_each_answer_and_a_later_thumbs_up_replaces_one():
    data = to_training_data(
        [
            feedback(type="pairwise", a=ref("c1", 0), b=ref("c1", 2), preference="tie", both_bad=True, at=1),
            feedback(type="thumbs", completion_id="c1", choice_index=2, rating="up", at=2),
        ],
        COMPLETIONS,
    )
    assert data.reward.groups == []
    assert data.reward.pointwise == [PointwiseLabel(PROMPT, "White.", 0.0), PointwiseLabel(PROMPT, "Blue.", 1.0)]


def test_ranking_gives_all_pairs_in_one_group():
    data = to_training_data(
        [feedback(type="ranking", ranked=[ref("c1", 1), ref("c2", 0), ref("c1", 2)])], COMPLETIONS
    )
    assert data.reward.groups == [
        PreferenceGroup(
            PROMPT,
            (("Snow is white.", "It is white."), ("Snow is white.", "Blue."), ("It is white.", "Blue.")),
        )
    ]


def test_correction_gives_a_demonstration_and_a_pair_over_the_original():
    data = to_training_data([feedback(type="correction", text="Snow is white.", **ref("c1", 2))], COMPLETIONS)
    assert data.demonstrations == [Demonstration(PROMPT, "Snow is white.")]
    assert data.reward.groups == [PreferenceGroup(PROMPT, (("Snow is white.", "Blue."),))]


def test_each_piece_of_feedback_is_its_own_group_not_merged_by_prompt():
    data = to_training_data(
        [
            feedback(type="pairwise", a=ref("c1", 0), b=ref("c1", 2), preference="a"),
            feedback(type="pairwise", a=ref("c3", 0), b=ref("c3", 1), preference="a"),
            feedback(type="ranking", ranked=[ref("c2", 0), ref("c1", 2)]),
        ],
        COMPLETIONS,
    )
    assert data.reward.groups == [
        PreferenceGroup(PROMPT, (("White.", "Blue."),)),
        PreferenceGroup(OTHER_PROMPT, (("4.", "Five."),)),
        PreferenceGroup(PROMPT, (("It is white.", "Blue."),)),
    ]


def test_a_comparison_counts_once_per_user_and_pair_of_answers():
    data = to_training_data(
        [
            # u1 says "White." > "Blue." three times, the third time inside a ranking: counted once, in the
            # latest event, so the ranking keeps it and the two pairwise events give nothing.
            feedback(type="pairwise", a=ref("c1", 0), b=ref("c1", 2), preference="a", user="u1", at=1),
            feedback(type="pairwise", a=ref("c1", 0), b=ref("c1", 2), preference="a", user="u1", at=2),
            feedback(type="ranking", ranked=[ref("c1", 0), ref("c1", 1), ref("c1", 2)], user="u1", at=3),
            # u1 then prefers "Blue." to "Snow is white." (either order of a and b is one pair): that pair
            # leaves the ranking's group and is counted here.
            feedback(type="pairwise", a=ref("c1", 2), b=ref("c4", 0), preference="a", user="u1", at=4),
            # u2's identical comparison is another user's: it counts.
            feedback(type="pairwise", a=ref("c1", 0), b=ref("c1", 2), preference="a", user="u2", at=5),
            # u3 prefers "4." then calls it a tie: the tie replaces the preference and is no pair itself.
            feedback(type="pairwise", a=ref("c3", 0), b=ref("c3", 1), preference="a", user="u3", at=6),
            feedback(type="pairwise", a=ref("c3", 1), b=ref("c3", 0), preference="tie", user="u3", at=7),
        ],
        COMPLETIONS,
    )
    assert data.reward.groups == [
        PreferenceGroup(PROMPT, (("White.", "Snow is white."), ("White.", "Blue."))),
        PreferenceGroup(PROMPT, (("Blue.", "Snow is white."),)),
        PreferenceGroup(PROMPT, (("White.", "Blue."),)),
    ]


def test_feedback_that_names_no_answer_or_mixes_prompts_is_skipped():
    data = to_training_data(
        [
            feedback(type="thumbs", rating="up", **ref("missing")),
            feedback(type="thumbs", rating="up", **ref("c2", 5)),  # c2 has one choice
            feedback(type="pairwise", a=ref("c1", 0), b=ref("c3", 0), preference="a"),
            feedback(type="correction", text="White.", **ref("c1", 0)),  # same text: no pair
        ],
        COMPLETIONS,
    )
    assert data.reward.groups == [] and data.reward.pointwise == []
    assert data.demonstrations == [Demonstration(PROMPT, "White.")]


# --- The store --------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path):
    store = FeedbackStore(tmp_path / "store.sqlite3")
    yield store
    store.close()


def test_a_replayed_batch_is_stored_once(store: FeedbackStore):
    batch = EventBatch(
        completions=[COMPLETIONS["c1"]],
        feedback=[feedback(type="thumbs", rating="up", **ref("c1"))],
        dead_letters=[DeadLetter(topic="t", partition=0, offset=7, value="{not json", reason="bad", consumer="trainer")],
    )
    first = store.save_batch(batch)
    again = store.save_batch(batch)
    assert (dict(first.stored), first.duplicates, first.dead_letters) == (
        {"completion": 1, "thumbs": 1},
        0,
        1,
    )
    assert (sum(again.stored.values()), again.duplicates, again.dead_letters) == (0, 2, 0)
    assert store.row_counts() == {"completions": 1, "feedback": 1, "dead_letters": 1, "rounds": 0}
    assert store.new_feedback_count() == 1


def test_a_batch_that_fails_midway_stores_nothing(store: FeedbackStore):
    # SQLite cannot bind a value that is not text: the batch fails after the completion went in.
    broken = DeadLetter.model_construct(topic="t", partition=0, offset=1, value=object(), reason="bad")
    with pytest.raises(sqlite3.Error):
        store.save_batch(EventBatch(completions=[COMPLETIONS["c1"]], dead_letters=[broken]))
    assert store.row_counts()["completions"] == 0


def test_feedback_waits_for_its_completion(store: FeedbackStore):
    store.save_batch(
        EventBatch(feedback=[feedback(type="pairwise", a=ref("c1"), b=ref("c2"), preference="a")])
    )
    store.save_batch(EventBatch(completions=[COMPLETIONS["c1"]]))
    assert store.new_feedback_count() == 0
    assert store.training_snapshot().feedback_total == 0

    store.save_batch(EventBatch(completions=[COMPLETIONS["c2"]]))
    assert store.new_feedback_count() == 1
    snapshot = store.training_snapshot()
    assert snapshot.data.reward.groups == [PreferenceGroup(PROMPT, (("White.", "It is white."),))]


def test_rounds_consume_new_feedback_unless_they_fail(store: FeedbackStore):
    events = [
        feedback(type="thumbs", rating="up", **ref("c1")),
        feedback(type="thumbs", rating="down", **ref("c2")),
    ]
    store.save_batch(EventBatch(completions=[COMPLETIONS["c1"], COMPLETIONS["c2"]], feedback=events))
    snapshot = store.training_snapshot()
    assert set(snapshot.new_feedback_ids) == {e.event_id for e in events}

    def finish(status: str, round_: int, rm_dir: str | None = None) -> None:
        store.record_round(
            RoundRecord(
                round=round_,
                started_at=datetime.now(UTC),
                status=status,
                feedback_total=snapshot.feedback_total,
                new_feedback_ids=snapshot.new_feedback_ids,
                reward_model_dir=Path(rm_dir) if rm_dir else None,
            )
        )

    finish("failed", 1)
    assert store.new_feedback_count() == 2 and store.next_round() == 2
    finish("published", 2, "rounds/2/rm")
    assert store.new_feedback_count() == 0
    assert store.last_reward_model_dir() == Path("rounds/2/rm")

    # New feedback: a changed mind on c1's answer (anonymous: the answer is the key), and a first opinion.
    later = [
        feedback(type="thumbs", rating="down", **ref("c1")),
        feedback(type="rating", score=7, **ref("c1", 1)),
    ]
    store.save_batch(EventBatch(feedback=later))
    snapshot = store.training_snapshot()
    assert snapshot.new_feedback_ids == tuple(e.event_id for e in later)
    c2_down = PointwiseLabel(PROMPT, "It is white.", 0.0)
    c1_down, c1_7 = PointwiseLabel(PROMPT, "White.", 0.0), PointwiseLabel(PROMPT, "Snow is white.", 1.0)
    # Seen: the old thumbs less the one the new feedback replaced; all: seen and new.
    assert snapshot.new_data.reward.pointwise == [c1_down, c1_7]
    assert snapshot.seen_data.reward.pointwise == [c2_down]
    assert snapshot.data.reward.pointwise == [c2_down, c1_down, c1_7]
    assert [(r["round"], r["status"], r["feedback_new"]) for r in store.rounds()] == [
        (1, "failed", 2),
        (2, "published", 2),
    ]


def test_user_prompts_are_distinct_and_most_recent_first(store: FeedbackStore):
    store.save_batch(EventBatch(completions=[COMPLETIONS["c1"], COMPLETIONS["c3"], COMPLETIONS["c2"]]))
    assert store.user_prompts(limit=10) == [PROMPT, OTHER_PROMPT]
    assert store.user_prompts(limit=1) == [PROMPT]


def test_a_store_from_before_the_evaluation_gate_accepts_rejected_rounds(tmp_path):
    path = tmp_path / "old.db"
    old_rounds = ROUNDS_TABLE.format(name="rounds").replace("'rejected', ", "")
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA + old_rounds)
        db.execute("INSERT INTO rounds VALUES (1, 't0', 't1', 'published', 'v0', 'v1', 2, 2, 'rm/1', '{}', NULL)")
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO rounds VALUES (2, 't', 't', 'rejected', 'v1', NULL, 2, 0, NULL, '{}', NULL)")
    store = FeedbackStore(path)
    store.record_round(
        RoundRecord(round=2, started_at=datetime.now(UTC), status="rejected", feedback_total=2,
                    new_feedback_ids=(), reward_model_dir=Path("rm/2"))  # fmt: skip
    )
    assert [(r["round"], r["status"], r["version"]) for r in store.rounds()] == [
        (1, "published", "v1"),
        (2, "rejected", None),
    ]
    assert store.last_reward_model_dir() == Path("rm/2")
    store.close()
    FeedbackStore(path).close()  # a migrated store opens as it is


def test_a_round_takes_at_most_the_cap_of_one_users_feedback_their_latest(store: FeedbackStore):
    answers = [f"Answer {i}." for i in range(6)]
    store.save_batch(EventBatch(completions=[completion("many", answers)]))
    heavy = [feedback(user="heavy", at=i, type="thumbs", rating="up", **ref("many", i)) for i in range(6)]
    light = [feedback(user="light", at=10, type="thumbs", rating="down", **ref("many", 0))]
    anonymous = [feedback(at=20 + i, type="thumbs", rating="down", **ref("many", i)) for i in range(4)]
    store.save_batch(EventBatch(feedback=heavy + light + anonymous))

    capped = store.training_snapshot(max_per_user=2)
    assert capped.capped == 4
    rated = [(label.response, label.target) for label in capped.data.reward.pointwise]
    # heavy: only their latest two; light: theirs; anonymous: not capped.
    assert rated == [("Answer 4.", 1.0), ("Answer 5.", 1.0), ("Answer 0.", 0.0)] + [
        (answers[i], 0.0) for i in range(4)]
    uncapped = store.training_snapshot()
    assert (uncapped.capped, len(uncapped.data.reward.pointwise)) == (0, 11)
