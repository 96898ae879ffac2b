"""Following the access log by byte offset, handing out complete lines only (a partial last line waits
for its newline), across rotation and truncation.

Rotation (rename to `<path>.1`, new file at the path): the old file is read to its end and then left
for the new one, but only once the new file holds data. Envoy writes to the new file only after it has
reopened its log, so from then on nothing more can reach the old one. A partial last line the old file
ends with is never completed, and is dropped.

Truncation in place (copytruncate): a file shorter than what was already read from it is read again
from offset 0. A file truncated and refilled past the old offset between two polls cannot be told
apart from one that grew, so use rename rotation.

Resuming from a stored position: it applies to the file at the path if the inode matches. If not, the
log was rotated while the meter was down; the stored file is looked for at `<path>.1` and, if it is
there, finished from the stored offset before moving on. Otherwise the new file is started at offset 0
and whatever the old one held after the stored offset is not metered (a warning says so). The inode is
a file's only identity here, so a rotated file that was deleted, its inode reused for the new log,
would be resumed at the old offset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from meter.parse import MAX_LINE_BYTES

log = logging.getLogger(__name__)

ROTATED_SUFFIX = ".1"
_READ_BYTES = 1 << 20
# A batch stops filling here whatever its line count: bounds a batch's memory when lines are long.
BATCH_BYTES = 8 << 20


class Position(NamedTuple):
    inode: int
    offset: int  # of the first byte not yet handed out


@dataclass(frozen=True)
class Batch:
    start: int  # offset of the first line
    lines: list[bytes]  # without their newlines
    end: Position  # where reading continues after these lines

    def numbered(self) -> Iterator[tuple[int, bytes]]:
        """Each line with its offset in the file."""
        offset = self.start
        for line in self.lines:
            yield offset, line
            offset += len(line) + 1


class _OpenLog:
    """One open file: the offset of the next line, and the bytes already read from there on."""

    def __init__(self, path: Path, fd: int, offset: int) -> None:
        self.path = path
        self.fd = fd
        self.inode = os.fstat(fd).st_ino
        self.offset = offset
        self.pending = b""

    @classmethod
    def open(cls, path: Path, offset: int) -> _OpenLog | None:
        try:
            return cls(path, os.open(path, os.O_RDONLY), offset)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        os.close(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def take(self, max_lines: int) -> Batch | None:
        if self.size() < self.offset + len(self.pending):
            log.warning("%s was truncated; reading it again from the start", self.path)
            self.offset, self.pending = 0, b""
        self._fill(max_lines)
        lines = self.pending.split(b"\n", max_lines)
        rest = lines.pop()  # a partial line, or lines beyond max_lines
        if not lines and len(rest) >= MAX_LINE_BYTES:
            # A line with no end in sight would stall the log for good: hand it out in pieces, which
            # the parser rejects.
            lines, rest = [rest[:MAX_LINE_BYTES]], rest[MAX_LINE_BYTES:]
        if not lines:
            return None
        start = self.offset
        self.offset += len(self.pending) - len(rest)
        self.pending = rest
        return Batch(start, lines, Position(self.inode, self.offset))

    def _fill(self, max_lines: int) -> None:
        while self.pending.count(b"\n") < max_lines and len(self.pending) < BATCH_BYTES:
            if len(self.pending) >= MAX_LINE_BYTES and b"\n" not in self.pending:
                return
            data = os.pread(self.fd, _READ_BYTES, self.offset + len(self.pending))
            if not data:
                return
            self.pending += data


class LogTailer:
    """Hands out each line once, whether or not it gets recorded: after a failed write, start again
    with a new tailer from the stored position."""

    def __init__(self, path: Path, resume: Position | None) -> None:
        self.path = path
        self.lag_bytes = 0  # not yet handed out, in this file and a newer one at the path
        self._resume = resume
        self._log: _OpenLog | None = None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def next_batch(self, max_lines: int) -> Batch | None:
        if self._log is None:
            self._log = self._open_first()
        batch = None
        while self._log is not None:
            # Looked at before reading: if a newer file has data, what the old one holds now is final.
            newer = self._newer_file_size() > 0
            batch = self._log.take(max_lines)
            if batch is not None or not newer:
                break
            self._log.close()
            self._log = _OpenLog.open(self.path, 0)
        self.lag_bytes = self._lag()
        return batch

    def _open_first(self) -> _OpenLog | None:
        opened = self._find_resumed_or_current()
        if opened is not None:
            self._resume = None  # applies to the first file opened only
        return opened

    def _find_resumed_or_current(self) -> _OpenLog | None:
        resume = self._resume
        if resume is not None:
            for candidate in (self.path, self.path.with_name(self.path.name + ROTATED_SUFFIX)):
                found = _OpenLog.open(candidate, resume.offset)
                if found is not None and found.inode == resume.inode:
                    return found
                if found is not None:
                    found.close()
        current = _OpenLog.open(self.path, 0)
        if current is not None and resume is not None:
            log.warning(
                "%s was rotated while the meter was down and its old file (inode %d) is gone; "
                "starting the new file from 0: lines the old file held after offset %d are not metered",
                self.path,
                resume.inode,
                resume.offset,
            )
        return current

    def _newer_file_size(self) -> int:
        assert self._log is not None
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return 0
        return stat.st_size if stat.st_ino != self._log.inode else 0

    def _lag(self) -> int:
        if self._log is None:
            return 0
        return max(0, self._log.size() - self._log.offset) + self._newer_file_size()
