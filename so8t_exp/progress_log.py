"""The training figures of the progress log (``<session>/progress_logs/progress.jsonl``):
mean loss since the last line, learning rate, steps per second, percent done and an
estimated finish time; and reading the newest lines back (``python -m so8t_exp.sessions``,
a resumed run's first ETA).

Two threads meet here. The training loop adds each completed step to a
:class:`StepWindow` (Python floats it already has: no device sync of its own); the monitor
thread turns the totals into a line with :class:`ProgressFigures`.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

# The ETA uses the rate of about the last hour: it follows a slowdown (a throttled GPU,
# a second job) within the hour, and averages over evaluations and checkpoint saves.
ETA_WINDOW_SECONDS = 3600.0
# A tail this long holds the newest lines even with many GPUs' figures in each.
_TAIL_BYTES = 64 * 1024


class Totals(NamedTuple):
    """Running totals since this process started training (never reset: the reader keeps
    its own previous copy and takes differences)."""

    step: int
    loss_sum: float
    loss_steps: int  # steps with a finite loss (a skipped step has none)
    lr: float | None


class StepWindow:
    """The training thread's side: every completed step's loss and learning rate."""

    def __init__(self, step: int) -> None:
        self.totals = Totals(step, 0.0, 0, None)

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        """Count the step ``step`` that returned ``metrics`` (``train/loss`` is absent on a
        skipped step)."""
        t = self.totals
        loss = metrics.get("train/loss")
        # One new tuple bound by one assignment: the monitor thread reads a consistent set
        # of totals without a lock on the training thread's path.
        self.totals = Totals(
            step,
            t.loss_sum + loss if loss is not None else t.loss_sum,
            t.loss_steps + (loss is not None),
            metrics.get("train/lr", t.lr),
        )


def significant(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits (a loss of 0.000123 keeps them)."""
    return float(f"{value:.{digits}g}")


def local_iso(epoch_seconds: float) -> str:
    """ISO-8601 local time with the offset in force at that instant, to the second."""
    local = datetime.fromtimestamp(epoch_seconds, timezone.utc).astimezone()
    return local.isoformat(timespec="seconds")


class ProgressFigures:
    """The monitor thread's side: the training figures of one progress line.

    ``fallback_rate`` (steps/s) gives an ETA before this process has timed a step of its
    own: a resumed run's first line must not divide by the time since the original start
    (the downtime) nor go without an ETA."""

    def __init__(
        self,
        window: StepWindow,
        total_steps: int,
        fallback_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.window, self.total, self.fallback = window, total_steps, fallback_rate
        self.clock, self.wall = clock, wall
        self.last = window.totals
        self.start_step = self.last.step
        # (monotonic time, step) at each line of this process: the intervals, the ETA's window
        self.marks: deque[tuple[float, int]] = deque()

    def figures(self) -> dict[str, float | int | str]:
        """The next line's figures; interval figures are those since the previous call."""
        now, cur = self.clock(), self.window.totals
        prev_time, prev_step = self.marks[-1] if self.marks else (now, cur.step)
        out: dict[str, float | int | str] = {
            "step": cur.step,
            "total_steps": self.total,
            "percent_done": round(100.0 * min(cur.step, self.total) / max(self.total, 1), 2),
        }
        losses = cur.loss_steps - self.last.loss_steps
        if losses:
            out["train/loss"] = significant((cur.loss_sum - self.last.loss_sum) / losses, 5)
            out["train/loss_steps"] = losses
        if cur.lr is not None:
            out["train/lr"] = significant(cur.lr, 4)
        # The first line of a process is written as training starts: no interval yet (and
        # never the time since the original start: a resume's downtime is no step time).
        if self.marks and now > prev_time:
            out["steps_per_sec"] = significant((cur.step - prev_step) / (now - prev_time), 4)
        self.last = cur
        self.marks.append((now, cur.step))
        # Keep the newest mark at least the window old as the first: the rate spans >= 1 h.
        while len(self.marks) > 2 and now - self.marks[1][0] >= ETA_WINDOW_SECONDS:
            self.marks.popleft()
        out.update(self._eta(now, cur.step))
        return out

    def _eta(self, now: float, step: int) -> dict[str, float | int | str]:
        first_time, first_step = self.marks[0]
        if step > first_step:
            rate = (step - first_step) / (now - first_time)
        elif self.fallback and (len(self.marks) == 1 or step == self.start_step):
            rate = self.fallback  # no step timed here yet (a resume's first lines)
        else:
            return {}  # stalled for the whole window: no honest estimate
        remaining = max(self.total - step, 0) / rate
        return {
            "eta_steps_per_sec": significant(rate, 4),
            "remaining_seconds": round(remaining),
            "eta": local_iso(self.wall() + remaining),
        }


def tail(path: Path, max_bytes: int = _TAIL_BYTES) -> list[dict]:
    """The newest lines of a JSON-lines file as dicts, newest first; a torn last line (the
    process died mid-write) and any other unreadable line are skipped. ``[]`` when the file
    cannot be read."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size:  # (the first piece starts mid-line)
        lines = lines[1:]
    out = []
    for raw in reversed(lines):
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            out.append(line)
    return out


def newest(lines: list[dict], key: str):
    """The value of ``key`` in the newest line that has it, else ``None``."""
    return next((line[key] for line in lines if line.get(key) is not None), None)


def resume_rate(session_dir: Path, progress: Mapping) -> float | None:
    """Steps/s to estimate with until this process has timed steps of its own: the rate
    of the session's last progress line (wall time, evaluations and saves included), else
    the checkpointed step time (steps only: optimistic)."""
    rate = newest(tail(session_dir / "progress_logs" / "progress.jsonl"), "eta_steps_per_sec")
    if isinstance(rate, (int, float)) and rate > 0:
        return float(rate)
    seconds = progress.get("train_seconds") or 0.0
    return progress.get("step", 0) / seconds if seconds > 0 else None


def json_line(fields: Mapping) -> str:
    """One JSON line; a non-finite number (not valid JSON) is written as ``null``."""
    clean = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()
    }
    return json.dumps(clean, ensure_ascii=False, allow_nan=False) + "\n"
