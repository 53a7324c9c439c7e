"""Preemption: a signal only sets a flag; the training loop checks it at step boundaries.

Which signals, and why:
  * SIGUSR2 — the advance warning. SLURM sends it ``--signal=USR2@120`` seconds before the time limit
    (to every task of every job step; with ``B:USR2@120`` only the batch shell gets it, which must then
    forward it to srun), and submitit asks for USR2 as well. Not USR1: NCCL uses/eats it in some setups.
  * SIGTERM — what ``scancel``, ``scontrol requeue`` and preemption send; SIGKILL follows after
    SLURM's KillWait (often 30 s), so the save has to be prompt.

The handler does no I/O, no printing and no collectives: it can run between any two bytecodes of the
main thread, e.g. inside an NCCL call or while holding the logging lock. At the next step boundary
all ranks agree via `should_stop` (one rank may get the signal before the others), save a checkpoint,
and exit with ``ddpm.errors.REQUEUE_EXIT_CODE`` (75).
"""
import signal
import threading

from ddpm.train.dist import any_rank


class PreemptionHandler:
    """Catches ``signals`` and remembers that one arrived.

    with PreemptionHandler() as preempt:
        for step in ...:
            ...
            if should_stop(preempt.requested, device): save(); return REQUEUE_EXIT_CODE
    """

    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM)):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._previous = {}
        self._requested = False
        self.signal_name: str | None = None  # the first signal received, e.g. "SIGUSR2"

    def _on_signal(self, signum, frame):
        # Only flag assignments here (see the module docstring); repeats of a signal change nothing.
        if not self._requested:
            self.signal_name = signal.Signals(signum).name
            self._requested = True

    @property
    def requested(self) -> bool:
        return self._requested

    def install(self) -> "PreemptionHandler":
        """Install the handler for each signal, remembering the previous ones. Main thread only
        (Python delivers signals to the main thread and refuses signal.signal elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread")
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before install(). A previous handler installed
        outside Python (signal.signal reported None) becomes SIG_DFL."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def should_stop(local_flag: bool, device) -> bool:
    """True on every rank if any rank's flag is set (all_reduce MAX when torch.distributed is
    initialised; otherwise the flag itself). Collective: call it on all ranks at the same step.
    device: where the 1-element tensor lives — the rank's CUDA device for NCCL, "cpu" for gloo."""
    return any_rank([local_flag], device)[0]
