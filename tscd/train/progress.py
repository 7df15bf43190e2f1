"""When periodic actions run, and the recent speed and ETA of a run."""
from __future__ import annotations

import math
import time
from collections import deque

#: Iterations the ETA's rate is measured over.
RATE_WINDOW = 50


def due(iteration: int, every: int, max_iters: int) -> bool:
    """Whether a periodic action (log, validation, checkpoint) runs after ``iteration``: every ``every`` iterations
    and after the last one; ``every == 0`` means only after the last one."""
    return iteration == max_iters or (every > 0 and iteration % every == 0)


class RecentRate:
    """Seconds per iteration over the last ``window`` iterations (the ETA must follow the slower full-loss phase,
    not average it with the warm-up)."""

    def __init__(self, window: int = RATE_WINDOW) -> None:
        self.marks: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def mark(self, iteration: int, now: float | None = None) -> None:
        self.marks.append((time.time() if now is None else now, iteration))

    def seconds_per_iter(self) -> float:
        if len(self.marks) < 2:
            return float("nan")
        (t0, i0), (t1, i1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / max(i1 - i0, 1)

    def eta(self, remaining: int) -> float:
        return self.seconds_per_iter() * remaining


def format_eta(seconds: float) -> str:
    """``3725`` -> ``1:02:05``; days spelled out; ``?`` while unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest // 60 % 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text
