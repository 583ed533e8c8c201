"""Windows console close / logoff / shutdown: the run is left resumable and consistent within
the grace Windows gives, with an emergency checkpoint only if it fits.

What cannot run here is isolated, and only that: there is no Windows console, so
``SetConsoleCtrlHandler`` is replaced by a recorder (``ctypes.WINFUNCTYPE`` by
``CFUNCTYPE``, ``ctypes.windll`` by a fake) or the registration is skipped, ``os.name`` is
switched through ``signals._WINDOWS``, and the event is delivered by calling the handler
from a thread of our own, as Windows would from one of its own. Windows would end the
process when the handler returns; here the process goes on, so the tests also check that
nothing more happens after that. Everything else is real: the training run (in-process,
tiny model), the checkpoints, the session file, the sqlite MLflow store.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from so8t_exp import shutdown_budget, signals
from so8t_exp.checkpoint import format as fmt
from so8t_exp.run import run_training
from so8t_exp.shutdown_budget import Grace, emergency_decision
from so8t_exp.signals import StopRequest

CTRL_C, CTRL_CLOSE, CTRL_LOGOFF, CTRL_SHUTDOWN = 0, 2, 5, 6
EXIT_CLOSED = 128 + signals.SIGBREAK


def _deliver(stop: StopRequest, ctrl_type: int) -> dict:
    """Call the handler from another thread, as Windows does; the result once it returns."""
    out: dict = {}

    def run() -> None:
        started = time.monotonic()
        out["returned"] = stop.on_console_event(ctrl_type)
        out["seconds"] = time.monotonic() - started

    out["thread"] = threading.Thread(target=run, name="console-ctrl")
    out["thread"].start()
    return out


# -- the budget ------------------------------------------------------------------------------
def _grace(left: float) -> Grace:
    return Grace("close", seconds=4.5, started=time.monotonic() - (4.5 - left))


def test_the_save_fits_with_the_reserve_kept_for_closing():
    fits, line = emergency_decision(_grace(3.93), 0.8, 1200)
    assert fits
    assert line == (
        "emergency checkpoint: last save took 0.8 s, 3.9 s of grace left "
        "(1.0 s of it kept to close the run)"
    )


def test_a_save_that_does_not_fit_is_skipped_and_the_newest_checkpoint_named():
    fits, line = emergency_decision(_grace(3.23), 9.1, 1200)
    assert not fits
    assert line == (
        "emergency checkpoint skipped: last save took 9.1 s, 3.2 s of grace left "
        "(1.0 s of it kept to close the run); newest checkpoint step 1200 stands"
    )
    assert not emergency_decision(_grace(3.2), 2.5, 1200)[0]  # fits only without the reserve


def test_with_nothing_measured_a_save_is_tried_only_with_nothing_to_lose():
    fits, line = emergency_decision(_grace(4.0), None, 1200)
    assert not fits and "no save timed in this process yet" in line and "1200 stands" in line
    fits, line = emergency_decision(_grace(4.0), None, None)
    assert fits and line.startswith("emergency checkpoint attempted: no save timed yet")


# -- the handler -----------------------------------------------------------------------------
def test_ctrl_c_and_ctrl_break_are_left_to_the_c_runtime():
    stop = StopRequest()
    assert stop.on_console_event(CTRL_C) is False and not stop.requested
    assert stop.on_console_event(1) is False and stop.grace is None


@pytest.mark.parametrize("ctrl_type", [CTRL_CLOSE, CTRL_LOGOFF, CTRL_SHUTDOWN])
def test_the_handler_holds_windows_off_until_the_run_is_closed(ctrl_type):
    stop = StopRequest()
    stop.closer = lambda *a: pytest.fail("the training thread closed the run in time")
    out = _deliver(stop, ctrl_type)
    deadline = time.monotonic() + 5
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop.requested and stop.exit_code == EXIT_CLOSED and stop.grace is not None
    time.sleep(0.2)
    assert out["thread"].is_alive()  # still holding Windows off
    assert stop.claim_close()  # the training thread closes the run ...
    stop.done()
    out["thread"].join(5)
    assert out["returned"] is True and out["seconds"] < 1.5  # ... and Windows may end it


def test_a_late_training_thread_is_closed_for_by_the_handler(monkeypatch, caplog):
    monkeypatch.setattr(shutdown_budget, "GRACE_SECONDS", 1.5)  # (shorter, for the test)
    stop, closed = StopRequest(), []
    stop.closer = lambda grace, saving: closed.append((grace.elapsed(), saving))
    out = _deliver(stop, CTRL_CLOSE)
    out["thread"].join(5)
    # Closed with the reserve left (0.5 s in), then it waited out the grace.
    assert len(closed) == 1 and 0.45 < closed[0][0] < 0.9 and closed[0][1] is False
    assert 1.4 < out["seconds"] < 2.0 and out["returned"]
    assert not stop.claim_close()  # the training thread, arriving now, must not close again


def test_registration_goes_through_set_console_ctrl_handler(monkeypatch):
    """``ctypes.windll`` and ``WINFUNCTYPE`` are Windows-only: a recorder and ``CFUNCTYPE``
    stand in; the callback itself is the real ctypes one, called as Windows would."""
    calls = []

    class Kernel32:
        @staticmethod
        def SetConsoleCtrlHandler(handler, add):  # noqa: N802 (the Windows name)
            calls.append((handler, add))
            return 1

    monkeypatch.setattr(signals, "_WINDOWS", True)
    monkeypatch.setattr(ctypes, "WINFUNCTYPE", ctypes.CFUNCTYPE, raising=False)
    monkeypatch.setattr(ctypes, "windll", type("WinDLL", (), {"kernel32": Kernel32}), raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        handler, added = calls[0]
        assert added is True and handler is stop._console_handler
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(rc=handler(CTRL_LOGOFF)))
        thread.start()
        while not stop.requested:
            time.sleep(0.01)
        stop.claim_close()
        stop.done()
        thread.join(5)
        assert out["rc"] == 1 and stop.grace.event == "logoff"
    assert calls[1] == (handler, False) and stop._console_handler is None
    assert signal.getsignal(signal.SIGTERM) is previous


# -- a real run, closed --------------------------------------------------------------------
@pytest.fixture
def console(monkeypatch):
    """Switch the platform to Windows for :class:`StopRequest`, with the registration
    replaced by a thread that delivers ``CTRL_CLOSE_EVENT`` once ``when()`` holds."""
    plan: dict = {"when": lambda: False}

    def register(stop: StopRequest, add: bool) -> None:
        if not add:
            return

        def fire() -> None:
            while not plan["when"]():
                time.sleep(0.02)
            plan["out"] = _deliver(stop, CTRL_CLOSE)

        plan["stop"] = stop
        threading.Thread(target=fire, daemon=True).start()

    monkeypatch.setattr(signals, "_WINDOWS", True)
    monkeypatch.setattr(StopRequest, "_register_console_handler", register)
    return plan


def _run(tmp_path, compose_cfg, monkeypatch, *overrides: str) -> tuple[int, Path]:
    monkeypatch.setenv("SO8T_EXP_HOME", str(tmp_path))
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        "+experiment=smoke",
        "trainer.max_steps=40",
        "trainer.eval_every_n_steps=1000",
        "checkpoint.every_n_steps=2",
        "checkpoint.best_metric=null",
        *overrides,
    )
    return run_training(cfg, run_dir), run_dir


def _closed_consistently(run_dir: Path, store: str) -> tuple[int, list[str]]:
    """Session file and MLflow say interrupted/KILLED, every step's loss is in MLflow;
    the last completed step and the checkpoint folders."""
    import json

    info = json.loads((run_dir / "session_info.json").read_text())
    assert info["status"] == "interrupted"
    client = MlflowClient(store)
    run = client.get_run(info["session_id"])
    assert run.info.status == "KILLED"
    step = int(run.data.tags["so8t.step"])
    loss = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert loss == list(range(1, step + 1))  # buffered metrics were flushed
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert all(fmt.parse_name(n) for n in names), names  # nothing half-written left
    return step, names


@pytest.mark.slow
def test_console_close_with_time_for_an_emergency_checkpoint(
    tmp_path, store, compose_cfg, monkeypatch, console, caplog
):
    """Steps of >= 0.3 s and a rolling checkpoint every 3: the event comes in step 4 or 5.
    The grace is 8 s, not 4.5: on a loaded 2-core test machine a step of the tiny model can
    take seconds, and this test is about the save that fits, not about a late step."""
    monkeypatch.setenv("SO8T_FAULT_STEP_SECONDS", "0.3")
    monkeypatch.setattr(shutdown_budget, "GRACE_SECONDS", 8.0)
    console["when"] = lambda: (tmp_path / "run" / "checkpoints" / "rolling-step00000003").is_dir()
    with caplog.at_level(logging.INFO):
        code, run_dir = _run(tmp_path, compose_cfg, monkeypatch, "checkpoint.every_n_steps=3")
    assert code == EXIT_CLOSED
    out = console["out"]
    out["thread"].join(5)
    assert out["returned"] is True and out["seconds"] < shutdown_budget.GRACE_SECONDS
    step, names = _closed_consistently(run_dir, store)
    assert f"emergency-step{step:08d}" in names
    assert fmt.verify(run_dir / "checkpoints" / f"emergency-step{step:08d}") is None
    line = next(
        r.getMessage() for r in caplog.records if "console close: emergency" in r.getMessage()
    )
    assert line.startswith("console close: emergency checkpoint: last save took ")


@pytest.mark.slow
def test_console_close_without_time_for_it_keeps_the_newest_rolling_one(
    tmp_path, store, compose_cfg, monkeypatch, console, caplog
):
    """Each save takes > 7 s (``SO8T_FAULT_CHECKPOINT_PAUSE``, the existing fault hook):
    measured, it does not fit in the grace, 7.5 s here rather than 4.5 so that a loaded
    2-core test machine still reaches the step boundary in time (a late one is the next
    test). Steps of >= 0.3 s: the run is still going when the first save is done."""
    monkeypatch.setenv("SO8T_FAULT_CHECKPOINT_PAUSE", "7.0")
    monkeypatch.setenv("SO8T_FAULT_STEP_SECONDS", "0.3")
    monkeypatch.setattr(shutdown_budget, "GRACE_SECONDS", 7.5)
    run_dir = tmp_path / "run"
    console["when"] = lambda: (
        (run_dir / "session_info.json").is_file()
        and "rolling-step" in (run_dir / "session_info.json").read_text()
    )
    with caplog.at_level(logging.INFO):
        code, run_dir = _run(tmp_path, compose_cfg, monkeypatch)
    assert code == EXIT_CLOSED
    out = console["out"]
    out["thread"].join(10)
    assert out["returned"] is True and out["seconds"] < shutdown_budget.GRACE_SECONDS
    step, names = _closed_consistently(run_dir, store)
    assert not [n for n in names if n.startswith("emergency")]
    line = next(
        r.getMessage() for r in caplog.records if "emergency checkpoint skipped" in r.getMessage()
    )
    newest = max(fmt.parse_name(n)[1] for n in names if n.startswith("rolling"))
    assert line.startswith("console close: emergency checkpoint skipped: last save took 7.")
    assert line.endswith("stands") and "newest checkpoint step " in line
    assert fmt.newest_valid(run_dir / "checkpoints") is not None  # resumable from it
    assert newest >= 2


@pytest.mark.slow
def test_a_step_longer_than_the_grace_is_closed_for_by_the_handler(
    tmp_path, store, compose_cfg, monkeypatch, console, caplog
):
    """Every step takes 3 s (``SO8T_FAULT_STEP_SECONDS``) and the grace is cut to 2 s: the
    step in progress cannot end in time, so the handler closes the run itself. Windows would
    end the process when it returns; here the step ends later and must change nothing."""
    monkeypatch.setenv("SO8T_FAULT_STEP_SECONDS", "3.0")
    monkeypatch.setattr(shutdown_budget, "GRACE_SECONDS", 2.0)
    run_dir = tmp_path / "run"
    console["when"] = lambda: (run_dir / "checkpoints" / "rolling-step00000002").is_dir()
    with caplog.at_level(logging.INFO):
        code, run_dir = _run(tmp_path, compose_cfg, monkeypatch, "checkpoint.every_n_steps=2")
    assert code == EXIT_CLOSED
    out = console["out"]
    out["thread"].join(5)
    assert out["returned"] is True and out["seconds"] < 2.2
    step, names = _closed_consistently(run_dir, store)
    assert names == ["rolling-step00000002"] and step == 2
    line = next(r.getMessage() for r in caplog.records if "has not reached" in r.getMessage())
    assert line.startswith("console close: training has not reached a step boundary")
    assert line.endswith("emergency checkpoint skipped; newest checkpoint step 2 stands)")
