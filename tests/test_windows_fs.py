"""File operations Windows refuses for a moment, and folder replacement that a crash at any
point leaves with one complete copy.

The refusals are simulated: POSIX never refuses a rename or delete because another process
has a file open, so ``os.replace`` / ``shutil.rmtree`` / ``Path.unlink`` are patched to raise
what Windows raises (``OSError`` with ``winerror`` 5, 32 or 33) a few times first. The
crash-point tests are real: real checkpoint folders, the crash is an exception injected
right after (or in the middle of) each step of the replacement, and the real start-up
recognition (``Checkpointer``) then finds and loads one complete copy.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from so8t_exp import fsutil
from so8t_exp.checkpoint import format as fmt
from so8t_exp.checkpoint.manager import Checkpointer
from so8t_exp.config import CheckpointConfig

NAME = "rolling-step00000006"


def winerror(code: int) -> OSError:
    """What Windows raises for a file another process holds (errno left neutral, so that
    only ``winerror`` can make it transient)."""
    err = OSError(errno.EINVAL, "The process cannot access the file")
    err.winerror = code
    return err


def flaky(real, failures: int, exc=lambda: winerror(32)):
    """``real`` that first fails ``failures`` times with ``exc()``; ``calls`` counts tries."""

    def op(*args, **kwargs):
        op.calls += 1
        if op.calls <= failures:
            raise exc()
        return real(*args, **kwargs)

    op.calls = 0
    return op


# -- retries --------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [5, 32, 33])
def test_replace_retries_windows_sharing_errors(tmp_path: Path, monkeypatch, code: int):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_text("new")
    dst.write_text("old")
    op = flaky(os.replace, 3, lambda: winerror(code))
    monkeypatch.setattr(os, "replace", op)
    fsutil.replace(src, dst)
    assert op.calls == 4 and dst.read_text() == "new"


@pytest.mark.parametrize(
    "exc",
    [
        lambda: OSError(errno.ENOSPC, "No space left on device"),
        lambda: FileNotFoundError(errno.ENOENT, "gone"),
        lambda: winerror(112),  # ERROR_DISK_FULL
    ],
)
def test_other_errors_are_not_retried(tmp_path: Path, monkeypatch, exc):
    op = flaky(os.replace, 99, exc)
    monkeypatch.setattr(os, "replace", op)
    with pytest.raises(OSError):
        fsutil.replace(tmp_path / "a", tmp_path / "b")
    assert op.calls == 1


def test_a_lasting_sharing_violation_gives_up_after_the_bound(tmp_path: Path, monkeypatch):
    op = flaky(os.replace, 10**6)
    monkeypatch.setattr(os, "replace", op)
    with pytest.raises(OSError) as info:
        fsutil.replace(tmp_path / "a", tmp_path / "b", retry_seconds=0.2)
    assert info.value.winerror == 32 and 2 < op.calls < 20  # backoff, not a busy loop


def test_rmtree_retries_and_goes_on_from_what_is_left(tmp_path: Path, monkeypatch):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f").write_text("x")
    op = flaky(shutil.rmtree, 2)
    monkeypatch.setattr(shutil, "rmtree", op)
    assert fsutil.rmtree(folder) and not folder.exists() and op.calls == 3


def test_rmtree_retries_a_folder_still_holding_a_delete_pending_file(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    op = flaky(shutil.rmtree, 2, lambda: winerror(145))  # ERROR_DIR_NOT_EMPTY
    monkeypatch.setattr(shutil, "rmtree", op)
    assert fsutil.rmtree(folder) and op.calls == 3
    op = flaky(os.replace, 5, lambda: winerror(145))  # (only a delete waits for that)
    monkeypatch.setattr(os, "replace", op)
    with pytest.raises(OSError):
        fsutil.replace(tmp_path / "a", tmp_path / "b")
    assert op.calls == 1


def test_rmtree_ignore_errors_logs_after_the_retries(tmp_path: Path, monkeypatch, caplog):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    monkeypatch.setattr(fsutil, "RETRY_SECONDS", 0.05)
    monkeypatch.setattr(shutil, "rmtree", flaky(shutil.rmtree, 10**6))
    with caplog.at_level(logging.WARNING):
        assert fsutil.rmtree(folder, ignore_errors=True) is False
    assert "could not delete" in caplog.text and folder.exists()
    assert fsutil.rmtree(tmp_path / "missing") is True  # nothing there: nothing to do


def test_unlink_retries(tmp_path: Path, monkeypatch):
    path = tmp_path / "f"
    path.write_text("x")
    op = flaky(Path.unlink, 2, lambda: PermissionError(errno.EACCES, "denied"))
    monkeypatch.setattr(Path, "unlink", op)
    fsutil.unlink(path)
    assert op.calls == 3 and not path.exists()


def test_a_checkpoint_write_survives_a_scanner_holding_its_folder(tmp_path, monkeypatch):
    """The staged folder's rename into place is refused twice (an antivirus scanning it)."""
    real, refused = os.replace, []

    def scanner(src, dst):
        if Path(dst).name == NAME and len(refused) < 2:
            refused.append(dst)
            raise winerror(32)
        real(src, dst)

    monkeypatch.setattr(os, "replace", scanner)
    folder = fmt.write(tmp_path, NAME, _payload("new"))
    assert len(refused) == 2 and fmt.verify(folder) is None


def test_a_refused_rename_in_puts_the_old_copy_back(tmp_path: Path, monkeypatch):
    fmt.write(tmp_path, NAME, _payload("old"))
    real = os.replace

    def refuse_rename_in(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise winerror(32)
        real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_rename_in)
    monkeypatch.setattr(fsutil, "RETRY_SECONDS", 0.05)
    with pytest.raises(OSError):
        fmt.write(tmp_path, NAME, _payload("new"))
    monkeypatch.undo()
    assert _version(tmp_path / NAME) == "old"
    assert not [p for p in tmp_path.iterdir() if fsutil.ASIDE_MARK in p.name]


# -- crash points of a folder replacement ---------------------------------------------------
class Crash(BaseException):
    """Stands for the process dying here (BaseException: nothing on the way catches it)."""


def _payload(version: str) -> fmt.Payload:
    fill = {"old": 1.0, "new": 2.0}[version]
    return fmt.Payload(
        tensors={"weights": {"w": torch.full((64,), fill)}},
        docs={"state": {"version": version, "progress": {"step": 6}}},
    )


def _version(folder: Path) -> str:
    return fmt.read(folder).docs["state"]["version"]


def _crash_after_replace(monkeypatch, when) -> None:
    real = fsutil.replace

    def replace(src: Path, dst: Path, *args) -> None:
        real(src, dst, *args)
        if when(Path(src), Path(dst)):
            raise Crash

    monkeypatch.setattr(fsutil, "replace", replace)


def _crash_in_delete_old(monkeypatch, partial: bool) -> None:
    real = fsutil.rmtree

    def rmtree(path: Path, ignore_errors: bool = False) -> bool:
        if fsutil.ASIDE_MARK not in path.name:
            return real(path, ignore_errors)
        if partial:  # killed half way: some files gone, the manifest among them
            (path / fmt.MANIFEST).unlink()
            (path / "weights.safetensors").unlink()
        else:
            real(path, ignore_errors)
        raise Crash

    monkeypatch.setattr(fsutil, "rmtree", rmtree)


def _crash_before_manifest(monkeypatch) -> None:
    def atomic_write_json(*_args) -> None:
        raise Crash

    monkeypatch.setattr(fmt, "atomic_write_json", atomic_write_json)


STAGED, ASIDE = f".tmp-{NAME}", f"{NAME}.old"  # (pid and tag left out)
CRASH_POINTS = {
    # name: (inject the crash, what it leaves besides rolling-step4, what a start loads)
    "while staging, before the manifest": (_crash_before_manifest, {NAME, STAGED}, "old"),
    "after (1) the old copy is renamed aside": (
        lambda mp: _crash_after_replace(mp, lambda s, d: fsutil.ASIDE_MARK in d.name),
        {ASIDE, STAGED},
        "new",  # the staged write is complete: it is the newer one
    ),
    "after (2) the new copy is renamed in": (
        lambda mp: _crash_after_replace(mp, lambda s, d: d.name == NAME),
        {NAME, ASIDE},
        "new",
    ),
    "in the middle of (3) deleting the old copy": (
        lambda mp: _crash_in_delete_old(mp, partial=True),
        {NAME, ASIDE},
        "new",
    ),
    "after (3) the old copy is deleted": (
        lambda mp: _crash_in_delete_old(mp, partial=False),
        {NAME},
        "new",
    ),
}


def _left(root: Path) -> set[str]:
    names = {p.name for p in root.iterdir()} - {"rolling-step00000004"}
    return {n.split(fsutil.ASIDE_MARK)[0] + ".old" if fsutil.ASIDE_MARK in n else n for n in names}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
@pytest.mark.parametrize("old_state", ["complete", "corrupt"])
def test_a_crash_at_any_point_of_a_replacement_leaves_one_complete_copy(
    tmp_path: Path, monkeypatch, caplog, point: str, old_state: str
):
    """Replace ``rolling-step6`` (complete, or corrupt: a run resumed past it and reached
    its step again) and crash at ``point``; the next start must load one complete copy."""
    root = tmp_path / "checkpoints"
    fmt.write(root, "rolling-step00000004", _payload("old"))
    fmt.write(root, NAME, _payload("old"))
    if old_state == "corrupt":
        (root / NAME / "weights.safetensors").write_bytes(b"torn")
    inject, left, expected = CRASH_POINTS[point]
    with monkeypatch.context() as mp:
        inject(mp)
        with pytest.raises(Crash):
            fmt.write(root, NAME, _payload("new"))
    assert {n.replace(f"-{os.getpid()}", "") for n in _left(root)} == left
    # The next start: the real recognition, under the real names.
    with caplog.at_level(logging.INFO):
        ckpt = Checkpointer(root, CheckpointConfig(), None, lambda *a: None, lambda *a: None)
        folder, payload = ckpt.newest()
    ckpt.close()
    if expected == "old" and old_state == "corrupt":  # (nothing complete of step 6 exists)
        assert folder.name == "rolling-step00000004"
    else:
        assert folder.name == NAME
        assert payload.docs["state"]["version"] == expected
        assert torch.equal(
            payload.tensors["weights"]["w"], _payload(expected).tensors["weights"]["w"]
        )
    names = sorted(p.name for p in root.iterdir())
    assert names == ["rolling-step00000004", NAME], names  # no staged or aside folder left
    leftovers = [r for r in caplog.records if "left by an interrupted" in r.getMessage()]
    assert leftovers or point.startswith("after (3)")  # each cleanup says so


def test_an_aside_copy_alone_is_restored(tmp_path: Path, monkeypatch, caplog):
    """Crash after (1), and the staged copy lost too (a failed write cleans its staging
    folder): the complete aside copy is put back under its own name."""
    root = tmp_path / "checkpoints"
    fmt.write(root, NAME, _payload("old"))
    with monkeypatch.context() as mp:
        _crash_after_replace(mp, lambda s, d: fsutil.ASIDE_MARK in d.name)
        with pytest.raises(Crash):
            fmt.write(root, NAME, _payload("new"))
    shutil.rmtree(fmt.staging_folder(root, NAME))
    assert not (root / NAME).exists()
    with caplog.at_level(logging.WARNING):
        ckpt = Checkpointer(root, CheckpointConfig(), None, lambda *a: None, lambda *a: None)
    folder, payload = ckpt.newest()
    ckpt.close()
    assert folder == root / NAME and payload.docs["state"]["version"] == "old"
    assert f"checkpoint {NAME} (missing) restored from {NAME}.old-" in caplog.text
    assert [p.name for p in root.iterdir()] == [NAME]


def test_a_complete_staged_write_is_kept_when_the_kill_came_before_its_rename(tmp_path):
    root = tmp_path / "checkpoints"
    fmt.write(root, "rolling-step00000004", _payload("old"))
    staged = fmt.write(tmp_path / "elsewhere", NAME, _payload("new"))
    os.replace(staged, fmt.staging_folder(root, NAME))  # all written, manifest last, no rename
    fmt.recover_leftovers(root)
    assert _version(root / NAME) == "new" and fmt.newest_valid(root) == root / NAME


def test_save_estimate_is_the_last_measured_save(tmp_path: Path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(), None, lambda *a: None, lambda *a: None)
    assert ckpt.save_estimate() is None
    ckpt.last_capture_seconds = 0.25
    ckpt.save("rolling", 1, _payload("old"), wait=True)
    ckpt.close()
    assert ckpt.last_write_seconds is not None and ckpt.last_write_seconds > 0
    assert ckpt.save_estimate() == pytest.approx(0.25 + ckpt.last_write_seconds)
    assert ckpt.newest_step() == 1


def test_an_interrupted_export_replacement_is_recovered(tmp_path):
    """``fsutil.recover_aside`` (called before each export): a crash after (1) of
    ``replace_dir`` left only the aside copy; one after (2) left an aside beside the new."""
    final = tmp_path / "final_model"
    aside = tmp_path / f"final_model{fsutil.ASIDE_MARK}123-1"
    aside.mkdir()
    (aside / "model.safetensors").write_text("old")
    fsutil.recover_aside(final)
    assert (final / "model.safetensors").read_text() == "old" and not aside.exists()
    aside.mkdir()
    fsutil.recover_aside(final)
    assert final.exists() and not aside.exists()
