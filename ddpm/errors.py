"""The one exception type for bad user input, the exit codes every job and template shares, and how a
"disk full" is recognised.

Jobs catch :class:`UserError`, print ``error: <message>`` on one line and exit with
:data:`BAD_INPUT_EXIT_CODE`. The message names the problem and the fix, e.g.
``train.lr must be > 0, got -1 (set train.lr=1e-4)``. ``slurm/common.sh`` reads the codes from here.
"""
import errno

DIVERGED_EXIT_CODE = 1    # the loss became NaN/Inf; the last good checkpoint is kept
BAD_INPUT_EXIT_CODE = 2   # a UserError: nothing was written
NO_SPACE_EXIT_CODE = 74   # EX_IOERR: a write failed for lack of space or quota; never requeued (it would fail again)
REQUEUE_EXIT_CODE = 75    # EX_TEMPFAIL: "saved a checkpoint because of a preemption/timeout signal; requeue me"

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # disk full, quota, file-size limit


def out_of_space(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` if it (or what caused it) is a disk-full / quota / file-size error.

    Libraries wrap it: torch.save raises a RuntimeError whose context is the OSError of the failed write,
    h5py reports the errno only in its message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return exc
        if isinstance(exc, RuntimeError) and any(f"errno = {n}," in str(exc) for n in NO_SPACE_ERRNOS):
            return OSError(next(n for n in NO_SPACE_ERRNOS if f"errno = {n}," in str(exc)), str(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the problem and the fix."""


class TrainingDiverged(Exception):
    """The loss became NaN/Inf; the message says which checkpoint is intact."""


class OutOfSpace(Exception):
    """A write of the run failed for lack of space: ``what`` was being written to ``path``."""

    def __init__(self, what: str, path, error: OSError):
        super().__init__(f"{what}: {error.strerror or error}")
        self.what, self.path, self.error = what, path, error
