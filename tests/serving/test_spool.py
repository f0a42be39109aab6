"""The on-disk spool: order, durability across a reopen, corrupt frames, its bound."""

from __future__ import annotations

import time

import pytest

from serving.spool import Spool, SpoolFull


def payloads(spool: Spool, max_records: int = 1000) -> list[bytes]:
    return [r.payload for r in spool.read(max_records)]


def test_records_come_back_in_append_order_across_segments_and_commits(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    records = [f"event-{i}".encode() for i in range(40)]
    for start in range(0, 40, 3):  # batches of various sizes roll over many small segments
        spool.append(records[start:start + 3])
    assert len(list(tmp_path.glob("*.seg"))) > 3
    assert (spool.records, payloads(spool)) == (40, records)

    first = spool.read(15)
    spool.commit(first[-1].position)
    assert (spool.records, payloads(spool)) == (25, records[15:])
    spool.commit(first[3].position)  # an older position: nothing moves back
    assert payloads(spool) == records[15:]

    spool.commit(spool.read(1000)[-1].position)
    assert (spool.records, payloads(spool), spool.oldest_age_s()) == (0, [], 0.0)
    spool.append([b"after"])
    assert payloads(spool) == [b"after"]
    assert len(list(tmp_path.glob("*.seg"))) == 1, "delivered segments are deleted"


def test_a_reopened_spool_replays_what_was_not_delivered(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=64)
    spool.append([b"a", b"b", b"c"])
    spool.append([b"d", b"e"])
    spool.commit(spool.read(2)[-1].position)
    spool.close()

    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=64)
    assert (reopened.records, payloads(reopened)) == (3, [b"c", b"d", b"e"])
    reopened.append([b"f"])  # appended after the old records, in a segment of its own
    assert payloads(reopened) == [b"c", b"d", b"e", b"f"]
    reopened.commit(reopened.read(1000)[-1].position)
    reopened.close()
    assert payloads(Spool(tmp_path, max_bytes=1 << 20)) == []


def test_a_corrupt_frame_is_skipped_and_counted_and_a_torn_tail_ends_its_segment(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append([b"first", b"second-record", b"third"])
    spool.close()
    [segment] = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    data[data.index(b"second-record") + 3] ^= 0xFF  # a flipped bit in the middle record's payload
    segment.write_bytes(bytes(data))

    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert (reopened.corrupt_records, reopened.records, payloads(reopened)) == (1, 2, [b"first", b"third"])
    reopened.close()

    segment.write_bytes(bytes(data[:-3]))  # a crash in the middle of writing the last record
    torn = Spool(tmp_path, max_bytes=1 << 20)
    assert (torn.corrupt_records, payloads(torn)) == (2, [b"first"])
    torn.append([b"fourth"])
    assert payloads(torn) == [b"first", b"fourth"]


def test_the_bound_refuses_a_whole_batch_and_frees_room_once_delivered(tmp_path):
    spool = Spool(tmp_path, max_bytes=1000, segment_bytes=100)
    record = b"x" * 84  # 100 bytes framed
    for _ in range(10):
        spool.append([record])
    with pytest.raises(SpoolFull):
        spool.append([record])
    assert (spool.records, spool.bytes) == (10, 1000)

    spool.commit(spool.read(5)[-1].position)
    spool.append([record] * 5)
    with pytest.raises(SpoolFull):
        spool.append([record])
    assert spool.records == 10


def test_depth_and_the_oldest_records_age(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    before = time.time()
    spool.append([b"one", b"two"])
    after = time.time()
    assert (spool.records, spool.bytes) == (2, 2 * (16 + 3))
    assert before - 0.001 <= spool.read(1)[0].appended_at <= after
    assert spool.oldest_age_s() >= time.time() - after
    spool.commit(spool.read(2)[-1].position)
    assert (spool.records, spool.oldest_age_s()) == (0, 0.0)


def test_one_process_per_spool_directory(tmp_path):
    first = Spool(tmp_path, max_bytes=1000)
    with pytest.raises(RuntimeError, match="spool directory of its own"):
        Spool(tmp_path, max_bytes=1000)
    first.close()
    Spool(tmp_path, max_bytes=1000).close()
