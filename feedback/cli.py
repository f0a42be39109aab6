"""`python -m feedback tail` and `python -m feedback export`: an operator's view of the feedback topics.

Both read the topics directly, without a consumer group (they never move the trainer's offsets), with the
KAFKA_*/RLHF_* settings of common/settings.py. Records that do not parse are skipped and counted on stderr:
the consumers of record (serving, trainer) are the ones that send them to the dead-letter topic.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from common.kafka import ensure_topics, make_consumer
from common.settings import SharedSettings
from feedback.dataset import preference_rows
from feedback.events import CompletionEvent, FeedbackEvent, referenced_choices

KINDS = ["completion", "thumbs", "rating", "correction", "pairwise", "ranking"]


def _assigned(settings: SharedSettings, topics: list[str], from_beginning: bool) -> KafkaConsumer:
    ensure_topics(settings, topics)  # a stack that has served nothing yet has none
    consumer = make_consumer(settings, [], group_id=None)
    partitions = [TopicPartition(topic, p) for topic in topics for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(partitions)
    (consumer.seek_to_beginning if from_beginning else consumer.seek_to_end)()
    for partition in partitions:
        consumer.position(partition)  # fix the starting point now, before anything new is produced
    return consumer


def _events(consumer: KafkaConsumer, settings: SharedSettings, skipped: list[int],
            until_end: bool = False, stop: threading.Event | None = None) -> Iterator[CompletionEvent | FeedbackEvent]:
    models = {settings.completions_topic: CompletionEvent, settings.feedback_topic: FeedbackEvent}
    ends = consumer.end_offsets(list(consumer.assignment())) if until_end else {}
    while not (stop and stop.is_set()):
        if until_end and all(consumer.position(p) >= end for p, end in ends.items()):
            return
        for partition, records in consumer.poll(timeout_ms=200).items():
            for record in records:
                try:
                    yield models[partition.topic].model_validate_json(record.value)
                except (ValueError, TypeError):  # not JSON, another schema, no value at all
                    skipped[0] += 1


def tail(settings: SharedSettings, out: TextIO, kinds: list[str] | None = None, version: str | None = None,
         from_beginning: bool = False, stop: threading.Event | None = None,
         ready: threading.Event | None = None) -> None:
    """Print each new completion and feedback event as one JSON line until `stop` is set. `version`:
    completions with a choice of that policy version, and feedback on those choices (of completions this
    tail has seen). `ready` is set once the starting offsets are fixed."""
    consumer = _assigned(settings, [settings.completions_topic, settings.feedback_topic], from_beginning)
    if ready is not None:
        ready.set()
    versions_of: dict[str, list[str | None]] = {}  # completion id -> the version of each choice
    skipped = [0]
    try:
        for event in _events(consumer, settings, skipped, stop=stop):
            if isinstance(event, CompletionEvent):
                kind = "completion"
                versions_of[event.completion_id] = [c.policy_version or event.policy_version for c in event.choices]
                versions = set(versions_of[event.completion_id])
            else:
                kind = event.feedback.type
                versions = {dict(enumerate(versions_of.get(ref.completion_id, []))).get(ref.choice_index)
                            for ref in referenced_choices(event.feedback)}
            if (kinds and kind not in kinds) or (version and version not in versions):
                continue
            out.write(event.model_dump_json() + "\n")
            out.flush()
    finally:
        consumer.close()


def export(settings: SharedSettings, pairs_out: TextIO, unpaired_out: TextIO | None) -> dict[str, int]:
    """Join everything on the topics now and write it as JSONL; the counts written and skipped."""
    consumer = _assigned(settings, [settings.completions_topic, settings.feedback_topic], from_beginning=True)
    completions, feedback, skipped = {}, [], [0]
    try:
        for event in _events(consumer, settings, skipped, until_end=True):
            if isinstance(event, CompletionEvent):
                completions[event.completion_id] = event
            else:
                feedback.append(event)
    finally:
        consumer.close()
    pairs, unpaired = preference_rows(completions, feedback)
    for row in pairs:
        pairs_out.write(json.dumps(row) + "\n")
    for row in unpaired if unpaired_out else ():
        unpaired_out.write(json.dumps(row) + "\n")
    return {"completions": len(completions), "feedback": len(feedback), "pairs": len(pairs),
            "unpaired": len(unpaired) if unpaired_out else 0, "skipped_records": skipped[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feedback", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tail_args = commands.add_parser("tail", help="print new events as JSON lines until interrupted")
    tail_args.add_argument("--kind", action="append", choices=KINDS, help="only these kinds (repeatable)")
    tail_args.add_argument("--version", help="only completions of this policy version and feedback on them")
    tail_args.add_argument("--from-beginning", action="store_true", help="start at the oldest event kept")
    export_args = commands.add_parser("export", help="the joined preference dataset as JSONL (TRL's formats)")
    export_args.add_argument("--out", required=True, help="pairs: {prompt, chosen, rejected}")
    export_args.add_argument("--unpaired-out", help="also thumbs and ratings: {prompt, completion, label} (KTO)")
    args = parser.parse_args(argv)
    settings = SharedSettings()
    if args.command == "tail":
        try:
            tail(settings, sys.stdout, args.kind, args.version, args.from_beginning)
        except KeyboardInterrupt:
            pass
        return
    with open(args.out, "w") as pairs_out:
        if args.unpaired_out is None:
            counts = export(settings, pairs_out, None)
        else:
            with open(args.unpaired_out, "w") as unpaired_out:
                counts = export(settings, pairs_out, unpaired_out)
    print(json.dumps(counts), file=sys.stderr)
