"""The data split (trainer.data.split) on feedback of every kind as the store turns it into training data: a
prompt is on one side only, the same question lands on the same side whatever comes before it, and no
prompt changes side as feedback grows round after round."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

from feedback.events import CompletionChoice, CompletionEvent, FeedbackEvent, Message, SamplingRecord
from trainer.data import RewardDataset, prompt_from_messages
from trainer.data.corpus import FAMILIES, SYSTEMS
from trainer.data.split import Side, prompt_key, side_of, split_dataset
from trainer.data.store import EventBatch, FeedbackStore, RoundRecord

USERS = [None, "user-1", "user-2", "user-3"]


def question_pool(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """`n` distinct corpus questions, each with its answer phrasings."""
    rng, pool = random.Random(seed), {}
    while len(pool) < n:
        question, phrasings = FAMILIES[rng.choice(sorted(FAMILIES))](rng)
        pool.setdefault(question, phrasings)
    return list(pool.items())


def asked(rng: random.Random, question: str) -> list[dict]:
    """The question as a user might send it: after a system message or an earlier exchange, or neither."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(sorted(SYSTEMS))})
    if rng.random() < 0.3:
        messages += [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there!"}]
    return [*messages, {"role": "user", "content": question}]


def completion(rng: random.Random, question: str, phrasings: list[str]) -> CompletionEvent:
    answers = rng.sample(phrasings, min(len(phrasings), rng.randint(2, 4)))
    return CompletionEvent(
        completion_id=f"c{rng.getrandbits(64):x}",
        model="policy",
        policy_version="v0",
        messages=[Message(**m) for m in asked(rng, question)],
        choices=[CompletionChoice(index=i, text=a, finish_reason="stop", completion_tokens=3)
                 for i, a in enumerate(answers)],  # fmt: skip
        sampling=SamplingRecord(temperature=1.0, top_p=1.0, max_tokens=16, n=len(answers)),
        prompt_tokens=7,
    )


def feedback_on(rng: random.Random, served: CompletionEvent) -> list[FeedbackEvent]:
    """Every kind of feedback on one completion, from random users."""
    refs = [{"completion_id": served.completion_id, "choice_index": c.index} for c in served.choices]
    kinds = [
        {"type": "thumbs", "rating": rng.choice(["up", "down"]), **refs[0]},
        {"type": "rating", "score": rng.randint(1, 7), **refs[1]},
        {"type": "pairwise", "a": refs[0], "b": refs[1], "preference": rng.choice("ab")},
        {"type": "ranking", "ranked": rng.sample(refs, len(refs))},
        {"type": "correction", "text": f"{served.choices[0].text} Hope that helps!", **refs[0]},
    ]
    return [FeedbackEvent.model_validate({"feedback": k, "user_hash": rng.choice(USERS)}) for k in kinds]


def keys(data: RewardDataset) -> set[str]:
    return {prompt_key(element.prompt) for element in data.elements()}


def test_the_same_question_lands_on_the_same_side_whatever_comes_before_it():
    rng = random.Random(0)
    for question, _ in question_pool(300, seed=1):
        variants = [asked(rng, question) for _ in range(6)]
        variants.append([{"role": "user", "content": f"  {question.upper()} "}])  # case and spacing folded
        sides = {side_of(prompt_from_messages(messages)) for messages in variants}
        assert sides == {side_of(prompt_from_messages([{"role": "user", "content": question}]))}, question


def test_a_prompt_stays_on_one_side_for_every_kind_of_feedback_across_rounds(tmp_path):
    # Five rounds of growing feedback on up to 150 questions, asked again and again under other system
    # messages and earlier turns, with every kind of feedback. Each round splits as the loop does: new
    # feedback of the train side to train on, seen feedback of the train side to replay, and the
    # held-out side of everything to measure.
    rng, pool = random.Random(2), question_pool(150, seed=3)
    store = FeedbackStore(tmp_path / "store.sqlite3")
    side_by_key: dict[str, Side] = {}
    trained: set[str] = set()
    heldout: set[str] = set()
    for round_ in range(1, 6):
        served = [completion(rng, *rng.choice(pool)) for _ in range(40)]
        events = [event for c in served for event in feedback_on(rng, c)]
        store.save_batch(EventBatch(completions=served, feedback=events))
        snapshot = store.training_snapshot()
        everything, new, seen = (
            split_dataset(data.reward) for data in (snapshot.data, snapshot.new_data, snapshot.seen_data)
        )
        for sides in (everything, new, seen):
            for side, data in sides.items():
                for key in keys(data):  # pointwise labels and groups alike
                    assert side_by_key.setdefault(key, side) == side, (round_, key)
        trained |= keys(new[Side.TRAIN]) | keys(seen[Side.TRAIN])
        heldout |= keys(everything[Side.HELDOUT])
        record = RoundRecord(round_, datetime.now(UTC), "published", snapshot.feedback_total,
                             snapshot.new_feedback_ids)  # fmt: skip
        store.record_round(record)
    store.close()
    assert not trained & heldout
    # Prompts of every side got labels (thumbs, ratings) and groups (pairwise, rankings, corrections):
    # the checks above saw every kind of feedback on every side.
    for side, data in everything.items():
        assert {prompt_key(g.prompt) for g in data.groups} == {prompt_key(x.prompt) for x in data.pointwise}
        assert data.groups and data.pointwise, side
    assert len(side_by_key) <= 150 and set(side_by_key.values()) == set(Side), Counter(side_by_key.values())
