"""The checkpoint writer process: tensors through shared memory, files written in another
interpreter, real processes and real signals.

What it must keep of the thread writer: the same files (that verify and load equal), the
same retention, a failed save reported and the next one working; what it adds: no torch in
the writer, stop signals left to the trainer, no writer outliving its trainer, and a plain
thread where shared memory is short.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from so8t_exp.checkpoint import RNGState, arena, capture
from so8t_exp.checkpoint import format as fmt
from so8t_exp.checkpoint.manager import Checkpointer
from so8t_exp.config import CheckpointConfig
from tests.conftest import wait_for

TENSORS = {
    "f32": torch.randn(3, 4),
    "i64": torch.arange(5, dtype=torch.int64),
    "bf16": torch.randn(7, dtype=torch.bfloat16),
    "f16": torch.randn(2, 2, dtype=torch.float16),
    "u8": torch.arange(9, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5),
    "empty": torch.empty(0, 3),
}


def _state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model(torch.randn(4, 6)).pow(2).mean().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _capture(buffers, step: int = 1) -> fmt.Payload:
    model, opt, sched = _state()
    return capture(
        params=dict(model.named_parameters()),
        optimizer=opt,
        scheduler=sched,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        rng=RNGState.now(),
        state={"progress": {"step": step}, "loss": float("inf")},
        buffers=buffers,
    )


def _checkpointer(root: Path, saved: list, failed: list, **cfg) -> Checkpointer:
    return Checkpointer(
        root,
        CheckpointConfig(**cfg),
        None,
        lambda name, step, kind: saved.append(name),
        lambda name, err: failed.append((name, str(err))),
    )


def test_safetensors_written_from_raw_bytes_load_with_the_library(tmp_path):
    folder = fmt.write(
        tmp_path, "rolling-step00000001", fmt.Payload({"t": TENSORS, "none": {}}, {"state": {}})
    )
    assert fmt.verify(folder) is None
    back = load_file(folder / "t.safetensors")
    for key, tensor in TENSORS.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert load_file(folder / "none.safetensors") == {}


def test_the_writer_process_writes_what_the_thread_writes(tmp_path):
    saved, failed = [], []
    ckpt = _checkpointer(tmp_path / "p", saved, failed, keep=2)
    try:
        payload = _capture(ckpt.buffers)
        assert payload.shared is not None, "not captured into shared memory"
        for step in range(1, 5):
            ckpt.save("rolling", step, payload)
        ckpt.save("final", 4, payload, wait=True)
        assert ckpt.writer.pid not in (None, os.getpid())
    finally:
        ckpt.close()
    assert not failed
    assert saved == [f"rolling-step{s:08d}" for s in range(1, 5)] + ["final-step00000004"]
    # Retention in the writer process, as in the thread.
    assert ckpt.local_names() == [
        "final-step00000004",
        "rolling-step00000004",
        "rolling-step00000003",
    ]
    ours = fmt.read(tmp_path / "p" / "final-step00000004")
    ref_folder = fmt.write(tmp_path / "t", "final-step00000004", _capture(None))
    ref = fmt.read(ref_folder)
    assert ours.docs == ref.docs
    assert ours.tensors.keys() == ref.tensors.keys()
    for group, tensors in ref.tensors.items():
        for key, tensor in tensors.items():
            assert torch.equal(ours.tensors[group][key], tensor), f"{group}/{key}"


def test_writer_process_imports_no_torch():
    probe = "import sys, so8t_exp.checkpoint.writer_main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_killed_writer_fails_that_save_and_the_next_one_works(tmp_path):
    saved, failed = [], []
    ckpt = _checkpointer(tmp_path, saved, failed)
    try:
        payload = _capture(ckpt.buffers)
        ckpt.save("rolling", 1, payload, wait=True)
        first = ckpt.writer.pid
        ckpt._pause = 30.0  # (fault injection: the write stops after its first file)
        ckpt.save("rolling", 2, payload)
        wait_for(lambda: any(tmp_path.glob(".tmp-rolling-step00000002-*")), what="a staged write")
        os.kill(first, signal.SIGKILL)
        ckpt.drain()
        assert failed and failed[0][0] == "rolling-step00000002"
        assert "writer_main ended" in failed[0][1]
        ckpt._pause = 0.0
        ckpt.save("rolling", 3, payload, wait=True)
        assert ckpt.writer.pid != first
    finally:
        ckpt.close()
    assert saved == ["rolling-step00000001", "rolling-step00000003"]
    # What the killed write left is recovered (removed: it never completed) at the next start.
    fmt.recover_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == saved


@pytest.mark.slow
def test_stop_signals_are_the_trainers_and_the_writer_ends_with_it(tmp_path):
    """Ctrl-C or SIGTERM to the whole process group must not end the writer before the
    trainer's emergency save; a trainer killed outright takes its writer with it, and its
    shared memory is freed (by multiprocessing's resource tracker)."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from pathlib import Path
        from tests.test_checkpoint_writer import _capture, _checkpointer
        ckpt = _checkpointer(Path({str(tmp_path)!r}), [], [])
        payload = _capture(ckpt.buffers)
        ckpt.save("rolling", 1, payload, wait=True)
        print(ckpt.writer.pid, payload.shared["arena"], flush=True)
        time.sleep(120)
        """
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, block = trainer.stdout.readline().split()
        writer = int(pid)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(writer, sig)
        time.sleep(0.5)
        assert _alive(writer), "the writer process ended on a stop signal"
        trainer.kill()
        trainer.wait(10)
        wait_for(lambda: not _alive(writer), timeout=10, what="the writer to end")
        if Path("/dev/shm").is_dir():  # (no shared memory left behind by a SIGKILL either)
            wait_for(lambda: not (Path("/dev/shm") / block).exists(), timeout=10)
    finally:
        trainer.kill()
    assert fmt.verify(tmp_path / "rolling-step00000001") is None


def test_short_shared_memory_writes_from_a_thread(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(arena, "shm_room", lambda nbytes: False)
    saved, failed = [], []
    ckpt = _checkpointer(tmp_path, saved, failed)
    try:
        with caplog.at_level(logging.WARNING):
            payload = _capture(ckpt.buffers)
        assert payload.shared is None
        assert "shared memory not free" in caplog.text
        ckpt.save("rolling", 1, payload, wait=True)
        assert ckpt.writer.pid is None  # (never started)
    finally:
        ckpt.close()
    assert saved == ["rolling-step00000001"] and not failed
    assert fmt.verify(tmp_path / "rolling-step00000001") is None


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm to look into")
def test_the_arena_is_reused_replaced_when_the_state_changes_and_freed(tmp_path):
    buffers = arena.Arena()
    first = _capture(buffers).shared["arena"]
    assert _capture(buffers).shared["arena"] == first  # (one block for every save)
    grown = {"weights": {"w": torch.zeros(10)}}
    _, shared = buffers.fill(grown)
    assert shared["arena"] != first and not (Path("/dev/shm") / first).exists()
    buffers.close()
    assert not (Path("/dev/shm") / shared["arena"]).exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_writer_that_cannot_run_leaves_the_saving_to_a_thread(tmp_path):
    """A helper that dies before its first answer (a broken install) is not retried at
    every save: that save and the rest are written by a thread."""
    saved, failed = [], []
    ckpt = _checkpointer(tmp_path, saved, failed)
    ckpt.writer.cmd = [sys.executable, "-c", "import sys; sys.exit(3)"]
    try:
        payload = _capture(ckpt.buffers)
        ckpt.save("rolling", 1, payload, wait=True)
        assert ckpt.writer is None
        ckpt.save("rolling", 2, payload, wait=True)
    finally:
        ckpt.close()
    assert saved == ["rolling-step00000001", "rolling-step00000002"] and not failed
    assert fmt.verify(tmp_path / "rolling-step00000001") is None


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm to look into")
def test_arenas_of_trainers_killed_with_their_resource_tracker_are_freed():
    """A SIGKILL to the whole process group takes Python's resource tracker along: the next
    trainer to make an arena frees the dead one's."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    leftover = Path("/dev/shm") / f"so8t-{gone}-deadbeef"
    mine = Path("/dev/shm") / f"so8t-{os.getpid()}-0badcafe"  # (alive: not touched)
    leftover.write_bytes(b"x" * 4096)
    mine.write_bytes(b"x")
    buffers = arena.Arena()
    try:
        assert buffers.fill({"w": {"x": torch.ones(3)}})[1] is not None
        assert not leftover.exists() and mine.exists()
    finally:
        buffers.close()
        mine.unlink()
        leftover.unlink(missing_ok=True)
