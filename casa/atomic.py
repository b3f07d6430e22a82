"""Atomic file writes, whatever `$TMPDIR` is: a file appears whole under its name, or not at all.

    with atomic_write("runs/x/checkpoints/last.ckpt") as f:   # f: a binary file object
        torch.save(checkpoint, f)

The bytes go to a temporary file *in the destination directory* (`.NAME.<pid>.<random>.tmp`),
are flushed and fsync'ed, then `os.replace`d onto NAME, and the directory is fsync'ed so the
rename itself survives a power cut. `os.replace` is atomic only within one filesystem, which
is why the temporary file is never in `$TMPDIR` (Lightning's own writer puts it there, then
copies: a kill during the copy leaves a truncated checkpoint under the final name).

On any error (a full disk: `OSError(errno.ENOSPC)`, a write that raises) the temporary file is
removed and the previous NAME is untouched. A process killed mid-write leaves only its
temporary file, which the next writer of NAME removes (`remove_orphans`) once its pid is gone.

`AtomicFile` is the same thing for writers that open and close files on their own schedule
(webdataset's ShardWriter: `opener=` / `post=` hooks). `atomic_directory` does it for a
directory of files (an export): built beside its final name, swapped in when complete.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
"""Temporary names: .NAME.PID.RANDOM.tmp (hidden, and not matching *.ckpt / *.tar globs)."""


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name for `path`, in its own directory."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. certain FUSE mounts) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `path` left by writers that were killed (their pid is gone)
    -> the removed paths. Another live process's temporary file is left alone."""
    p = Path(path)
    removed = []
    if not p.parent.is_dir():
        return removed
    for tmp in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
        m = _TMP.match(tmp.name)
        if m and m["name"] == p.name and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class AtomicFile:
    """An open temporary file that becomes `path` on `commit()`, or vanishes on `discard()`.

    f = AtomicFile(path); f.write(...); f.commit()     # or use `atomic_write`"""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(self.path)
        self.tmp = temp_path(self.path)
        self.file: BinaryIO = open(self.tmp, "xb")

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self) -> Path:
        """flush + fsync + rename onto `path` + fsync of the directory. On failure (ENOSPC at
        flush or fsync) the temporary file is removed and the error raised; `path` is untouched."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write `path` atomically (see the module docstring): yields a binary file object; the file
    appears under `path` when the block ends without an exception, and not at all otherwise."""
    f = AtomicFile(path)
    try:
        yield f.file
    except BaseException:
        f.discard()
        raise
    f.commit()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """`Path.write_bytes`, atomically."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory whose contents appear together: yields an empty temporary directory
    beside `path` (`.NAME.<pid>.<random>.tmp`); when the block ends without an exception its
    files are fsync'ed and it is renamed to `path` (an existing `path` is first renamed aside,
    then removed: a reader sees the old directory or the new one, never a mix or a partial one).
    On an exception the temporary directory is removed and `path` is untouched.

        with atomic_directory("exports/model") as tmp:
            model.save_pretrained(tmp)"""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(p)
    tmp = temp_path(p)
    tmp.mkdir()
    try:
        yield tmp
        swap_in_directory(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in_directory(new: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make the complete directory `new` (a sibling of `path`) become `path`: its files fsync'ed,
    an existing `path` renamed aside, `new` renamed to `path`, the old one removed. A reader sees
    the old directory or the new one; a kill between the two renames leaves the old one under
    its hidden temporary name and no `path` (never a mix)."""
    new, p = Path(new), Path(path)
    for f in sorted(new.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if p.exists():
        old = temp_path(p)
        os.replace(p, old)
    os.replace(new, p)
    fsync_dir(p.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return p
