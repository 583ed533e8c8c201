"""Checkpoint format, verification, fallback, state round trip and retention."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from so8t_exp.checkpoint import RNGState, capture, mirror, restore
from so8t_exp.checkpoint import format as fmt
from so8t_exp.checkpoint.manager import Checkpointer
from so8t_exp.config import CheckpointConfig


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, opt, sched, scaler


def _step(model, opt, sched):
    x = torch.randn(4, 6)
    loss = model(torch.nn.functional.dropout(x, 0.3)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _payload(step: int = 3) -> fmt.Payload:
    model, opt, sched, scaler = _setup()
    for _ in range(step):
        _step(model, opt, sched)
    return capture(
        params=dict(model.named_parameters()),
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        rng=RNGState.now(),
        state={"progress": {"step": step}},
    )


def test_write_verify_read_round_trip(tmp_path: Path):
    payload = _payload()
    folder = fmt.write(tmp_path, fmt.checkpoint_name("rolling", 3), payload)
    assert folder.name == "rolling-step00000003"
    assert fmt.verify(folder) is None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "weights.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
        "optimizer.json",
        "rng.json",
        "scheduler.json",
        "scaler.json",
    }
    back = fmt.read(folder)
    for group, tensors in payload.tensors.items():
        assert tensors.keys() == back.tensors[group].keys()
        assert all(torch.equal(t, back.tensors[group][k]) for k, t in tensors.items())
    assert back.docs["state"] == {"progress": {"step": 3}}
    assert not list(tmp_path.glob(".tmp-*"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": lambda f: (f / "weights.safetensors").write_bytes(
        (f / "weights.safetensors").read_bytes()[:50]
    ),
    "bit_flip": lambda f: _flip_byte(f / "optimizer.safetensors"),
    "no_manifest": lambda f: (f / "manifest.json").unlink(),
    "garbage_manifest": lambda f: (f / "manifest.json").write_text("{not json"),
    "tensor_file_deleted": lambda f: (f / "rng.safetensors").unlink(),
    "state_deleted": lambda f: (f / "state.json").unlink(),
    "empty_folder": lambda f: [p.unlink() for p in f.iterdir()],
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_falls_back_to_previous(tmp_path: Path, corruption, caplog):
    fmt.write(tmp_path, "rolling-step00000002", _payload(2))
    newest = fmt.write(tmp_path, "rolling-step00000004", _payload(4))
    CORRUPTIONS[corruption](newest)
    assert fmt.verify(newest) is not None
    chosen = fmt.newest_valid(tmp_path)
    assert chosen == tmp_path / "rolling-step00000002"
    assert "rolling-step00000004" in caplog.text


def test_newest_is_by_step_not_modification_time(tmp_path: Path):
    late = fmt.write(tmp_path, "rolling-step00000009", _payload(1))
    early = fmt.write(tmp_path, "emergency-step00000002", _payload(1))
    old = time.time() - 3600
    os.utime(late, (old, old))
    assert fmt.newest_valid(tmp_path) == late
    assert [p for _s, _k, p in fmt.candidates(tmp_path)] == [late, early]
    fmt.write(tmp_path, "final-step00000009", _payload(1))
    assert fmt.newest_valid(tmp_path).name == "final-step00000009"


def test_leftover_temporary_folders_are_ignored_and_removed(tmp_path: Path):
    fmt.write(tmp_path, "rolling-step00000001", _payload(1))
    (tmp_path / ".tmp-rolling-step00000002-123").mkdir()
    (tmp_path / "rolling-step0002").mkdir()  # not our name pattern
    assert fmt.newest_valid(tmp_path).name == "rolling-step00000001"
    fmt.recover_leftovers(tmp_path)
    assert not (tmp_path / ".tmp-rolling-step00000002-123").exists()


def test_capture_restore_continues_bitwise(tmp_path: Path):
    """Save after 3 steps, do 3 more; restore into fresh objects, redo: identical."""
    random.seed(1)
    np.random.seed(1)
    model, opt, sched, scaler = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    payload = capture(
        params=dict(model.named_parameters()),
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        rng=RNGState.now(),
        state={"progress": {"step": 3}},
    )
    fmt.write(tmp_path, "rolling-step00000003", payload)
    expected_py, expected_np = random.random(), np.random.rand()
    for _ in range(3):
        _step(model, opt, sched)
    model2, opt2, sched2, scaler2 = _setup(seed=123)  # different init: must be overwritten
    params2 = dict(model2.named_parameters())
    state = restore(
        fmt.read(tmp_path / "rolling-step00000003"),
        params=params2,
        required=set(params2),
        optimizer=opt2,
        scheduler=sched2,
        scaler=scaler2,
    )
    assert state == {"progress": {"step": 3}}
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)
    for _ in range(3):
        _step(model2, opt2, sched2)
    for (n, a), b in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert sched.get_last_lr() == sched2.get_last_lr()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)


def test_restore_refuses_mismatched_weights(tmp_path: Path):
    payload = _payload()
    model, opt, sched, scaler = _setup()
    params = {f"other.{n}": p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="do not match"):
        restore(
            payload,
            params=params,
            required=set(params),
            optimizer=opt,
            scheduler=sched,
            scaler=scaler,
        )


def test_checkpointer_keeps_newest_rolling_and_never_overlaps(tmp_path: Path):
    saved, failed = [], []
    ckpt = Checkpointer(
        tmp_path,
        CheckpointConfig(keep=2, every_n_steps=1),
        None,
        lambda name, step, kind: saved.append(name),
        lambda name, err: failed.append(name),
    )
    payload = _payload(1)
    for step in range(1, 6):
        assert ckpt.rolling_due(step, 0.0)
        ckpt.save("rolling", step, payload)
    ckpt.save("final", 5, payload, wait=True)
    assert not failed
    assert saved == [f"rolling-step{s:08d}" for s in range(1, 6)] + ["final-step00000005"]
    assert ckpt.local_names() == [
        "final-step00000005",
        "rolling-step00000005",
        "rolling-step00000004",
    ]
    assert not ckpt.rolling_due(5, 0.0)  # already saved at this step


def test_best_checkpoints_are_exempt_from_rolling_retention(tmp_path: Path):
    ckpt = Checkpointer(
        tmp_path, CheckpointConfig(keep=2, every_n_steps=1), None, lambda *a: None, print
    )
    payload = _payload(1)
    for step in range(1, 7):
        ckpt.save("rolling", step, payload, wait=True)
        if step in (2, 3):
            ckpt.save("best", step, payload, wait=True)
    ckpt.drain()
    # only the newest best is kept; rolling ones by step, never counting the best
    assert sorted(ckpt.local_names()) == [
        "best-step00000003",
        "rolling-step00000005",
        "rolling-step00000006",
    ]
    assert fmt.newest_valid(tmp_path).name == "rolling-step00000006"


def test_superseded_names_rolling_past_keep_and_older_bests():
    names = [
        "best-step00000004",
        "best-step00000008",
        "final-step00000020",
        "emergency-step00000011",
    ]
    names += [f"rolling-step{s:08d}" for s in (2, 6, 10, 14)]
    assert sorted(mirror.superseded(names, 2)) == [
        "best-step00000004",
        "rolling-step00000002",
        "rolling-step00000006",
    ]


def test_rolling_due_by_training_time(tmp_path: Path):
    ckpt = Checkpointer(
        tmp_path, CheckpointConfig(interval_seconds=10), None, lambda *a: None, lambda *a: None
    )
    ckpt.last_save_seconds = 95.0  # restored from a checkpoint: the clock does not restart
    assert not ckpt.rolling_due(7, 100.0)
    assert ckpt.rolling_due(7, 105.0)


def test_failed_write_is_reported_and_leaves_no_partial_folder(tmp_path: Path):
    failed = []
    ckpt = Checkpointer(
        tmp_path,
        CheckpointConfig(),
        None,
        lambda *a: None,
        lambda name, err: failed.append((name, str(err))),
    )
    bad = fmt.Payload(tensors={"weights": {"x": torch.zeros(2)}}, docs={"state": {"bad": {1, 2}}})
    ckpt.save("rolling", 1, bad, wait=True)
    assert failed and failed[0][0] == "rolling-step00000001"
    assert list(tmp_path.iterdir()) == []


def test_read_does_not_memory_map_checkpoint_files(tmp_path: Path):
    """Windows cannot delete or replace a mapped file: loaded tensors must be plain copies."""
    folder = fmt.write(tmp_path, "rolling-step00000001", _payload(1))
    payload = fmt.read(folder)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(folder) not in maps.read_text()
    assert payload.tensors["weights"]


def test_checkpoints_of_an_unknown_run_are_set_aside(tmp_path: Path):
    root = tmp_path / "checkpoints"
    fmt.write(root, "rolling-step00000009", _payload(1))
    ckpt = Checkpointer(root, CheckpointConfig(), None, lambda *a: None, lambda *a: None)
    ckpt.set_aside_foreign()
    assert ckpt.local_names() == []
    aside = list(tmp_path.glob("checkpoints.orphaned-*"))
    assert len(aside) == 1 and (aside[0] / "rolling-step00000009").is_dir()


class RefusingStore:
    """An artifact store (a real folder) that refuses the first ``refusals`` uploads, as a
    tracking server that is down, or a trainer whose lease is not confirmed yet."""

    def __init__(self, root: Path, refusals: int) -> None:
        self.root, self.refusals, self.tries = root, refusals, 0
        root.mkdir(parents=True, exist_ok=True)

    def upload_checkpoint(self, folder: Path) -> bool:
        self.tries += 1
        if self.refusals > 0:
            self.refusals -= 1
            return False
        shutil.copytree(folder, self.root / folder.name)
        return True

    def delete_checkpoint(self, name: str) -> bool:
        shutil.rmtree(self.root / name, ignore_errors=True)
        return True

    def list_checkpoints(self) -> list[str]:
        return [p.name for p in self.root.iterdir()]

    def download_checkpoint(self, name: str, dest: Path) -> bool:
        shutil.copytree(self.root / name, dest)
        return True


def test_a_refused_copy_is_retried_until_the_store_takes_it(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(mirror, "RETRY_SECONDS", 0.05)
    store = RefusingStore(tmp_path / "store", refusals=3)
    mirrored: list[str] = []
    ckpt = Checkpointer(
        tmp_path / "checkpoints",
        CheckpointConfig(),
        store,
        lambda *a: None,
        lambda *a: None,
        lambda name, step: mirrored.append(name),
    )
    ckpt.save("final", 7, _payload(1), wait=True)
    assert ckpt.drain_mirror(10.0)
    assert store.tries == 4 and mirrored == ["final-step00000007"]
    assert fmt.verify(store.root / "final-step00000007") is None
    ckpt.close()
