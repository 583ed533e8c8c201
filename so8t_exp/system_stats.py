"""System figures (CPU, RAM, process RSS, per-GPU utilisation/memory/temperature/power)
sampled in a background thread, plus the JSON-lines progress log (training figures from
:mod:`so8t_exp.progress_log` beside the system's).

MLflow's own system-metrics monitor logs no GPU temperature, so the trainer samples
everything itself through psutil and NVML and logs it like any other metric.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import psutil

from so8t_exp.progress_log import (
    ProgressFigures,
    StepWindow,
    json_line,
    resume_rate,
    significant,
)

log = logging.getLogger(__name__)


def _rounded(value):
    # (train_seconds, best_value: float noise in the 17th digit helps no reader)
    return significant(value, 6) if isinstance(value, float) else value


class GpuProbe:
    """NVML readings for every visible GPU; silently empty where there is no NVIDIA GPU."""

    def __init__(self) -> None:
        self.handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
        except Exception:  # no driver, no GPU, or no pynvml: nothing to report
            self.handles = []

    def sample(self) -> dict[str, float]:
        """``system/gpu<i>/<reading>`` for every GPU; no keys at all without one."""
        out: dict[str, float] = {}
        for i, h in enumerate(self.handles):
            readers = {
                "utilization_percent": lambda h=h: self.nvml.nvmlDeviceGetUtilizationRates(h).gpu,
                "memory_used_gb": lambda h=h: self.nvml.nvmlDeviceGetMemoryInfo(h).used / 1e9,
                "temperature_c": lambda h=h: self.nvml.nvmlDeviceGetTemperature(h, 0),
                "power_w": lambda h=h: self.nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            }
            for name, read in readers.items():
                # A reading a card does not support is left out.
                with contextlib.suppress(Exception):
                    out[f"system/gpu{i}/{name}"] = float(read())
        return out


class SystemSampler:
    """CPU, RAM and process figures (psutil) and the GPUs' (:class:`GpuProbe`)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.process.cpu_percent(None)
        psutil.cpu_percent(None)  # prime: the first call has no interval to measure
        self.gpus = GpuProbe()

    def sample(self) -> dict[str, float]:
        """One reading of every figure, keyed ``system/...`` as logged to MLflow."""
        vm = psutil.virtual_memory()
        return {
            "system/cpu_percent": psutil.cpu_percent(None),
            "system/ram_used_gb": (vm.total - vm.available) / 1e9,
            "system/ram_percent": vm.percent,
            "system/process_rss_gb": self.process.memory_info().rss / 1e9,
            **self.gpus.sample(),
        }


class Monitor:
    """Periodic background work beside training, each task on its own interval:
    system figures through ``log_metrics``; a JSON line of system and training figures in
    ``<session>/progress_logs/progress.jsonl``. (The liveness heartbeat has a thread of
    its own, :class:`so8t_exp.tracking.fencing.Heartbeat`: a slow NVML read must not delay
    it.)

    ``window`` is fed by the training loop; ``total_steps`` is ``trainer.max_steps``."""

    def __init__(
        self,
        log_metrics: Callable[[dict, int], None],
        training_state: Callable[[], dict],
        session_dir: Path,
        intervals: dict[str, float],
        window: StepWindow,
        total_steps: int,
    ) -> None:
        self.log_metrics, self.training_state = log_metrics, training_state
        self.progress_file = session_dir / "progress_logs" / "progress.jsonl"
        self.sampler = SystemSampler()
        # (read before this process writes a line: the previous process's rate)
        rate = resume_rate(session_dir, training_state())
        self.figures = ProgressFigures(window, total_steps, rate)
        self._write_lock = threading.Lock()  # stop() may race a last periodic line
        self.tasks = {
            "stats": (intervals["stats"], self.log_stats),
            "progress": (intervals["progress"], self.write_progress),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="so8t-monitor", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def _run(self) -> None:
        due = dict.fromkeys(self.tasks, time.monotonic())
        while not self._stop.is_set():
            for name, (interval, task) in self.tasks.items():
                if time.monotonic() >= due[name]:
                    due[name] = time.monotonic() + interval
                    try:
                        task()
                    except Exception as err:  # monitoring must never stop training
                        log.warning("monitor %s: %s", name, err)
            self._stop.wait(max(0.05, min(due.values()) - time.monotonic()))

    def log_stats(self) -> None:
        """Log one reading of the system figures at the current step."""
        self.log_metrics(self.sampler.sample(), self.training_state()["step"])

    def write_progress(self) -> None:
        """Append one line: time, training figures (the step, loss and rate ones first:
        what a person looks for), the rest of the training state, system figures."""
        with self._write_lock:
            figures = self.figures.figures()
            system = {k: round(v, 2) for k, v in self.sampler.sample().items()}
            line = {
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **figures,
                **{k: _rounded(v) for k, v in self.training_state().items() if k not in figures},
                **system,
            }
            self.progress_file.parent.mkdir(parents=True, exist_ok=True)
            # One write of a whole line: a reader never sees half of one (but a torn last
            # line after a power cut is possible: readers skip it).
            with self.progress_file.open("a", encoding="utf-8") as fh:
                fh.write(json_line(line))

    def stop(self) -> None:
        """Stop the thread and write a last line (the final step's figures)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.write_progress()
