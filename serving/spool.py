"""A bounded on-disk FIFO of records, for events Kafka could not take: appended durably, replayed in order.

Layout: a directory of append-only segment files (`<sequence>.seg`, numbered in append order) and a
`cursor` file naming the first record not yet delivered. Each record is framed as

    length (u32) | crc32 (u32) of the rest | appended_at (u64, ms since the epoch) | payload

Durability: `append` writes its records and fsyncs the segment before it returns (one fsync per call:
callers batch what is pending, a group commit); a new segment's directory entry is fsynced too. The cursor
moves only after the records before it were delivered, by an atomic rename of a fsynced file. A crash
between delivery and the cursor's move replays those records again: delivery is at least once, and the
consumers deduplicate by event id.

A torn or corrupt tail (a crash mid-write, a bad disk) is found when the spool is opened: frames whose crc
does not match are skipped and counted, and a frame cut short ends its segment. A reopened spool never
appends to an old segment. The directory is locked (flock) by the process that has it open.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from common.durable import fsync_dir

_HEADER = struct.Struct("<IIQ")  # length of what follows the crc, crc32, appended_at_ms
_STAMP = struct.Struct("<Q")
_SUFFIX = ".seg"


class SpoolFull(Exception):
    """The spool holds its maximum number of bytes."""


@dataclass
class _Segment:
    sequence: int
    path: Path
    end: int  # bytes of valid frames; what follows (a torn tail) is never read
    records: int


@dataclass(frozen=True)
class Position:
    """Just after one record: what `commit` takes to mark everything up to it as delivered."""

    sequence: int
    offset: int
    ordinal: int  # intact records of the segment up to here


@dataclass(frozen=True)
class SpooledRecord:
    payload: bytes
    appended_at: float  # seconds since the epoch
    position: Position


class Spool:
    """Thread-safe: one thread may append while another reads and commits."""

    def __init__(self, directory: Path | str, max_bytes: int, segment_bytes: int = 4 << 20):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        # Delivered records stay on disk (and count against the bound) until their segment is deleted.
        self.segment_bytes = max(1, min(segment_bytes, max_bytes // 8))
        self.corrupt_records = 0  # found (and skipped) when opened
        self._lock = threading.Lock()
        self._lock_file = open(self.directory / "lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"spool {self.directory} is in use by another process; "
                               "give each serving replica a spool directory of its own") from None
        self._writer = None  # the segment this process appends to; never one written before it opened
        self._segments = [self._scan(path) for path in sorted(self.directory.glob(f"*{_SUFFIX}"))]
        self._cursor = self._read_cursor()
        self._drop_delivered_segments()
        self._oldest_at = self._first_stamp()

    # --- Metrics --------------------------------------------------------------------------------

    @property
    def records(self) -> int:
        with self._lock:
            return self._records()

    @property
    def bytes(self) -> int:
        """Bytes on disk, a delivered head included until its segment is deleted: what the bound limits."""
        with self._lock:
            return self._bytes()

    def oldest_age_s(self) -> float:
        oldest = self._oldest_at
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    # --- Writing --------------------------------------------------------------------------------

    def append(self, payloads: list[bytes]) -> None:
        """Store all of `payloads` durably (written and fsynced) before returning, or none (SpoolFull)."""
        now_ms = int(time.time() * 1000)
        frames = b"".join(_frame(payload, now_ms) for payload in payloads)
        with self._lock:
            if self._bytes() + len(frames) > self.max_bytes:
                raise SpoolFull(f"the spool holds {self._bytes()} of its {self.max_bytes} bytes")
            if self._writer is None or self._segments[-1].end >= self.segment_bytes or self._records() == 0:
                self._roll()  # an empty spool starts afresh, so that delivered segments can go
            segment = self._segments[-1]
            self._writer.write(frames)
            self._writer.flush()
            os.fsync(self._writer.fileno())
            segment.end += len(frames)
            segment.records += len(payloads)
            if self._oldest_at is None:
                self._oldest_at = now_ms / 1000

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        sequence = (self._segments[-1] if self._segments else self._cursor).sequence + 1
        path = self.directory / f"{sequence:020d}{_SUFFIX}"
        self._writer = open(path, "ab")
        fsync_dir(self.directory)  # the new file's name must survive a crash too
        self._segments.append(_Segment(sequence, path, 0, 0))
        self._drop_delivered_segments()

    # --- Reading --------------------------------------------------------------------------------

    def read(self, max_records: int) -> list[SpooledRecord]:
        """Up to `max_records` undelivered records, oldest first."""
        out: list[SpooledRecord] = []
        with self._lock:
            for segment, start, ordinal in self._unread():
                for offset, payload, appended_at in _intact(_read_from(segment, start), start):
                    ordinal += 1
                    out.append(SpooledRecord(payload, appended_at, Position(segment.sequence, offset, ordinal)))
                    if len(out) >= max_records:
                        return out
        return out

    def commit(self, position: Position) -> None:
        """Everything up to `position` was delivered: move the cursor, delete the segments left behind."""
        with self._lock:
            if (position.sequence, position.offset) <= (self._cursor.sequence, self._cursor.offset):
                return
            self._cursor = position
            self._write_cursor()
            self._drop_delivered_segments()
            self._oldest_at = self._first_stamp()

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._lock_file.close()  # releases the flock

    # --- Internals ------------------------------------------------------------------------------

    def _records(self) -> int:
        head = self._segments[0] if self._segments else None
        consumed = self._cursor.ordinal if head and head.sequence == self._cursor.sequence else 0
        return sum(s.records for s in self._segments) - consumed

    def _bytes(self) -> int:
        return sum(s.end for s in self._segments)

    def _unread(self):
        """(segment, offset to read from, intact records before that offset) of each segment not delivered."""
        for segment in self._segments:
            if segment.sequence == self._cursor.sequence:
                yield segment, self._cursor.offset, self._cursor.ordinal
            elif segment.sequence > self._cursor.sequence:
                yield segment, 0, 0

    def _scan(self, path: Path) -> _Segment:
        data = path.read_bytes()
        records = corrupt = end = 0
        for after, intact in _walk(data):
            records += intact
            corrupt += not intact
            end = after
        self.corrupt_records += corrupt + (end < len(data))  # a torn tail counts as one record lost
        return _Segment(int(path.stem), path, end, records)

    def _drop_delivered_segments(self) -> None:
        # Segments before the cursor's, and the cursor's once read to its end unless it is still written to.
        while self._segments:
            head = self._segments[0]
            writing = self._writer is not None and head is self._segments[-1]
            delivered = head.sequence < self._cursor.sequence or (
                head.sequence == self._cursor.sequence and self._cursor.offset >= head.end and not writing
            )
            if not delivered:
                return
            head.path.unlink(missing_ok=True)
            self._segments.pop(0)
            if head.sequence == self._cursor.sequence and self._segments:
                self._cursor = Position(self._segments[0].sequence, 0, 0)

    def _first_stamp(self) -> float | None:
        for segment, start, _ in self._unread():
            for _, _, appended_at in _intact(_read_from(segment, start), start):
                return appended_at
        return None

    def _read_cursor(self) -> Position:
        try:
            sequence, offset = map(int, (self.directory / "cursor").read_text().split())
        except (FileNotFoundError, ValueError):
            return Position(self._segments[0].sequence if self._segments else 0, 0, 0)
        head = next((s for s in self._segments if s.sequence == sequence), None)
        before = _read_from(head, 0)[:offset] if head else b""
        return Position(sequence, offset, sum(1 for _ in _intact(before, 0)))

    def _write_cursor(self) -> None:
        temporary = self.directory / "cursor.tmp"
        with open(temporary, "w") as f:
            f.write(f"{self._cursor.sequence} {self._cursor.offset}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.directory / "cursor")
        fsync_dir(self.directory)


def _frame(payload: bytes, appended_at_ms: int) -> bytes:
    body = _STAMP.pack(appended_at_ms) + payload
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


def _walk(data: bytes):
    """(offset just after the frame, whether its crc matches) for each whole frame; stops at a cut-short one."""
    offset, view = 0, memoryview(data)
    while offset + _HEADER.size <= len(data):
        length, crc, _ = _HEADER.unpack_from(data, offset)
        after = offset + 8 + length
        if length < _STAMP.size or after > len(data):
            return
        yield after, zlib.crc32(view[offset + 8:after]) == crc
        offset = after


def _intact(data: bytes, base: int):
    """(file offset just after, payload, appended_at) of each intact frame of `data`, read from offset `base`."""
    start = 0
    for after, intact in _walk(data):
        if intact:
            (stamp,) = _STAMP.unpack_from(data, start + 8)
            yield base + after, data[start + _HEADER.size:after], stamp / 1000
        start = after


def _read_from(segment: _Segment, start: int) -> bytes:
    with open(segment.path, "rb") as f:
        f.seek(start)
        return f.read(segment.end - start)
