"""The one exception type for bad user input (config, path, checkpoint, archive, CLI argument).

Jobs catch it, print ``error: <message>`` on one line and exit with status 2. The message names the
problem and the fix, e.g. ``train.lr must be > 0, got -1 (set train.lr=1e-4)``.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the problem and the fix."""
