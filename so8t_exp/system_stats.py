"""System figures (CPU, RAM, process RSS, per-GPU utilisation/memory/temperature/power)
sampled in a background thread, plus the seed's JSON-lines progress log.

MLflow's own system-metrics monitor logs no GPU temperature, so the trainer samples
everything itself through psutil and NVML and logs it like any other metric.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


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
    def __init__(self) -> None:
        self.process = psutil.Process()
        self.process.cpu_percent(None)
        psutil.cpu_percent(None)  # prime: the first call has no interval to measure
        self.gpus = GpuProbe()

    def sample(self) -> dict[str, float]:
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
    it.)"""

    def __init__(
        self,
        log_metrics: Callable[[dict, int], None],
        training_state: Callable[[], dict],
        session_dir: Path,
        intervals: dict[str, float],
    ) -> None:
        self.log_metrics, self.training_state = log_metrics, training_state
        self.progress_file = session_dir / "progress_logs" / "progress.jsonl"
        self.sampler = SystemSampler()
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
        self.log_metrics(self.sampler.sample(), self.training_state()["step"])

    def write_progress(self) -> None:
        line = {
            "time": datetime.now(timezone.utc).isoformat(),
            **self.training_state(),
            **self.sampler.sample(),
        }
        self.progress_file.parent.mkdir(parents=True, exist_ok=True)
        with self.progress_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.write_progress()
