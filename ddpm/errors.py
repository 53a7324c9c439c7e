"""The one exception type for bad user input, and the exit codes every job and template shares.

Jobs catch :class:`UserError`, print ``error: <message>`` on one line and exit with
:data:`BAD_INPUT_EXIT_CODE`. The message names the problem and the fix, e.g.
``train.lr must be > 0, got -1 (set train.lr=1e-4)``. ``slurm/common.sh`` reads the codes from here.
"""

DIVERGED_EXIT_CODE = 1    # the loss became NaN/Inf; the last good checkpoint is kept
BAD_INPUT_EXIT_CODE = 2   # a UserError: nothing was written
REQUEUE_EXIT_CODE = 75    # EX_TEMPFAIL: "saved a checkpoint because of a preemption/timeout signal; requeue me"


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the problem and the fix."""
