"""The trainer's durable memory: every completion and feedback event it consumed, and every round it ran.

SQLite in WAL mode, one file. Events are keyed by their ids and inserted with INSERT OR IGNORE, so a
batch that Kafka delivers twice (a crash after storing it but before committing its offsets) is stored
once. Events that do not parse go to a dead-letter table instead of being dropped.

Feedback is joined to its completions only when read: feedback whose completion has not arrived yet
(the two topics are read independently) is stored at once and waits until it has one.

The second half of this module turns feedback into training data: pure functions, no SQL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations, groupby
from pathlib import Path
from typing import NamedTuple

from common.dead_letters import DeadLetter
from feedback.events import (
    ChoiceRef,
    CompletionEvent,
    CorrectionFeedback,
    FeedbackEvent,
    PairwiseFeedback,
    RankingFeedback,
    RatingFeedback,
    ThumbsFeedback,
    referenced_choices,
)
from trainer.data import (
    Demonstration,
    PointwiseLabel,
    PreferenceGroup,
    Prompt,
    RewardDataset,
    prompt_from_messages,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    completion_id TEXT PRIMARY KEY,
    event_id      TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    payload       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    received_at   TEXT NOT NULL,
    payload       TEXT NOT NULL,
    first_round   INTEGER REFERENCES rounds(round)  -- NULL until a round has trained on it
);
CREATE TABLE IF NOT EXISTS feedback_refs (
    event_id      TEXT NOT NULL REFERENCES feedback(event_id),
    completion_id TEXT NOT NULL,
    PRIMARY KEY (event_id, completion_id)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    topic         TEXT NOT NULL,
    partition     INTEGER NOT NULL,
    "offset"      INTEGER NOT NULL,
    value         TEXT,
    error         TEXT NOT NULL,
    stored_at     TEXT NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
);
"""
# Apart from SCHEMA: FeedbackStore._migrate_rounds builds it under another name too.
ROUNDS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    round             INTEGER PRIMARY KEY,
    started_at        TEXT NOT NULL,
    finished_at       TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('published', 'rejected', 'skipped', 'failed')),
    parent_version    TEXT,
    version           TEXT,
    feedback_total    INTEGER NOT NULL,
    feedback_new      INTEGER NOT NULL,
    reward_model_dir  TEXT,
    metrics           TEXT NOT NULL,
    error             TEXT
);
"""

# Feedback all of whose referenced completions are stored: the read-time join.
READY_FEEDBACK = """
SELECT f.event_id, f.payload, f.first_round FROM feedback f
WHERE NOT EXISTS (
    SELECT 1 FROM feedback_refs r LEFT JOIN completions c ON c.completion_id = r.completion_id
    WHERE r.event_id = f.event_id AND c.completion_id IS NULL
)
"""


@dataclass
class EventBatch:
    """What one poll of the consumer yielded, parsed."""

    completions: list[CompletionEvent] = field(default_factory=list)
    feedback: list[FeedbackEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


@dataclass
class StoredCounts:
    """What a batch added: events by type ('completion' or the feedback kind), and how many were repeats."""

    stored: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    dead_letters: int = 0


@dataclass(frozen=True)
class TrainingSnapshot:
    """Training data from all ready feedback, and which of it no round has trained on yet."""

    data: TrainingData  # new_data and seen_data together
    new_data: TrainingData  # from feedback no round has trained on
    seen_data: TrainingData  # from feedback some earlier round trained on (what incremental rounds replay)
    feedback_total: int
    new_feedback_ids: tuple[str, ...]
    feedback_ids: tuple[str, ...]  # all of it, in arrival order: a resumed round reads the same again
    capped: int = 0  # feedback events left out because their user had more than the cap (max_per_user)


@dataclass(frozen=True)
class RoundRecord:
    round: int
    started_at: datetime
    status: str  # 'published', 'rejected' (by the evaluation gate), 'skipped' (nothing to learn) or 'failed'
    feedback_total: int
    new_feedback_ids: tuple[str, ...]
    parent_version: str | None = None
    version: str | None = None
    reward_model_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat()


class FeedbackStore:
    """Thread-safe: the ingest thread writes while the training loop reads, through one locked connection."""

    def __init__(self, path: Path | str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE), never opened behind our back.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a stored batch must survive power loss, since its Kafka offsets are committed right after.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA + ROUNDS_TABLE.format(name="rounds"))
        self._migrate_rounds()

    def _migrate_rounds(self) -> None:
        """Stores written before the evaluation gate refuse a 'rejected' round (a CHECK constraint, which
        SQLite cannot alter): rebuild their rounds table under the current definition, rows kept."""
        (definition,) = self._db.execute("SELECT sql FROM sqlite_master WHERE name = 'rounds'").fetchone()
        if "'rejected'" in definition:
            return
        self._db.execute("PRAGMA foreign_keys=OFF")  # feedback.first_round references rounds
        self._db.executescript(
            "BEGIN IMMEDIATE;"
            + ROUNDS_TABLE.format(name="rounds_new")
            + "INSERT INTO rounds_new SELECT * FROM rounds; DROP TABLE rounds;"
            " ALTER TABLE rounds_new RENAME TO rounds; COMMIT;"
        )
        self._db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    # --- Writing ----------------------------------------------------------------------------------

    def save_batch(self, batch: EventBatch) -> StoredCounts:
        """Store one polled batch in one transaction: all of it or (on error) none of it."""
        counts = StoredCounts()
        with self._transaction() as db:
            for completion in batch.completions:
                inserted = db.execute(
                    "INSERT OR IGNORE INTO completions VALUES (?, ?, ?, ?)",
                    (
                        completion.completion_id,
                        completion.event_id,
                        completion.created_at.isoformat(),
                        completion.model_dump_json(),
                    ),
                ).rowcount
                counts.stored["completion"] += inserted
                counts.duplicates += 1 - inserted
            for event in batch.feedback:
                inserted = db.execute(
                    "INSERT OR IGNORE INTO feedback (event_id, kind, received_at, payload) VALUES (?,?,?,?)",
                    (
                        event.event_id,
                        event.feedback.type,
                        event.received_at.isoformat(),
                        event.model_dump_json(),
                    ),
                ).rowcount
                counts.stored[event.feedback.type] += inserted
                counts.duplicates += 1 - inserted
                db.executemany(
                    "INSERT OR IGNORE INTO feedback_refs VALUES (?, ?)",
                    [(event.event_id, ref.completion_id) for ref in referenced_choices(event.feedback)],
                )
            for letter in batch.dead_letters:
                counts.dead_letters += db.execute(
                    "INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?)",
                    (letter.topic, letter.partition, letter.offset, letter.value, letter.reason, _now()),
                ).rowcount
        return counts

    def record_round(self, record: RoundRecord) -> None:
        """Store a finished round; unless it failed, its new feedback stops counting as new."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.round,
                    record.started_at.isoformat(),
                    _now(),
                    record.status,
                    record.parent_version,
                    record.version,
                    record.feedback_total,
                    len(record.new_feedback_ids),
                    str(record.reward_model_dir) if record.reward_model_dir else None,
                    json.dumps(record.metrics),
                    record.error,
                ),
            )
            if record.status != "failed":
                db.executemany(
                    "UPDATE feedback SET first_round = ? WHERE event_id = ?",
                    [(record.round, event_id) for event_id in record.new_feedback_ids],
                )

    # --- Reading ----------------------------------------------------------------------------------

    def new_feedback_count(self) -> int:
        """Ready feedback (its completions are stored) that no round has trained on yet."""
        with self._reading() as db:
            return db.execute(
                f"SELECT COUNT(*) FROM ({READY_FEEDBACK}) WHERE first_round IS NULL"
            ).fetchone()[0]

    def training_snapshot(self, event_ids: Collection[str] | None = None, max_per_user: int = 0) -> TrainingSnapshot:
        """All ready feedback as training data, or only the feedback `event_ids` names (an interrupted
        round's, to train on the same data again). Reads everything each round: fine at this scale.

        `max_per_user` (0: none) caps one user's weight: of the feedback events of one `user_hash` only the
        latest `max_per_user` count (anonymous feedback is not capped: the app key's rate limit bounds it)."""
        with self._reading() as db:
            rows = db.execute(READY_FEEDBACK + " ORDER BY f.seq").fetchall()
            completion_rows = db.execute(
                "SELECT payload FROM completions"
                " WHERE completion_id IN (SELECT completion_id FROM feedback_refs)"
            ).fetchall()
        if event_ids is not None:
            wanted = set(event_ids)
            rows = [row for row in rows if row[0] in wanted]
        feedback = [FeedbackEvent.model_validate_json(payload) for _, payload, _ in rows]
        completions = [CompletionEvent.model_validate_json(payload) for (payload,) in completion_rows]
        opinions, capped = _cap_per_user(_opinions(feedback, {c.completion_id: c for c in completions}),
                                         max_per_user)
        new_ids = tuple(event_id for event_id, _, first_round in rows if first_round is None)
        new = set(new_ids)
        return TrainingSnapshot(
            data=_training_data(opinions),
            new_data=_training_data(o for o in opinions if o.event_id in new),
            seen_data=_training_data(o for o in opinions if o.event_id not in new),
            feedback_total=len(rows),
            new_feedback_ids=new_ids,
            feedback_ids=tuple(event_id for event_id, _, _ in rows),
            capped=capped,
        )

    def user_prompts(self, limit: int) -> list[Prompt]:
        """The distinct prompts users sent, most recent first."""
        prompts: dict[Prompt, None] = {}
        with self._reading() as db:
            for (payload,) in db.execute("SELECT payload FROM completions ORDER BY rowid DESC"):
                prompts.setdefault(_prompt_of(CompletionEvent.model_validate_json(payload)))
                if len(prompts) >= limit:
                    break
        return list(prompts)

    def next_round(self) -> int:
        with self._reading() as db:
            return db.execute("SELECT COALESCE(MAX(round), 0) + 1 FROM rounds").fetchone()[0]

    def last_reward_model_dir(self) -> Path | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT reward_model_dir FROM rounds WHERE status IN ('published', 'rejected')"
                " ORDER BY round DESC LIMIT 1"
            ).fetchone()
        return Path(row[0]) if row and row[0] else None

    def rounds(self) -> list[dict]:
        with self._reading() as db:
            cursor = db.execute("SELECT * FROM rounds ORDER BY round")
            columns = [column[0] for column in cursor.description]
            rows = [dict(zip(columns, values, strict=True)) for values in cursor]
        for row in rows:
            row["metrics"] = json.loads(row["metrics"])
        return rows

    def row_counts(self) -> dict[str, int]:
        with self._reading() as db:
            return {
                table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("completions", "feedback", "dead_letters", "rounds")
            }


# --- Feedback -> training data ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    reward: RewardDataset
    demonstrations: list[Demonstration]


class _Answer(NamedTuple):
    prompt: Prompt
    text: str


def _prompt_of(completion: CompletionEvent) -> Prompt:
    return prompt_from_messages([m.model_dump() for m in completion.messages])


def _answer(ref: ChoiceRef, completions: Mapping[str, CompletionEvent]) -> _Answer | None:
    completion = completions.get(ref.completion_id)
    if completion is None or ref.choice_index >= len(completion.choices):
        return None
    return _Answer(_prompt_of(completion), completion.choices[ref.choice_index].text)


def likert_target(score: int) -> float:
    """A 1-7 score as a probability of being good: 1 -> 0.0, 4 -> 0.5, 7 -> 1.0."""
    return (score - 1) / 6


class _Pair(NamedTuple):
    prompt: Prompt
    chosen: str
    rejected: str


class _Kept(NamedTuple):
    """What one piece of feedback says about one thing (an answer, a pair of answers, a demonstration)."""

    order: tuple[float, int]  # received_at, then arrival: of two opinions on one thing the later is kept
    place: int  # where in its event it came from (a ranking's pairs keep their order)
    event_id: str
    user: str | None
    item: PointwiseLabel | _Pair | Demonstration | None  # None: a tie, which replaces an earlier preference


def _opinions(feedback: Iterable[FeedbackEvent], completions: Mapping[str, CompletionEvent]) -> list[_Kept]:
    """Each event's opinions, less those a later event of the same user replaced, in arrival order.

    The user is FeedbackEvent.user_hash; without one, every anonymous opinion on a thing is one user's
    (a thing rated 50 times without a user weighs once). Things are keyed by their text and prompt.
    """
    kept: dict[tuple, _Kept] = {}

    def keep(key: tuple, opinion: _Kept) -> None:
        if key not in kept or opinion.order > kept[key].order:  # same event: its first placement stays
            kept[key] = opinion

    for position, event in enumerate(feedback):
        item, user = event.feedback, event.user_hash
        answers = [_answer(ref, completions) for ref in referenced_choices(item)]
        if None in answers or len({answer.prompt for answer in answers}) != 1:
            continue
        prompt, order = answers[0].prompt, (event.received_at.timestamp(), position)
        target: float | None = None
        comparisons: list[tuple[_Answer, _Answer]] = []  # (better, worse)
        match item:
            case ThumbsFeedback():
                target = 1.0 if item.rating == "up" else 0.0
            case RatingFeedback():
                target = likert_target(item.score)
            case PairwiseFeedback() if item.preference == "tie":
                key = ("pair", user, prompt, frozenset(answer.text for answer in answers))
                keep(key, _Kept(order, 0, event.event_id, user, None))
                if item.both_bad:  # Chatbot Arena's "both are bad": a thumbs down on each answer
                    for place, answer in enumerate(answers, start=1):
                        label = PointwiseLabel(prompt, answer.text, 0.0)
                        keep(("rating", user, prompt, answer.text),
                             _Kept(order, place, event.event_id, user, label))
            case PairwiseFeedback():
                a, b = answers
                comparisons.append((a, b) if item.preference == "a" else (b, a))
            case RankingFeedback():
                comparisons += list(combinations(answers, 2))  # `ranked` is best first
            case CorrectionFeedback():
                key = ("demonstration", user, prompt, item.text)
                keep(key, _Kept(order, 0, event.event_id, user, Demonstration(prompt, item.text)))
                comparisons.append((_Answer(prompt, item.text), answers[0]))
        if target is not None:  # thumbs and ratings both rate one answer: the latest of either stands
            label = PointwiseLabel(prompt, answers[0].text, target)
            keep(("rating", user, prompt, label.response), _Kept(order, 0, event.event_id, user, label))
        for place, (better, worse) in enumerate(comparisons):
            if better.text != worse.text:  # a pair of identical texts teaches nothing
                key = ("pair", user, prompt, frozenset((better.text, worse.text)))
                keep(key, _Kept(order, place, event.event_id, user, _Pair(prompt, better.text, worse.text)))
    return sorted(kept.values(), key=lambda opinion: (opinion.order, opinion.place))


def _cap_per_user(opinions: list[_Kept], max_per_user: int) -> tuple[list[_Kept], int]:
    """Keep the opinions of each user's latest `max_per_user` events (0: all); also how many events went."""
    if max_per_user <= 0:
        return opinions, 0
    events: dict[str, dict[str, None]] = {}  # user -> their event ids, in arrival order
    for opinion in opinions:
        if opinion.user is not None:
            events.setdefault(opinion.user, {})[opinion.event_id] = None
    dropped = {event_id for ids in events.values() for event_id in list(ids)[:-max_per_user]}
    return [opinion for opinion in opinions if opinion.event_id not in dropped], len(dropped)


def _training_data(opinions: Iterable[_Kept]) -> TrainingData:
    """Labels and demonstrations as they are; the pairs of one event form one PreferenceGroup; ties add
    nothing."""
    reward, demonstrations = RewardDataset(), []
    for _, event_opinions in groupby(opinions, key=lambda opinion: opinion.event_id):
        pairs: list[_Pair] = []
        for opinion in event_opinions:
            match opinion.item:
                case PointwiseLabel() as label:
                    reward.pointwise.append(label)
                case Demonstration() as demonstration:
                    demonstrations.append(demonstration)
                case _Pair() as pair:
                    pairs.append(pair)
        if pairs:
            group = tuple((pair.chosen, pair.rejected) for pair in pairs)
            reward.groups.append(PreferenceGroup(pairs[0].prompt, group))
    return TrainingData(reward, demonstrations)


def to_training_data(
    feedback: Iterable[FeedbackEvent], completions: Mapping[str, CompletionEvent]
) -> TrainingData:
    """Turn feedback into reward-model data and demonstrations, each opinion counted once.

    thumbs -> pointwise label (up 1, down 0); rating -> pointwise label (1-7 scaled to 0-1), never also
    pairs between rated answers (that would count one rating twice); pairwise -> one pair (a tie gives
    none; a tie with `both_bad` a 0 label on each answer, as two thumbs down would); ranking -> its K-choose-2 pairs; correction -> demonstration, plus the correction preferred over
    the answer it corrects. Every event's pairs form one PreferenceGroup (events are not merged by prompt).

    One opinion per user and thing, the latest (received_at) kept: per answer for thumbs and ratings alike,
    per pair of answers (either order) for comparisons, so repeating feedback does not add weight and a
    changed mind (a tie included) replaces the old opinion. Feedback naming a missing completion or choice,
    or comparing answers to different prompts, is skipped.
    """
    return _training_data(_opinions(feedback, completions))
