"""A one-line progress bar on stderr for long loops: step, loss (if any), rate, ETA."""
import math
import sys
import time


class Progress:
    """A one-line progress bar on stderr: step, loss, rate, ETA (a line per 10% when not a terminal)."""

    def __init__(self, total: int, start: int = 0, label: str = "", stream=None):
        self.total, self.start, self.label = total, start, label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.time()
        self.shown_decile = start * 10 // max(total, 1)
        self.width = 0  # of the longest bar drawn, which a note must cover

    def update(self, step: int, loss: float | None = None) -> None:
        now = time.time()
        decile = step * 10 // max(self.total, 1)
        if self.tty and (now - self.last > 0.2 or step == self.total):
            line = self._line(step, loss, now)
            self.width = max(self.width, len(line))
            self.stream.write("\r" + line)
        elif not self.tty and decile > self.shown_decile:
            self.stream.write(self._line(step, loss, now) + "\n")
        else:
            return
        self.last, self.shown_decile = now, decile
        self.stream.flush()

    def _line(self, step: int, loss: float | None, now: float) -> str:
        done = step / max(self.total, 1)
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = "" if loss is None else f" loss {loss:.4f}"
        return f"{self.label} [{bar}] {step}/{self.total}{shown} {rate:.1f} it/s ETA {clock(eta)}"

    def note(self, text: str) -> None:
        """A line of its own (e.g. the dev scores), labelled; on a terminal the bar redraws below it."""
        line = f"{self.label}: {text}"
        self.stream.write(f"\r{line:<{self.width}}\n" if self.tty else line + "\n")
        self.stream.flush()

    def close(self, note: str = "") -> None:
        if self.tty:
            self.stream.write("\n")
        if note:
            self.stream.write(f"{self.label}: {note}\n")
        self.stream.flush()


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"
