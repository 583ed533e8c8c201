"""Training on several processes: real ``torchrun``, two gloo ranks on the CPU, real signals.

A run whose ranks are killed one after the other (rank 1 mid-run, rank 0 in the middle of a
checkpoint write) and continued by ``python -m so8t_exp.resume`` must equal an
uninterrupted run of the same number of processes bit for bit, stay one MLflow run and log
every step once; a start with another number of processes is refused.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from so8t_exp.checkpoint import verify
from so8t_exp.distributed.world import peer_lost
from so8t_exp.paths import sqlite_uri
from so8t_exp.tracking.errors import TrackingUnavailable
from tests.conftest import (
    history,
    only_run,
    run_train,
    session_info,
    subprocess_env,
    train_cmd,
    wait_for,
)
from tests.team_server_support import free_port

pytestmark = pytest.mark.slow

STEPS = 16
OVERRIDES = (
    "+experiment=smoke",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every_n_steps=8",
    "checkpoint.every_n_steps=4",
    "trainer.micro_batch_size=2",  # per rank: the batch of a step is 2 × 2
)
GROUPS = ("weights", "optimizer", "rng", "rng-rank1")


def torchrun(tmp: Path, store: str, run_dir: Path, *extra: str, env=None) -> subprocess.Popen:
    cmd = train_cmd(store, run_dir, *OVERRIDES, *extra)
    cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    cmd.insert(6, "so8t_exp.train")
    log = open(run_dir.parent / f"torchrun.{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        cmd, cwd=tmp, env=env or subprocess_env(tmp), stdout=log, stderr=subprocess.STDOUT
    )


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    """The pid of ``rank`` among torchrun's workers (by the RANK torchrun gives it)."""
    for _ in range(200):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == proc.pid and f"RANK={rank}".encode() in env:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under torchrun {proc.pid}")


def final(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = run_dir / "checkpoints" / f"final-step{STEPS:08d}"
    assert verify(folder) is None
    return {g: load_file(folder / f"{g}.safetensors") for g in GROUPS}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp-baseline")
    store = sqlite_uri(tmp / "mlflow.db")
    proc = torchrun(tmp, store, tmp / "run")
    assert proc.wait(300) == 0, (tmp / "run").parent
    client, run = only_run(store)
    return {"dir": tmp / "run", "loss": history(client, run.info.run_id, "train/loss")}


def test_two_ranks_are_one_run_and_train_the_whole_batch(tmp_path, baseline):
    """One MLflow run, every step once, each rank's RNG states in every checkpoint, and the
    same losses (up to float rounding) as one process on the whole batch."""
    store = sqlite_uri(baseline["dir"].parent / "mlflow.db")
    client, run = only_run(store)
    assert run.info.status == "FINISHED"
    assert run.data.tags["so8t.world_size"] == "2"
    loss = baseline["loss"]
    assert [s for s, _ in loss] == list(range(1, STEPS + 1))
    ckpts = sorted((baseline["dir"] / "checkpoints").iterdir())
    assert ckpts and all((c / "rng-rank1.safetensors").is_file() for c in ckpts)
    # The two ranks drew from RNGs of their own.
    state = final(baseline["dir"])
    assert not torch.equal(state["rng"]["torch_cpu"], state["rng-rank1"]["torch_cpu"])
    # One process, twice the micro-batch: the same global batch, the same update.
    one = tmp_path / "one"
    out = run_train(tmp_path, store, one, *OVERRIDES, "trainer.micro_batch_size=4")
    assert out.returncode == 0, out.stderr[-2000:]
    runs = client.search_runs([run.info.experiment_id])
    single = next(r for r in runs if r.info.run_id != run.info.run_id)
    ref = history(client, single.info.run_id, "train/loss")
    assert [s for s, _ in ref] == [s for s, _ in loss]
    assert [v for _, v in loss] == pytest.approx([v for _, v in ref], rel=1e-4)


def test_killed_ranks_resume_bitwise_equal(tmp_path, baseline):
    store, run_dir = sqlite_uri(tmp_path / "mlflow.db"), tmp_path / "run"
    env = subprocess_env(tmp_path, SO8T_FAULT_STEP_SECONDS="0.15")
    # 1. Rank 1 killed mid-run: rank 0 sees it lost, closes the run, nobody hangs.
    proc = torchrun(tmp_path, store, run_dir, env=env)
    wait_for(lambda: session_info(run_dir).get("current_step", 0) >= 6, proc=proc, what="step 6")
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    assert proc.wait(120) != 0
    _client, run = only_run(store)
    assert run.info.status == "KILLED"
    log = next(tmp_path.glob("torchrun.*.log")).read_text()
    assert "another process of the run is gone" in log
    # 2. Another number of processes is refused, before anything is written.
    out = run_train(tmp_path, store, run_dir, *OVERRIDES)
    assert out.returncode == 2
    assert "written by a run of 2 process(es); this start has 1" in out.stderr
    # 3. Rank 0 killed while it writes a checkpoint: rank 1 ends on its own.
    slow = {**env, "SO8T_FAULT_CHECKPOINT_PAUSE": "3"}
    proc = torchrun(tmp_path, store, run_dir, env=slow)
    staged = run_dir / "checkpoints"
    wait_for(lambda: any(p.name.startswith(".tmp-") for p in staged.iterdir()), proc=proc)
    rank1 = rank_pid(proc, 1)
    os.kill(rank_pid(proc, 0), signal.SIGKILL)
    assert proc.wait(120) != 0
    with pytest.raises(ProcessLookupError):
        os.kill(rank1, 0)
    # 4. The launcher starts it again under torchrun and it runs to its end.
    out = subprocess.run(
        [sys.executable, "-m", "so8t_exp.resume", f"tracking.uri={store}"],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc-per-node=2" in out.stdout + out.stderr
    client, run = only_run(store)
    assert run.info.status == "FINISHED"
    ours, ref = final(run_dir), final(baseline["dir"])
    for group in GROUPS:
        assert ours[group].keys() == ref[group].keys()
        for key, tensor in ref[group].items():
            assert torch.equal(ours[group][key], tensor), f"{group}/{key} differs"
    loss = history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, STEPS + 1)), "a step missing or logged twice"
    assert loss == baseline["loss"]
    assert session_info(run_dir)["status"] == "completed"


def test_a_stuck_rank_times_out_and_a_stop_reaches_every_rank(tmp_path, baseline):
    store, run_dir = sqlite_uri(tmp_path / "mlflow.db"), tmp_path / "run"
    env = subprocess_env(tmp_path, SO8T_FAULT_STEP_SECONDS="0.15")
    timeout = "trainer.distributed_timeout_seconds=3"  # (not part of the fingerprint)
    # 1. Rank 1 stops answering (SIGSTOP: torchrun sees nothing wrong): rank 0 gives up
    # after the timeout with a clear message instead of waiting forever.
    proc = torchrun(tmp_path, store, run_dir, timeout, env=env)
    wait_for(lambda: session_info(run_dir).get("current_step", 0) >= 4, proc=proc, what="step 4")
    rank0, rank1 = rank_pid(proc, 0), rank_pid(proc, 1)
    os.kill(rank1, signal.SIGSTOP)
    wait_for(lambda: not Path(f"/proc/{rank0}").exists() or _zombie(rank0), timeout=60)
    os.kill(rank1, signal.SIGKILL)  # (what torchrun does to the rest once one has failed)
    assert proc.wait(120) != 0
    log = "".join(p.read_text() for p in tmp_path.glob("torchrun.*.log"))
    assert "gone or stuck" in log, log[-4000:]
    # 2. SIGTERM to torchrun (systemd stop, Ctrl-C): every rank stops at the same step,
    # rank 0 writes an emergency checkpoint with both ranks' RNG states.
    proc = torchrun(tmp_path, store, run_dir, env=env)
    wait_for(lambda: session_info(run_dir).get("current_step", 0) >= 9, proc=proc, what="step 9")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) != 0
    _client, run = only_run(store)
    assert run.info.status == "KILLED"
    emergency = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("emerg")]
    assert len(emergency) == 1 and verify(emergency[0]) is None
    assert (emergency[0] / "rng-rank1.safetensors").is_file()
    # 3. Continued from it: the same run as the uninterrupted one.
    proc = torchrun(tmp_path, store, run_dir)
    assert proc.wait(300) == 0
    ours, ref = final(run_dir), final(baseline["dir"])
    for group in GROUPS:
        for key, tensor in ref[group].items():
            assert torch.equal(ours[group][key], tensor), f"{group}/{key} differs"
    client, run = only_run(store)
    assert history(client, run.info.run_id, "train/loss") == baseline["loss"]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_peer_missing_from_the_gradient_exchange_gets_the_clear_message(tmp_path):
    """DDP's all-reduce runs inside ``backward()``, outside our collectives: when a peer
    never joins it, gloo's own timeout error becomes the same clear PeerLost."""
    port = free_port()
    torch.multiprocessing.spawn(_ddp_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("exchanging gradients: another process of the run is gone or stuck")
    # Our own errors keep their meaning even when they speak of a timeout.
    assert peer_lost(TrackingUnavailable("tracking store unreachable: timed out")) is None
    assert peer_lost(ValueError("gloo")) is None


def _ddp_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2))
    try:
        model = DistributedDataParallel(torch.nn.Linear(2, 1))
        if rank == 1:  # (set up, then never joins the step: a stuck rank)
            time.sleep(6)
            return
        with pytest.raises(RuntimeError) as err:
            model(torch.ones(1, 2)).sum().backward()
        Path(out, "rank0.txt").write_text(str(peer_lost(err.value)))
    finally:
        dist.destroy_process_group()
