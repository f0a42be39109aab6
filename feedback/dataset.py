"""The joined preference dataset in the formats TRL's trainers read (conversational form).

Pairs, for a reward model (RewardTrainer) or DPO: `{"prompt": [messages], "chosen": [answer],
"rejected": [answer]}`, from pairwise choices (not ties), rankings (every better-worse pair) and
corrections (the correction over the answer it corrects). Unpaired labels, for KTO: `{"prompt": [...],
"completion": [answer], "label": true|false}`, from thumbs, ratings (5-7 true, 1-3 false, 4 left out) and
pairwise "both bad" (both answers false).

Each opinion counts once, as in the trainer and the canary: events are deduplicated by event id (a retry
accepted by two replicas), and of one user's opinions on one answer (or one pair of answers) the latest
received wins; a tie withdraws an earlier choice. Feedback on a completion not in `completions` is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations

from feedback.events import (
    ChoiceRef,
    CompletionEvent,
    CorrectionFeedback,
    FeedbackEvent,
    PairwiseFeedback,
    RankingFeedback,
    RatingFeedback,
    ThumbsFeedback,
)

Row = dict[str, object]


def _answer(ref: ChoiceRef, completions: Mapping[str, CompletionEvent]) -> tuple[list[dict], str] | None:
    completion = completions.get(ref.completion_id)
    if completion is None or ref.choice_index >= len(completion.choices):
        return None
    return [m.model_dump() for m in completion.messages], completion.choices[ref.choice_index].text


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def preference_rows(completions: Mapping[str, CompletionEvent],
                    feedback: Iterable[FeedbackEvent]) -> tuple[list[Row], list[Row]]:
    """(pairs, unpaired labels), each opinion once, in the order the opinions were first given."""
    unique = {event.event_id: event for event in feedback}.values()
    latest: dict[tuple, Row | None] = {}  # (kind, user, what) -> the latest row (None: withdrawn)
    for event in sorted(unique, key=lambda e: e.received_at):
        item, user = event.feedback, event.user_hash
        match item:
            case ThumbsFeedback() | RatingFeedback():
                label = item.rating == "up" if isinstance(item, ThumbsFeedback) else \
                    None if item.score == 4 else item.score >= 5
                if (found := _answer(item, completions)) is not None:
                    prompt, text = found
                    row = None if label is None else {"prompt": prompt, "completion": _assistant(text), "label": label}
                    latest[("label", user, item.completion_id, item.choice_index)] = row
            case PairwiseFeedback() | RankingFeedback() | CorrectionFeedback():
                for (kind, *what), row in _comparisons(item, completions):
                    latest[(kind, user, *what)] = row
    pairs = [row for row in latest.values() if row is not None and "chosen" in row]
    unpaired = [row for row in latest.values() if row is not None and "label" in row]
    return pairs, unpaired


def _comparisons(item: PairwiseFeedback | RankingFeedback | CorrectionFeedback,
                 completions: Mapping[str, CompletionEvent]) -> list[tuple[tuple, Row | None]]:
    """(what it is about, the row or None for a tie) for each opinion the feedback gives beside labels."""
    def pair(better: ChoiceRef | str, worse: ChoiceRef) -> tuple[tuple, Row | None] | None:
        worse_answer = _answer(worse, completions)
        better_text = better if isinstance(better, str) else (_answer(better, completions) or (None, None))[1]
        if worse_answer is None or better_text is None or better_text == worse_answer[1]:
            return None
        key = ("pair", frozenset([better if isinstance(better, str) else (better.completion_id, better.choice_index),
                          (worse.completion_id, worse.choice_index)]),)
        return key, {"prompt": worse_answer[0], "chosen": _assistant(better_text),
                     "rejected": _assistant(worse_answer[1])}

    match item:
        case PairwiseFeedback(preference="tie"):
            found = pair(item.a, item.b)
            out = [(found[0], None)] if found else []
            if item.both_bad:  # two unpaired "bad" labels
                for ref in (item.a, item.b):
                    if (answer := _answer(ref, completions)) is not None:
                        out.append((("label", ref.completion_id, ref.choice_index),
                                    {"prompt": answer[0], "completion": _assistant(answer[1]), "label": False}))
            return out
        case PairwiseFeedback():
            better, worse = (item.a, item.b) if item.preference == "a" else (item.b, item.a)
            candidates = [pair(better, worse)]
        case RankingFeedback():
            candidates = [pair(better, worse) for better, worse in combinations(item.ranked, 2)]
        case CorrectionFeedback():
            candidates = [pair(item.text, ChoiceRef(completion_id=item.completion_id, choice_index=item.choice_index))]
    return [found for found in candidates if found is not None]
