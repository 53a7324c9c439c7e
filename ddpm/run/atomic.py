"""The one way files are written: to ``NAME.tmp`` beside the target, fsync'd, renamed over it.

A reader (or a job killed at any moment) sees the old content or the new one, never half a file. A
stale ``NAME.tmp`` left by a killed writer is overwritten by the next write.
"""
import contextlib
import errno
import os
import time
from pathlib import Path

from ddpm.errors import OutOfSpace, out_of_space


def fsync_dir(directory) -> None:
    """Make a rename or creation inside ``directory`` durable. Filesystems that cannot fsync a directory
    (and platforms that cannot open one) are skipped: the rename itself is still atomic."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path (``PATH.tmp``) to write ``path``'s new content to; when the block ends
    without an exception it is fsync'd and renamed over ``path``, and the directory is fsync'd. On an
    exception the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write(path, data: str | bytes) -> None:
    """Replace ``path``'s content with ``data`` (text is written as UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def damaged_name(path) -> Path:
    """A new name beside ``path`` to move a damaged file to: ``NAME.damaged-YYYYmmdd-HHMMSS``."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, k = path.with_name(f"{path.name}.damaged-{stamp}"), 1
    while aside.exists():
        aside, k = path.with_name(f"{path.name}.damaged-{stamp}-{k}"), k + 1
    return aside


@contextlib.contextmanager
def writing(what: str, path):
    """Turn a disk-full / quota / file-size failure inside the block into :class:`OutOfSpace` (what was
    being written, where), whatever library raised it; other errors pass unchanged."""
    try:
        yield
    except OutOfSpace:
        raise
    except Exception as e:
        error = out_of_space(e)
        if error is None:
            raise
        raise OutOfSpace(what, path, error) from None
