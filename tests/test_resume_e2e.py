"""Crash-proof continuation, end to end: real processes, real signals, a real sqlite store.

Every interrupted run is continued on the same ``hydra.run.dir`` until it finishes and must
then equal an uninterrupted run bit for bit: final weights, optimizer state, and the
``train/loss`` history with every step logged exactly once.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from so8t_exp.checkpoint import newest_valid, verify
from so8t_exp.config import EVAL_METRICS, PER_CLASS_RECALL
from so8t_exp.paths import sqlite_uri
from tests.conftest import (
    history,
    only_run,
    run_train,
    session_info,
    start_train,
    stop_at_step,
    subprocess_env,
    sweep_cmd,
    wait_for,
)

pytestmark = pytest.mark.slow

STEPS = 48
OVERRIDES = (
    "+experiment=smoke",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every_n_steps=12",
    "checkpoint.every_n_steps=4",
    "checkpoint.keep=3",
    # The highest eval loss is the first evaluation's (step 12): a best checkpoint that
    # rolling retention would long have deleted.
    "checkpoint.best_mode=max",
)
EVAL_KEYS = EVAL_METRICS + PER_CLASS_RECALL


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("baseline")
    store = sqlite_uri(tmp / "mlflow.db")
    out = run_train(tmp, store, tmp / "run", *OVERRIDES)
    assert out.returncode == 0, out.stderr[-3000:]
    client, run = only_run(store)
    return {
        "dir": tmp / "run",
        "store": store,
        "client": client,
        "run": run,
        "loss": history(client, run.info.run_id, "train/loss"),
        "eval": {k: history(client, run.info.run_id, k) for k in EVAL_KEYS},
    }


def final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = run_dir / "checkpoints" / f"final-step{STEPS:08d}"
    assert verify(folder) is None
    return {name: load_file(folder / f"{name}.safetensors") for name in ("weights", "optimizer")}


def assert_same_as_baseline(run_dir: Path, store: str, baseline: dict) -> None:
    client, run = only_run(store)
    assert run.info.status == "FINISHED"
    ours, ref = final_state(run_dir), final_state(baseline["dir"])
    for group in ref:
        assert ours[group].keys() == ref[group].keys()
        for key, tensor in ref[group].items():
            assert torch.equal(ours[group][key], tensor), f"{group}/{key} differs"
    exported = load_file(run_dir / "final_model" / "adapter_model.safetensors")
    for key, tensor in load_file(
        baseline["dir"] / "final_model" / "adapter_model.safetensors"
    ).items():
        assert torch.equal(exported[key], tensor), key
    loss = history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, STEPS + 1)), "a step missing or logged twice"
    assert loss == baseline["loss"]
    for key, ref in baseline["eval"].items():  # evaluation after a restore sees the same model
        assert [s for s, _ in ref] == [12, 24, 36, 48], key
        assert history(client, run.info.run_id, key) == ref, key
    info = session_info(run_dir)
    assert info["status"] == "completed"
    ref_info = session_info(baseline["dir"])
    assert (info["best_loss"], info["best_checkpoint"]) == (
        ref_info["best_loss"],
        ref_info["best_checkpoint"],
    )


def finish(tmp_path: Path, store: str, run_dir: Path) -> str:
    out = run_train(tmp_path, store, run_dir, *OVERRIDES)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_retention_keeps_exactly_keep_rolling_and_the_best_locally_and_in_mlflow(baseline):
    local = sorted(p.name for p in (baseline["dir"] / "checkpoints").iterdir())
    rolling = [n for n in local if n.startswith("rolling-")]
    assert rolling == [f"rolling-step{s:08d}" for s in (40, 44, 48)]
    assert "final-step00000048" in local
    # the best evaluation (highest eval/loss here) is step 12: exempt from retention
    assert local == ["best-step00000012", "final-step00000048", *rolling]
    assert verify(baseline["dir"] / "checkpoints" / "best-step00000012") is None
    arts = baseline["client"].list_artifacts(baseline["run"].info.run_id, "checkpoints")
    remote = sorted(a.path.rsplit("/", 1)[-1] for a in arts)
    # (The copy may skip a rolling checkpoint superseded while an upload was slow.)
    assert len([n for n in remote if n.startswith("rolling-")]) == 3
    assert {"final-step00000048", "best-step00000012"} <= set(remote) and len(remote) == 5
    assert baseline["run"].data.tags["so8t.checkpoint.latest"] == "final-step00000048"
    info = session_info(baseline["dir"])
    evals = dict(baseline["eval"]["eval/loss"])
    assert info["best_checkpoint"] == "best-step00000012" and info["best_metric"] == "eval/loss"
    assert info["best_loss"] == pytest.approx(evals[12]) and evals[12] == max(evals.values())


def test_sigkill_at_several_points_then_restart_equals_uninterrupted(tmp_path, store, baseline):
    run_dir = tmp_path / "run"
    rng = random.Random(7)
    for target in (5, 18, 33):
        proc = start_train(tmp_path, store, run_dir, *OVERRIDES)
        wait_for(
            lambda t=target: session_info(run_dir).get("current_step", 0) >= t,
            what=f"step {target}",
            proc=proc,
        )
        time.sleep(rng.uniform(0, 0.2))  # not always right after a checkpoint
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    _client, run = only_run(store)
    assert run.info.status == "RUNNING"  # MLflow cannot know the process died
    finish(tmp_path, store, run_dir)
    assert_same_as_baseline(run_dir, store, baseline)
    assert session_info(run_dir)["resumes"] == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_gives_emergency_checkpoint_and_killed(tmp_path, store, baseline, sig):
    run_dir = tmp_path / "run"
    proc = stop_at_step(tmp_path, store, run_dir, OVERRIDES, 6, sig)
    assert proc.returncode == 128 + sig
    client, run = only_run(store)
    assert run.info.status == "KILLED"
    info = session_info(run_dir)
    assert info["status"] == "interrupted"
    emergency = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("emergency")]
    newest = newest_valid(run_dir / "checkpoints")
    # The newest checkpoint holds the last completed step: an emergency one, unless the
    # signal came in the very step that had just been saved as a rolling one.
    assert len(emergency) <= 1 and (not emergency or newest == emergency[0])
    assert info["checkpoints"][0] == newest.name
    step = int(newest.name.rsplit("step", 1)[1])
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(
        range(1, step + 1)
    )
    finish(tmp_path, store, run_dir)
    assert_same_as_baseline(run_dir, store, baseline)


def test_exception_gives_failed_and_emergency_checkpoint(tmp_path, store, baseline):
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path, SO8T_FAULT_FAIL_AT_STEP="10")
    out = run_train(tmp_path, store, run_dir, *OVERRIDES, env=env)
    assert out.returncode == 1
    assert "fault injection" in out.stderr + out.stdout
    _client, run = only_run(store)
    assert run.info.status == "FAILED"
    assert session_info(run_dir)["status"] == "failed"
    assert verify(run_dir / "checkpoints" / "emergency-step00000009") is None
    finish(tmp_path, store, run_dir)
    assert_same_as_baseline(run_dir, store, baseline)


def test_corrupt_newest_checkpoints_fall_back_to_previous_valid(tmp_path, store, baseline):
    run_dir = tmp_path / "run"
    proc = stop_at_step(tmp_path, store, run_dir, OVERRIDES, 13, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    ckpts = sorted((run_dir / "checkpoints").iterdir(), key=lambda p: int(p.name[-8:]))
    # newest: the emergency one (or a rolling one, if the signal came in a step just saved)
    assert len(ckpts) >= 3
    weights = ckpts[-1] / "weights.safetensors"  # bit flip in the newest
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    (ckpts[-2] / "manifest.json").unlink()  # the one before it loses its manifest
    log = finish(tmp_path, store, run_dir)
    assert f"skipping checkpoint {ckpts[-1]}" in log and f"skipping checkpoint {ckpts[-2]}" in log
    # The manifest-less one may come back whole from its MLflow copy (a hard link of each
    # file; the manifest was deleted only here), if the mirror had uploaded it.
    from_mlflow = f"restored checkpoint {ckpts[-2].name} from MLflow artifacts" in log
    fallback = ckpts[-2] if from_mlflow else ckpts[-3]
    assert f"continuing from step {int(fallback.name[-8:])}" in log
    assert_same_as_baseline(run_dir, store, baseline)


def test_kill_during_checkpoint_write_leaves_earlier_ones_valid(tmp_path, store, baseline):
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path, SO8T_FAULT_CHECKPOINT_PAUSE="0.5")
    proc = start_train(tmp_path, store, run_dir, *OVERRIDES, env=env)
    ckpt_dir = run_dir / "checkpoints"
    wait_for(
        lambda: (ckpt_dir / "rolling-step00000004").exists() and any(ckpt_dir.glob(".tmp-*")),
        proc=proc,
        what="a write after the first checkpoint",
    )
    writing = next(ckpt_dir.glob(".tmp-*")).name.split("-")[2]  # e.g. "step00000012"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert verify(ckpt_dir / "rolling-step00000004") is None
    assert not (ckpt_dir / f"rolling-{writing}").exists()
    finish(tmp_path, store, run_dir)
    assert not list(ckpt_dir.glob(".tmp-*"))
    assert_same_as_baseline(run_dir, store, baseline)


def test_deleted_session_folder_resumes_from_mlflow_artifacts(tmp_path, store, baseline):
    run_dir = tmp_path / "run"
    stop_at_step(tmp_path, store, run_dir, OVERRIDES, 12, signal.SIGKILL)
    shutil.rmtree(run_dir)
    log = finish(tmp_path, store, run_dir)
    assert "from MLflow artifacts" in log
    assert_same_as_baseline(run_dir, store, baseline)


def test_changed_config_is_refused_with_the_differing_keys(tmp_path, store):
    run_dir = tmp_path / "run"
    stop_at_step(tmp_path, store, run_dir, OVERRIDES, 4, signal.SIGKILL)
    out = run_train(tmp_path, store, run_dir, *OVERRIDES, "trainer.optimizer.lr=0.5", "seed=3")
    assert out.returncode == 2
    assert "trainer.optimizer.lr" in out.stderr and "seed" in out.stderr
    assert "checkpoint.allow_config_change=true" in out.stderr
    _client, run = only_run(store)
    assert run.info.status == "RUNNING"  # untouched: refused before re-attaching
    out = run_train(
        tmp_path,
        store,
        run_dir,
        *OVERRIDES,
        "trainer.optimizer.lr=0.5",
        "checkpoint.allow_config_change=true",
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_second_signal_during_emergency_save_writes_it_once(tmp_path, store):
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path, SO8T_FAULT_CHECKPOINT_PAUSE="1.5")
    overrides = ("+experiment=smoke", "trainer.max_steps=100000", "checkpoint.best_metric=null")
    # no rolling or best checkpoints: the emergency one is the only save
    proc = start_train(tmp_path, store, run_dir, *overrides, env=env)
    wait_for(lambda: session_info(run_dir).get("status") == "running", proc=proc, what="start")
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    ckpt_dir = run_dir / "checkpoints"
    wait_for(lambda: any(ckpt_dir.glob(".tmp-emergency-*")), proc=proc, what="the emergency write")
    proc.send_signal(signal.SIGTERM)  # impatient: must not restart or abort the write
    assert proc.wait(60) == 128 + signal.SIGTERM
    emergency = [p for p in ckpt_dir.iterdir() if p.name.startswith("emergency")]
    assert len(emergency) == 1 and verify(emergency[0]) is None
    log_text = "".join(p.read_text() for p in tmp_path.glob("run.*.log"))
    assert log_text.count("received SIGTERM while stopping") == 1
    _client, run = only_run(store)
    assert run.info.status == "KILLED"


def test_killed_between_final_checkpoint_and_finish_is_completed_by_a_restart(
    tmp_path, store, baseline
):
    run_dir = tmp_path / "run"
    finish(tmp_path, store, run_dir)
    # As if killed after the final checkpoint but before MLflow heard FINISHED:
    client, run = only_run(store)
    client.update_run(run.info.run_id, status="RUNNING")
    info = session_info(run_dir)
    info["status"] = "running"
    (run_dir / "session_info.json").write_text(json.dumps(info))
    final = run_dir / "checkpoints" / f"final-step{STEPS:08d}"
    before = (final / "manifest.json").read_bytes()
    log = finish(tmp_path, store, run_dir)
    assert f"continuing from step {STEPS}" in log
    assert (final / "manifest.json").read_bytes() == before  # not written again
    assert_same_as_baseline(run_dir, store, baseline)


def test_a_failed_restore_leaves_no_emergency_checkpoint(tmp_path, store):
    run_dir = tmp_path / "run"
    stop_at_step(tmp_path, store, run_dir, OVERRIDES, 4, signal.SIGKILL)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    out = run_train(
        tmp_path,
        store,
        run_dir,
        *OVERRIDES,
        "model.so8t.blocks=2",
        "checkpoint.allow_config_change=true",
    )
    assert out.returncode == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_stop_signal_stops_a_whole_sweep(tmp_path, store):
    sweep = tmp_path / "sweep"
    cmd = sweep_cmd(store, sweep, "trainer.max_steps=100000,100001")
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: session_info(sweep / "0").get("session_id"), proc=proc, what="job 0")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM
    assert not (sweep / "1").exists()  # the next job never started


def test_no_valid_checkpoint_anywhere_starts_over_plainly_in_the_same_run(
    tmp_path, store, baseline
):
    """Every local checkpoint corrupted, and the hard-linked MLflow copies with them."""
    run_dir = tmp_path / "run"
    stop_at_step(tmp_path, store, run_dir, OVERRIDES, 13, signal.SIGKILL)
    for folder in (run_dir / "checkpoints").iterdir():
        weights = folder / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x01
        weights.write_bytes(bytes(data))  # (same inode: the MLflow copy changes too)
    log = finish(tmp_path, store, run_dir)
    assert "no valid checkpoint: starting over from step 0 in the same run" in log
    assert "continuing from step" not in log
    kept = list(run_dir.glob("checkpoints.corrupt-*"))
    assert len(kept) == 1 and any(kept[0].iterdir()), "the corrupt ones are kept aside"
    assert_same_as_baseline(run_dir, store, baseline)  # (deterministic from step 0)


def test_a_completed_session_trains_longer_in_the_same_run(tmp_path, store):
    run_dir = tmp_path / "run"
    smoke = ("+experiment=smoke", "trainer.max_steps=12")
    assert run_train(tmp_path, store, run_dir, *smoke).returncode == 0
    _client, first = only_run(store)
    out = run_train(tmp_path, store, run_dir, "+experiment=smoke", "trainer.max_steps=20")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training longer: 12 -> 20 steps in the same run" in out.stdout + out.stderr
    client, run = only_run(store)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [s for s, _ in history(client, run.info.run_id, "train/loss")] == list(range(1, 21))
    lr = dict(history(client, run.info.run_id, "train/lr"))
    floor = 3.0e-3 * 0.1  # the schedule's end value: min_lr_ratio x lr
    assert all(abs(lr[s] - floor) < 1e-9 for s in range(13, 21)), lr
    assert session_info(run_dir)["status"] == "completed"
    assert newest_valid(run_dir / "checkpoints").name == "final-step00000020"
    assert run.data.tags["so8t.trained_longer"] == "12 -> 20"
    # Anything else changed on a completed session is refused, naming it.
    out = run_train(tmp_path, store, run_dir, "+experiment=smoke", "trainer.max_steps=30", "seed=3")
    assert out.returncode == 2 and "seed" in out.stderr and "train longer" in out.stderr
    same = run_train(tmp_path, store, run_dir, "+experiment=smoke", "trainer.max_steps=20")
    assert same.returncode == 0 and "already completed" in same.stdout + same.stderr
