"""A local, append-only spool for the usage reports the store would not take.

A finished stream's report normally goes to the outbox in the store. When the store
is down at that moment, the report is appended here (one JSON line, fsync'd before
`append` returns) and the outbox drains the spool into the store once it answers
again (`Outbox.run`), so the usage survives a store outage and an edge restart.

Every edge process on a host may share the directory. Appends reopen `pending.jsonl`
and hold an exclusive `flock` while writing; a drainer first renames the file (atomic:
one drainer wins it, and later appends start a new file), then takes the lock on the
renamed file, which waits out an append already under way. An append that opened the
file before the rename sees that its inode is no longer the path's and writes again
to the new file. A drainer that dies leaves its `draining-*` file behind; any process
claims such files again after `STALE_DRAIN_SECONDS`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from pathlib import Path

PENDING = "pending.jsonl"
DRAINING_PREFIX = "draining-"
# A claimed file this old was left by a drainer that died (a drain takes milliseconds).
STALE_DRAIN_SECONDS = 60.0


def probe(directory: Path) -> None:
    """Create `directory` and write, sync and remove a file in it; raises OSError when
    the spool could not keep a report there (a read-only root, a path under a file).
    Checked at start: otherwise the first report it fails to keep is that of a stream
    ending during a store outage, and that stream goes unbilled."""
    directory.mkdir(parents=True, exist_ok=True)
    probe_file = directory / f".probe-{os.getpid()}-{uuid.uuid4().hex}"
    fd = os.open(probe_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        probe_file.unlink(missing_ok=True)


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._mine: set[str] = set()  # files this process claimed and is draining

    def append(self, line: bytes) -> None:
        """Append one record durably (blocking: call it in a thread)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / PENDING
        record = line.rstrip(b"\n") + b"\n"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(fd, path):
                    continue  # a drainer renamed it meanwhile: write to the new one
                size = os.fstat(fd).st_size
                # A torn record before this one (a crash mid-append) is ended first,
                # or this record would be glued to it and lost with it at the drain.
                data = record if size == 0 or os.pread(fd, 1, size - 1) == b"\n" else b"\n" + record
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                except OSError:
                    # A short or failed write (a full disk): take the partial record
                    # back, so the caller's error is the whole truth.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
                if size == 0:
                    _fsync_dir(self.directory)
                return
            finally:
                os.close(fd)  # also releases the lock

    def has_pending(self) -> bool:
        try:
            with os.scandir(self.directory) as entries:
                return any(e.name.endswith(".jsonl") for e in entries)
        except FileNotFoundError:
            return False

    def claim(self) -> list[Path]:
        """Take the files to drain: the pending one, and claimed ones left behind."""
        claimed: list[Path] = []
        try:
            with os.scandir(self.directory) as entries:
                names = [e.name for e in entries if e.name.endswith(".jsonl")]
        except FileNotFoundError:
            return claimed
        now = time.time()
        for name in names:
            source = self.directory / name
            if name.startswith(DRAINING_PREFIX):
                if name in self._mine:
                    claimed.append(source)  # ours, not finished last time
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if now - source.stat().st_ctime < STALE_DRAIN_SECONDS:
                        continue  # another process is draining it
            target = self.directory / f"{DRAINING_PREFIX}{uuid.uuid4().hex}.jsonl"
            try:
                os.rename(source, target)
            except FileNotFoundError:
                continue  # another process claimed it first
            self._mine.add(target.name)
            claimed.append(target)
        return claimed

    def read(self, path: Path) -> list[bytes]:
        """The records of a claimed file, once no append is writing to it."""
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "rb") as file:
                data = file.read()
        finally:
            os.close(fd)
        # A torn last line (a crash mid-append, before its fsync returned) is skipped.
        return [line for line in data.split(b"\n") if line.strip()]

    def remove(self, path: Path) -> None:
        self._mine.discard(path.name)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def keep_only(self, path: Path, records: list[bytes]) -> None:
        """Leave only `records` in a claimed file (blocking: call it in a thread):
        written to a side file, synced, then renamed over it, so a crash midway
        leaves the file as it was (a report delivered twice is deduplicated; one
        dropped is lost). No append writes to a claimed file (`read` waited them out)."""
        if not records:
            self.remove(path)
            return
        side = self.directory / f".rewrite-{uuid.uuid4().hex}"  # not `.jsonl`: never claimed
        fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, b"".join(record.rstrip(b"\n") + b"\n" for record in records))
            os.fsync(fd)
        except OSError:
            side.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        os.rename(side, path)
        _fsync_dir(self.directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("the spool write made no progress")
        view = view[written:]


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
