"""``Session.save`` and the atomic writes under it, called from several threads at once
(the checkpoint writer thread and the main thread do, in every run)."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from so8t_exp import fsutil
from so8t_exp.session import Session, SessionInfo

THREADS = 8
SAVES = 60


def _hammer(target, n_threads: int = THREADS) -> list[BaseException]:
    """Run ``target(i)`` in ``n_threads`` threads released together; their exceptions."""
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def body(i: int) -> None:
        start.wait()
        try:
            target(i)
        except BaseException as err:  # collected: a thread's exception must fail the test
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_concurrent_saves_lose_no_update(tmp_path: Path) -> None:
    """Each thread sets its own field; the file ends with every thread's last value and
    equals the info in memory (a stale snapshot renamed last would not)."""
    session = Session(tmp_path)
    session.info = SessionInfo(session_id="run")
    fields = ["current_step", "current_epoch", "skipped_steps", "resumes"]

    def saver(i: int) -> None:
        for n in range(SAVES):
            session.save(**{fields[i]: n})

    assert _hammer(saver, len(fields)) == []
    loaded = Session(tmp_path).load()
    assert loaded is not None
    assert [getattr(loaded, f) for f in fields] == [SAVES - 1] * len(fields)
    assert asdict(loaded) == asdict(session.info)
    assert _leftovers(tmp_path) == []


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    """Readers racing the writers always parse a whole file (the rename is atomic)."""
    session = Session(tmp_path)
    session.info = SessionInfo(session_id="run", overrides=["x" * 2000])  # a larger file
    session.save()
    done = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not done.is_set():
            text = session.path.read_text(encoding="utf-8")
            try:
                json.loads(text)
            except ValueError:
                bad.append(text)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        errors = _hammer(lambda i: [session.save(current_step=n) for n in range(SAVES)])
    finally:
        done.set()
        for t in readers:
            t.join()
    assert errors == [] and bad == []


def test_temp_names_are_unique_per_write(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    names: set[Path] = set()
    lock = threading.Lock()

    def grab(i: int) -> None:
        mine = [fsutil.temp_sibling(target) for _ in range(200)]
        with lock:
            names.update(mine)

    assert _hammer(grab) == []
    assert len(names) == THREADS * 200


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        fsutil.atomic_write_json(tmp_path / "f.json", {"x": object()})  # not serialisable
    with pytest.raises(IsADirectoryError if os.name != "nt" else OSError):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "keep").write_text("x")
        fsutil.atomic_write_bytes(tmp_path / "d", b"{}")  # cannot replace a folder
    assert _leftovers(tmp_path) == []


def test_replace_retries_a_transient_permission_error(tmp_path: Path, monkeypatch) -> None:
    """What Windows does while a reader has the target open: PermissionError, then success.
    (Simulated: POSIX never refuses a rename for an open file.)"""
    real, calls = os.replace, []

    def busy_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(13, "The process cannot access the file", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", busy_twice)
    fsutil.atomic_write_json(tmp_path / "f.json", {"ok": True})
    assert len(calls) == 3
    assert json.loads((tmp_path / "f.json").read_text()) == {"ok": True}


def test_replace_gives_up_on_a_lasting_permission_error(tmp_path: Path, monkeypatch) -> None:
    def always_busy(src, dst):
        raise PermissionError(13, "denied", str(dst))

    monkeypatch.setattr(os, "replace", always_busy)
    with pytest.raises(PermissionError):
        fsutil.atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "nt", reason="Windows only: a reader's open handle")
def test_replace_while_a_reader_holds_the_file_open(tmp_path: Path) -> None:
    """On Windows, a reader holding the file open for a moment must not fail the save."""
    target = tmp_path / "f.json"
    fsutil.atomic_write_json(target, {"n": 0})
    fh = open(target, "rb")  # noqa: SIM115 (closed by the timer below)
    threading.Timer(0.2, fh.close).start()
    fsutil.atomic_write_json(target, {"n": 1})
    assert json.loads(target.read_text()) == {"n": 1}
