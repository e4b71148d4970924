"""One run per output folder at a time, and no run that cannot finish writing.

`run_lock(DIR, command)` holds an exclusive `fcntl.flock` on `DIR/.gradauth.lock` while a command writes into DIR.
The kernel drops the lock when the holder dies (even by SIGKILL), so a killed run never blocks the next one; the
file's contents (pid, command, start time) only serve to name the holder to a second run, which is refused with one
line. The holder removes the file when it is done (a results folder stays as clean as before); a killed holder
leaves it behind, harmless, and the next run takes it over. The lock is re-entrant within a process (`gradauth run` takes it once, its stages again).

`check_output_space(DIR, need)` runs before a stage starts: DIR must accept a new file and its filesystem must have
`need` bytes free, so a read-only or full disk is found before hours of training rather than after.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from . import rundir
from .errors import GradauthError

LOCK_NAME = rundir.LOCK
_held: dict[str, list] = {}  # realpath of the lock file → [fd, depth], for re-entry within this process


def _describe_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0][:200] if text else "another process (it has not written its name yet)"


def os_error_line(e: OSError, what: str | None = None) -> str:
    """One line for an OSError met while writing (or reading): the path, the reason, what to do."""
    if what is None:
        what = "write" if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT) else "access"
    where = f" {e.filename}" if e.filename else ""
    hint = {errno.EROFS: "the filesystem is read-only: pass --out on a writable disk",
            errno.ENOSPC: "the disk is full: free space or pass --out on another disk",
            errno.EDQUOT: "the disk quota is exhausted: free space or pass --out on another disk",
            errno.EACCES: "permission denied: fix the folder's permissions or pass --out elsewhere",
            errno.EPERM: "operation not permitted: fix the folder's permissions or pass --out elsewhere"}
    reason = e.strerror or type(e).__name__
    return f"cannot {what}{where} ({reason}): " + hint.get(e.errno, "check the path and the disk, then run again")


@contextlib.contextmanager
def run_lock(out: str | os.PathLike, command: str, create: bool = True) -> Iterator[Path]:
    """Hold DIR/.gradauth.lock exclusively for the body; a second holder is refused with a GradauthError.

    `create=False` (commands that work on an existing results folder): a DIR that does not exist is not made, and
    the body runs unlocked, to refuse it with its own message."""
    out = Path(out)
    path = out / LOCK_NAME
    key = os.path.realpath(path)
    if not create and key not in _held and not out.is_dir():
        yield path
        return
    if key in _held:
        _held[key][1] += 1
        try:
            yield path
        finally:
            _held[key][1] -= 1
        return
    created = not out.exists()  # a failed first command leaves no empty folder behind
    fd = _open_locked(out, path)
    try:
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        argv = " ".join(sys.argv[1:])[:120] or command
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, `gradauth {command}` ({argv}), since {since}\n".encode(), 0)
        _held[key] = [fd, 1]
        try:
            yield path
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: a run that opened it meanwhile sees it was replaced
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if empty: what a run wrote stays
    finally:
        os.close(fd)  # releases the flock


def _open_locked(out: Path, path: Path) -> int:
    """An fd of DIR/.gradauth.lock holding its exclusive flock, or a GradauthError naming the holder.

    The holder removes the file when it is done; a run that opened the file just before that and got the lock
    right after holds a lock on a removed file, so the lock counts only if the path still names the locked file."""
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise GradauthError(os_error_line(e, "use the output folder"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise GradauthError(f"{out} is in use by {holder}: wait for it to finish (or stop it), "
                                f"or pass another --out")
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def check_output_space(out: str | os.PathLike, need_bytes: int, what: str = "this stage",
                       elsewhere: str = "pass --out on another disk") -> None:
    """Refuse (GradauthError) unless DIR takes a new file and its disk has `need_bytes` free."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".gradauth-probe.", dir=out)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
        free = shutil.disk_usage(out).free
    except OSError as e:
        raise GradauthError(os_error_line(e, f"write into {out}"))
    if free < need_bytes:
        raise GradauthError(f"{out} has {_mb(free)} free but {what} needs about {_mb(need_bytes)}: free space or "
                            f"{elsewhere}")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
