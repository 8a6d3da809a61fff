"""The local journal: every UsageRecord is on disk before the client gets its last byte.

Records are appended to segment files as length-delimited protobuf (a varint length, then the
serialized ``UsageRecord``) with a plain ``write`` — the request path never waits for the disk
to flush. A background task ``fsync``s the open segment every interval (default 100 ms). The
ledger writer reads records back from the journal in order, ships them to Postgres in batches
and, after each commit, advances the checkpoint (a small file replaced atomically). On start
everything past the checkpoint is read again, so:

- a killed process (SIGKILL) loses nothing: written bytes are in the page cache;
- a lost machine loses at most one fsync interval;
- a record shipped twice is harmless: inserts are idempotent by ``request_id``.

Positions are global byte offsets; a segment file is named after the offset of its first
byte. Segments wholly behind the checkpoint are deleted. A torn record at the end of the last
segment (a crash mid-write) is ignored and overwritten by the next append. A record whose bytes
do not decode (disk corruption) is skipped and reported by :meth:`Journal.read`, so that the
writer's counts stay exact; :meth:`Journal.count_unshipped` counts frames without decoding
them (it runs at start-up, where a full journal holds millions of records).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
from pathlib import Path
from typing import NamedTuple

from google.protobuf.message import DecodeError

from tollgate.ledger.records import UsageRecord

__all__ = ["Journal", "JournalEntry", "JournalRead"]

log = logging.getLogger(__name__)

_SUFFIX = ".journal"
_CHECKPOINT = "checkpoint"
_READ_BYTES = 1024 * 1024


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None when the varint is cut off."""
    shift = value = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None


def _count_frames(path: Path, pos: int, size: int) -> tuple[int, int]:
    """Whole frames in ``path`` from ``pos`` up to ``size`` bytes, and the position after
    them."""
    count = 0
    with open(path, "rb") as f:
        size = min(size, os.fstat(f.fileno()).st_size)
        if size <= pos:
            return 0, pos
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as data:
            while True:
                if pos < size and data[pos] < 0x80:
                    end = pos + 1 + data[pos]
                elif pos + 1 < size and data[pos + 1] < 0x80:
                    end = pos + 2 + ((data[pos] & 0x7F) | (data[pos + 1] << 7))
                else:
                    head = _read_varint(data, pos)  # type: ignore[arg-type]
                    if head is None:
                        break
                    end = head[1] + head[0]
                if end > size:
                    break
                count += 1
                pos = end
    return count, pos


class JournalEntry(NamedTuple):
    record: UsageRecord
    end: int  # position just after this record


class JournalRead(NamedTuple):
    """What one :meth:`Journal.read` found."""

    entries: list[JournalEntry]
    skipped: int  # undecodable records passed over (each counted by count_unshipped)
    end: int  # position after the last record read or skipped (``start`` if none)


class Journal:
    """Append-only, segmented, checkpointed record log in one directory."""

    def __init__(self, directory: Path, *, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._segment_bytes = segment_bytes
        self.checkpoint_pos = self._load_checkpoint()
        segments = self._segments()
        if not segments:
            start = self.checkpoint_pos
            segments = [start]
            self._path(start).touch()
        self._write_start = segments[-1]
        self._write_path = self._path(self._write_start)
        # Cut a torn tail (a crash mid-append) so the next append starts on a record boundary.
        valid = self._valid_length(self._write_path)
        if valid < self._write_path.stat().st_size:
            log.warning("journal %s: dropping a torn record at its end", self._write_path.name)
            os.truncate(self._write_path, valid)
        self.end_pos = self._write_start + valid
        self.checkpoint_pos = min(max(self.checkpoint_pos, segments[0]), self.end_pos)
        self._fd = os.open(self._write_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._dirty = False

    # -- writing (request path: one write syscall as a rule, no fsync) -----------------------------

    def append(self, record: UsageRecord) -> int:
        """Write one record; returns the position after it."""
        payload = record.SerializeToString()
        frame = _varint(len(payload)) + payload
        if self.end_pos - self._write_start + len(frame) > self._segment_bytes:
            self._rotate()
        view = memoryview(frame)
        try:
            while view:
                try:
                    written = os.write(self._fd, view)
                except InterruptedError:
                    continue
                view = view[written:]
        except OSError:
            # A frame cut short (disk full) would misalign every later record: cut it off.
            if len(view) < len(frame):
                os.ftruncate(self._fd, self.end_pos - self._write_start)
            raise
        self.end_pos += len(frame)
        self._dirty = True
        return self.end_pos

    @property
    def unshipped_bytes(self) -> int:
        return self.end_pos - self.checkpoint_pos

    @property
    def disk_bytes(self) -> int:
        """Bytes of the segments on disk (shipped records in a segment still open count)."""
        segments = self._segments()
        return self.end_pos - segments[0] if segments else 0

    def sync(self) -> None:
        """fsync the open segment if anything was written since the last sync."""
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)

    def close(self) -> None:
        self.sync()
        os.close(self._fd)

    def _rotate(self) -> None:
        self.sync()
        os.close(self._fd)
        self._write_start = self.end_pos
        self._write_path = self._path(self._write_start)
        self._fd = os.open(self._write_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fsync_dir()

    # -- reading and checkpoints (the writer) ---------------------------------------------------

    def read(self, start: int, max_records: int) -> JournalRead:
        """Up to ``max_records`` complete records from position ``start`` on, and how many
        undecodable ones were passed over on the way."""
        entries: list[JournalEntry] = []
        skipped = [0]
        end = start
        segments = self._segments()
        for index, seg_start in enumerate(segments):
            last = index + 1 == len(segments)
            seg_end = self.end_pos if last else segments[index + 1]
            if seg_end <= start or len(entries) >= max_records:
                continue
            pos = max(start - seg_start, 0)
            with open(self._path(seg_start), "rb") as f:
                while len(entries) < max_records:
                    f.seek(pos)
                    data = f.read(_READ_BYTES)
                    limit = max_records - len(entries)
                    taken = self._parse(data, seg_start + pos, limit, entries, skipped)
                    if taken == 0:
                        head = _read_varint(data, 0)
                        if head is None or len(data) >= head[0] + head[1]:
                            break  # end of what is written (or a torn tail)
                        # One record longer than a read: read exactly it.
                        f.seek(pos)
                        whole = f.read(head[0] + head[1])
                        taken = self._parse(whole, seg_start + pos, 1, entries, skipped)
                        if taken == 0:
                            break
                    pos += taken
                    end = seg_start + pos
            if not last and seg_start + pos < seg_end and len(entries) < max_records:
                # A closed segment whose rest does not frame (a corrupt length): one skipped
                # record, as count_unshipped counts it.
                log.error("journal: unreadable bytes at %d..%d skipped", seg_start + pos, seg_end)
                skipped[0] += 1
                end = seg_end
            start = max(start, end)
        return JournalRead(entries, skipped[0], end)

    @staticmethod
    def _parse(
        data: bytes, base: int, limit: int, entries: list[JournalEntry], skipped: list[int]
    ) -> int:
        """Append up to ``limit`` whole records found in ``data`` (counting undecodable ones in
        ``skipped[0]``); bytes consumed."""
        pos = 0
        size = len(data)
        while limit > 0:
            # Records are a few hundred bytes: their length is a one- or two-byte varint.
            if pos + 1 < size and data[pos] < 0x80:
                length, body = data[pos], pos + 1
            elif pos + 2 < size and data[pos + 1] < 0x80:
                length, body = (data[pos] & 0x7F) | (data[pos + 1] << 7), pos + 2
            else:
                head = _read_varint(data, pos)
                if head is None:
                    break
                length, body = head
            end = body + length
            if end > size:
                break
            record = UsageRecord()
            try:
                record.ParseFromString(data[body:end])
            except DecodeError:
                log.error("journal: undecodable record at %d skipped", base + pos)
                skipped[0] += 1
            else:
                entries.append(JournalEntry(record, base + end))
                limit -= 1
            pos = end
        return pos

    def count_unshipped(self) -> int:
        """How many records lie past the checkpoint, decodable or not (at start-up): frames
        are counted by their lengths, without decoding them."""
        count = 0
        segments = self._segments()
        for index, seg_start in enumerate(segments):
            last = index + 1 == len(segments)
            seg_end = self.end_pos if last else segments[index + 1]
            if seg_end <= self.checkpoint_pos:
                continue
            pos = max(self.checkpoint_pos - seg_start, 0)
            frames, pos = _count_frames(self._path(seg_start), pos, seg_end - seg_start)
            count += frames
            if not last and seg_start + pos < seg_end:
                count += 1  # an unframeable rest: read() skips it as one record
        return count

    def commit(self, position: int) -> None:
        """Everything before ``position`` is in Postgres: checkpoint it, drop old segments."""
        if position <= self.checkpoint_pos:
            return
        self.checkpoint_pos = position
        tmp = self.dir / (_CHECKPOINT + ".tmp")
        tmp.write_text(str(position), encoding="ascii")
        os.replace(tmp, self.dir / _CHECKPOINT)
        segments = self._segments()
        for seg_start, next_start in itertools.pairwise(segments):
            if next_start <= position:
                self._path(seg_start).unlink(missing_ok=True)

    # -- helpers ----------------------------------------------------------------------------

    def _path(self, start: int) -> Path:
        return self.dir / f"{start:020d}{_SUFFIX}"

    def _segments(self) -> list[int]:
        starts = []
        for path in self.dir.glob("*" + _SUFFIX):
            try:
                starts.append(int(path.name.removesuffix(_SUFFIX)))
            except ValueError:
                continue
        return sorted(starts)

    def _load_checkpoint(self) -> int:
        try:
            return int((self.dir / _CHECKPOINT).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return 0

    def _valid_length(self, path: Path) -> int:
        data = path.read_bytes()
        pos = 0
        while True:
            head = _read_varint(data, pos)
            if head is None or head[1] + head[0] > len(data):
                return pos
            pos = head[1] + head[0]

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
