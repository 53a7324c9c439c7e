"""Progress output on rank 0: a tqdm bar in a terminal, plain periodic lines in batch logs."""
import sys
import time

from tqdm import tqdm


class Progress:
    """``mode``: auto (bar if stderr is a terminal, else lines), bar, lines or none."""

    def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True) if self.mode == "bar" else None

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:,.0f}")
        elif self.mode == "lines":
            done = step - self.start
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total} ({100 * step / self.total:.1f}%) | loss {loss:.4f} | "
                  f"{images_per_s:,.0f} img/s | ETA {_hms(eta)}", flush=True)

    def note(self, line: str) -> None:
        """A line of its own (an epoch's losses), above the bar or among the progress lines."""
        if self.bar is not None:
            self.bar.write(line)
        elif self.mode == "lines":
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
