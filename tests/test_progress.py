"""The progress log's training figures (mean loss, LR, steps/s, percent, ETA), the
``sessions`` table's loss and ETA, and the console bar's loss."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest

from so8t_exp.progress_bar import ProgressBar
from so8t_exp.progress_log import (
    ETA_WINDOW_SECONDS,
    ProgressFigures,
    StepWindow,
    json_line,
    resume_rate,
    tail,
)
from so8t_exp.system_stats import GpuProbe, Monitor
from tests.conftest import (
    history,
    only_run,
    run_train,
    session_info,
    start_train,
    subprocess_env,
    wait_for,
)


class Clock:
    """A monotonic and a wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_800_000_000.0 + self.t


@pytest.fixture
def tokyo(monkeypatch):
    """Local time UTC+9 (no DST): the ETA carries the local offset."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def steps(window: StepWindow, first: int, losses: list[float | None], lr: float = 1e-3):
    for step, loss in enumerate(losses, first):
        metrics = {"train/lr": lr} if loss is None else {"train/loss": loss, "train/lr": lr}
        window.add(step, metrics)


# -- the figures ------------------------------------------------------------------------
def test_loss_is_the_mean_since_the_last_line_and_the_rate_that_of_the_interval(tokyo):
    clock, window = Clock(), StepWindow(0)
    figures = ProgressFigures(window, 100, None, clock.mono, clock.wall)
    first = figures.figures()
    # as training starts: no interval, no step timed, no ETA, no loss
    assert first == {"step": 0, "total_steps": 100, "percent_done": 0.0}
    steps(window, 1, [4.0, 3.0, 2.0, None], lr=2.5e-4)  # step 4 skipped: no loss
    clock.t += 2.0
    line = figures.figures()
    assert line["train/loss"] == 3.0 and line["train/loss_steps"] == 3  # not 2.0 (the last)
    assert line["train/lr"] == 2.5e-4
    assert line["steps_per_sec"] == 2.0 and line["percent_done"] == 4.0
    assert line["remaining_seconds"] == 48 and line["eta_steps_per_sec"] == 2.0
    eta = datetime.fromisoformat(line["eta"])
    assert line["eta"].endswith("+09:00") and eta.timestamp() == clock.wall() + 48
    steps(window, 5, [1.23456789])
    clock.t += 3.0
    line = figures.figures()
    assert line["train/loss"] == 1.2346 and line["train/loss_steps"] == 1  # 5 significant
    assert line["steps_per_sec"] == pytest.approx(1 / 3, rel=1e-3)
    assert line["eta_steps_per_sec"] == 1.0  # 5 steps in 5 s of this process


def test_a_resume_never_divides_by_the_time_since_the_original_start():
    clock, window = Clock(), StepWindow(500)  # restored at step 500, after any downtime
    figures = ProgressFigures(window, 1000, fallback_rate=4.0, clock=clock.mono, wall=clock.wall)
    first = figures.figures()
    assert "steps_per_sec" not in first and "train/loss" not in first
    # the previous process's rate until this one has timed steps
    assert first["eta_steps_per_sec"] == 4.0 and first["remaining_seconds"] == 125
    assert first["percent_done"] == 50.0
    steps(window, 501, [2.0] * 10)
    clock.t += 5.0
    line = figures.figures()
    assert line["steps_per_sec"] == 2.0 and line["eta_steps_per_sec"] == 2.0
    assert line["remaining_seconds"] == 245


def test_the_eta_follows_the_rate_of_about_the_last_hour():
    clock, window = Clock(), StepWindow(0)
    figures = ProgressFigures(window, 100_000, None, clock.mono, clock.wall)
    figures.figures()
    step = 0
    for rate in [10] * 20 + [1] * 20:  # 10 steps/s for 2 h, then 1 step/s for 2 h
        step += rate * 360
        window.add(step, {"train/loss": 1.0})
        clock.t += 360
        line = figures.figures()
    assert line["steps_per_sec"] == 1.0
    assert line["eta_steps_per_sec"] == 1.0  # the slow hour only, not the 4 h average
    window.add(step, {})
    clock.t += ETA_WINDOW_SECONDS + 1  # stalled for over an hour: no honest estimate
    stalled = figures.figures()
    assert stalled["steps_per_sec"] == 0.0 and "eta" not in stalled


def test_the_line_of_a_finished_run_has_nothing_left():
    clock, window = Clock(), StepWindow(0)
    figures = ProgressFigures(window, 10, None, clock.mono, clock.wall)
    figures.figures()
    steps(window, 1, [1.0] * 10)
    clock.t += 1
    line = figures.figures()
    assert line["percent_done"] == 100.0 and line["remaining_seconds"] == 0


def test_resume_rate_reads_the_previous_line_past_a_torn_one(tmp_path: Path):
    log = tmp_path / "progress_logs" / "progress.jsonl"
    log.parent.mkdir()
    good = {"step": 7, "eta_steps_per_sec": 3.5}
    log.write_text(json_line(good) + json_line({"step": 8}) + '{"step": 9, "eta_ste')
    assert tail(log)[0] == {"step": 8}  # the torn line is skipped
    assert resume_rate(tmp_path, {"step": 8, "train_seconds": 100.0}) == 3.5
    log.unlink()  # no log (another host's folder): the checkpointed step time
    assert resume_rate(tmp_path, {"step": 8, "train_seconds": 4.0}) == 2.0
    assert resume_rate(tmp_path, {"step": 0, "train_seconds": 0.0}) is None


def test_tail_reads_only_the_end_of_a_long_log(tmp_path: Path):
    log = tmp_path / "progress.jsonl"
    log.write_text("".join(json_line({"step": i, "pad": "x" * 200}) for i in range(5000)))
    lines = tail(log)
    assert lines[0]["step"] == 4999 and 100 < len(lines) < 400
    assert [line["step"] for line in lines] == list(range(4999, 4999 - len(lines), -1))
    assert tail(tmp_path / "missing.jsonl") == []


def test_json_lines_stay_valid_with_non_finite_numbers():
    line = json_line({"best_value": float("nan"), "x": float("inf"), "ok": 1.5})
    assert json.loads(line) == {"best_value": None, "x": None, "ok": 1.5}


# -- the monitor's line, GPU figures ------------------------------------------------------
class FakeNvml:
    """Stands in for pynvml only: the test machine has no NVIDIA GPU. Everything else in
    the line (psutil figures, the file) is real."""

    def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802 (NVML's names)
        return SimpleNamespace(gpu=55)

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return SimpleNamespace(used=3.456e9)

    def nvmlDeviceGetTemperature(self, handle, sensor):  # noqa: N802
        return 71

    def nvmlDeviceGetPowerUsage(self, handle):  # noqa: N802
        raise RuntimeError("not supported on this card")


def monitor(tmp_path: Path, window: StepWindow) -> Monitor:
    state = {"step": 0, "epoch": 0, "train_seconds": 12.3456789123}
    return Monitor(
        lambda metrics, step: None,
        lambda: state,
        tmp_path,
        {"stats": 3600, "progress": 3600},
        window,
        100,
    )


def test_progress_line_has_the_gpu_temperature_where_there_is_a_gpu(tmp_path: Path):
    window = StepWindow(0)
    mon = monitor(tmp_path, window)
    mon.sampler.gpus.handles, mon.sampler.gpus.nvml = ["gpu0"], FakeNvml()  # the mock
    mon.write_progress()
    steps(window, 1, [2.0, 4.0])
    mon.write_progress()
    first, line = map(json.loads, mon.progress_file.read_text().splitlines())
    assert line["system/gpu0/temperature_c"] == 71.0
    assert line["system/gpu0/memory_used_gb"] == 3.46  # rounded for reading
    assert "system/gpu0/power_w" not in line  # a reading the card lacks is left out
    assert line["train/loss"] == 3.0 and line["step"] == 2 and line["train_seconds"] == 12.3457
    assert "system/cpu_percent" in line and "train/loss" not in first
    # the figures a person looks for first, right after the time
    assert list(line)[:4] == ["time", "step", "total_steps", "percent_done"]


def test_without_a_gpu_the_gpu_fields_are_left_out(tmp_path: Path):
    probe = GpuProbe()
    probe.handles = []  # (also on a machine that has one)
    assert probe.sample() == {}
    mon = monitor(tmp_path, StepWindow(0))
    mon.sampler.gpus = probe
    mon.write_progress()
    line = json.loads(mon.progress_file.read_text())
    assert not [k for k in line if k.startswith("system/gpu")]
    assert "system/ram_used_gb" in line


# -- the console bar ---------------------------------------------------------------------
def test_the_bar_draws_the_loss_of_the_step_it_shows(capsys):
    """update() redraws: with the postfix set after it (as the bar once did), each drawing
    showed the previous step's loss."""
    bar = ProgressBar(total=3, initial=0, enabled=True)
    bar.bar.mininterval, bar.bar.miniters, bar.bar.dynamic_miniters = 0, 1, False
    drawn = []
    for step, loss in [(1, 3.0), (2, 2.0), (3, 1.0)]:
        bar.update(step, {"train/loss": loss, "train/tokens_per_sec": 100.0})
        drawn.append(capsys.readouterr().err.split("\r")[-1])
    bar.close()
    for (step, loss), text in zip([(1, 3.0), (2, 2.0), (3, 1.0)], drawn, strict=True):
        assert f"{step}/3" in text and f"loss={loss:.4f}" in text, text


# -- end to end --------------------------------------------------------------------------
def lines_of(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except (OSError, ValueError):  # (a line being written)
        return []


def sessions_table(tmp_path: Path, store: str) -> dict[str, str]:
    """``python -m so8t_exp.sessions``'s one row, as {column: value}."""
    out = subprocess.run(
        [sys.executable, "-m", "so8t_exp.sessions", f"tracking.uri={store}"],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    header, row = out.stdout.splitlines()
    starts = [header.index(name) for name in header.split()]
    cells = [row[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    return dict(zip(header.split(), cells, strict=True))


@pytest.mark.slow
def test_progress_lines_and_sessions_through_a_kill_and_a_resume(tmp_path: Path, store: str):
    run_dir = tmp_path / "run"
    log = run_dir / "progress_logs" / "progress.jsonl"
    overrides = (
        "+experiment=smoke",
        "trainer.max_steps=40",
        "checkpoint.every_n_steps=5",
        "progress.interval_seconds=0.5",
    )
    env = subprocess_env(tmp_path, TZ="Asia/Tokyo", SO8T_FAULT_STEP_SECONDS="0.05")
    proc = start_train(tmp_path, store, run_dir, *overrides, env=env)
    try:
        wait_for(
            lambda: (
                session_info(run_dir).get("current_step", 0) >= 10
                and any("eta" in line for line in lines_of(log))
            ),
            proc=proc,
            what="step 10 and an ETA",
        )
        live = sessions_table(tmp_path, store)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    before = lines_of(log)
    assert live["status"] == "RUNNING/alive" and live["eta"] != "-"
    assert live["loss"] != "-"
    time.sleep(2)  # downtime: no step time
    out = run_train(tmp_path, store, run_dir, *overrides, env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    after = lines_of(log)[len(before) :]
    first = after[0]
    assert first["step"] >= 10  # the checkpoint it continued from
    # the first line after the resume: no interval yet, the ETA from the last process's rate
    assert "steps_per_sec" not in first and "train/loss" not in first
    assert first["eta_steps_per_sec"] == next(
        line["eta_steps_per_sec"] for line in reversed(before) if "eta_steps_per_sec" in line
    )
    assert first["eta"].endswith("+09:00")
    # over each interval (about 12 steps/s here), not over the time since the first start
    rates = [b["steps_per_sec"] for a, b in pairwise(after) if b["step"] > a["step"]]
    assert rates and min(rates) > 0 and max(rates) > 2
    assert after[-1]["percent_done"] == 100.0 and after[-1]["total_steps"] == 40

    # each line's loss is the mean of the steps since the line before (MLflow has them all)
    client, run = only_run(store)
    loss = dict(history(client, run.info.run_id, "train/loss"))
    checked = 0
    for prev, line in pairwise(after):
        if "train/loss" in line:
            span = range(prev["step"] + 1, line["step"] + 1)
            assert line["train/loss_steps"] == len(span)
            mean = sum(loss[s] for s in span) / len(span)
            assert line["train/loss"] == pytest.approx(mean, rel=1e-4)
            checked += 1
    assert checked >= 2
    assert {"train/lr", "system/cpu_percent", "remaining_seconds"} <= set(after[-2])

    done = sessions_table(tmp_path, store)
    newest_loss = next(line["train/loss"] for line in reversed(after) if "train/loss" in line)
    assert done["status"] == "FINISHED/finished" and done["eta"] == "-"
    assert done["loss"] == f"{newest_loss:.4g}"
