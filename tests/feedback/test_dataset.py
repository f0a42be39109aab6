"""The exported dataset: TRL's conversational formats, each opinion once, the latest of a user winning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from feedback import CompletionChoice, CompletionEvent, FeedbackEvent, Message, SamplingRecord
from feedback.dataset import preference_rows

PROMPT = [{"role": "user", "content": "What colour is snow?"}]


def completion(completion_id: str, *answers: str) -> CompletionEvent:
    return CompletionEvent(
        completion_id=completion_id, model="policy", policy_version="v0",
        messages=[Message(**m) for m in PROMPT],
        choices=[CompletionChoice(index=i, text=t, finish_reason="stop", completion_tokens=2)
                 for i, t in enumerate(answers)],
        sampling=SamplingRecord(temperature=1.0, top_p=1.0, max_tokens=8, n=len(answers)), prompt_tokens=4)


COMPLETIONS = {"c1": completion("c1", "White.", "Blue.", "Green.")}


def event(at: int, user: str | None = None, event_id: str | None = None, **feedback) -> FeedbackEvent:
    ids = {"event_id": event_id} if event_id else {}
    return FeedbackEvent.model_validate({"feedback": feedback, "user_hash": user, **ids,
                                         "received_at": datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=at)})


def ref(index: int) -> dict:
    return {"completion_id": "c1", "choice_index": index}


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_pairwise_ranking_and_correction_become_trl_preference_rows():
    pairs, _ = preference_rows(COMPLETIONS, [
        event(0, type="pairwise", a=ref(0), b=ref(1), preference="a"),
        event(1, type="ranking", ranked=[ref(0), ref(2), ref(1)], user="u2"),
        event(2, type="correction", text="Snow is white.", **ref(1)),
    ])
    assert pairs[0] == {"prompt": PROMPT, "chosen": assistant("White."), "rejected": assistant("Blue.")}
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs[1:]] == [
        ("White.", "Green."), ("White.", "Blue."), ("Green.", "Blue."), ("Snow is white.", "Blue.")]


def test_thumbs_ratings_and_both_bad_become_unpaired_labels():
    _, unpaired = preference_rows(COMPLETIONS, [
        event(0, type="thumbs", rating="up", **ref(0)),
        event(1, type="rating", score=2, **ref(1)),
        event(2, type="rating", score=4, **ref(2)),  # neither: left out
        event(3, user="u2", type="pairwise", a=ref(1), b=ref(2), preference="tie", both_bad=True),
    ])
    assert [(row["completion"][0]["content"], row["label"]) for row in unpaired] == [
        ("White.", True), ("Blue.", False), ("Blue.", False), ("Green.", False)]
    assert unpaired[0]["prompt"] == PROMPT


def test_one_users_latest_opinion_counts_once_and_a_replayed_event_once():
    flips = [event(i, user="u", type="thumbs", rating="up" if i % 2 else "down", **ref(0)) for i in range(50)]
    duplicate = event(60, user="v", event_id="same", type="pairwise", a=ref(0), b=ref(1), preference="a")
    pairs, unpaired = preference_rows(COMPLETIONS, [*flips, duplicate, duplicate])
    assert [row["label"] for row in unpaired] == [True]  # the 50th (i = 49) was up
    assert len(pairs) == 1
    # A later tie withdraws the user's choice.
    tie = event(70, user="v", type="pairwise", a=ref(1), b=ref(0), preference="tie")
    assert preference_rows(COMPLETIONS, [duplicate, tie])[0] == []


def test_feedback_on_an_unknown_completion_is_left_out():
    assert preference_rows({}, [event(0, type="thumbs", rating="up", **ref(0))]) == ([], [])
