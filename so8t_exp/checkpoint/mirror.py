"""The MLflow copy of a session's checkpoints: an upload queue, retention, download.

Uploads run in their own thread, after the local write: a slow or unreachable tracking
server delays the copy, never the next local checkpoint. Only the newest pending upload
matters, so a backlog collapses to it (plus the final one).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from so8t_exp import fsutil
from so8t_exp.checkpoint import format as fmt

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0  # between tries to copy a checkpoint the store did not take


class ArtifactStore(Protocol):
    """What the mirror needs from the tracking module."""

    def upload_checkpoint(self, folder: Path) -> bool: ...
    def delete_checkpoint(self, name: str) -> bool: ...
    def list_checkpoints(self) -> list[str]: ...
    def download_checkpoint(self, name: str, dest: Path) -> bool: ...


def superseded(names: list[str], keep: int) -> list[str]:
    """Checkpoint names retention removes: rolling ones past the newest ``keep`` (by step)
    and every best one but the newest (a best one is exempt from rolling retention)."""
    doomed = []
    for kind, n_kept in (("rolling", keep), ("best", 1)):
        steps = sorted(p[1] for n in names if (p := fmt.parse_name(n)) and p[0] == kind)
        doomed += [fmt.checkpoint_name(kind, s) for s in steps[::-1][n_kept:]]
    return doomed


def prune(root: Path, keep: int) -> None:
    """Local retention: delete the checkpoint folders under ``root`` that ``superseded``
    names (the newest ``keep`` rolling ones and the newest best one stay)."""
    names = [p.name for _s, _k, p in fmt.candidates(root)]
    for doomed in superseded(names, keep):
        fsutil.rmtree(root / doomed, ignore_errors=True)


class Mirror:
    def __init__(
        self,
        root: Path,
        store: ArtifactStore | None,
        keep: int,
        on_mirrored: Callable[[str, int], None],
    ) -> None:
        self.root, self.store, self.keep, self.on_mirrored = root, store, keep, on_mirrored
        self._pending: list[tuple[str, int]] = []
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._remote: set[str] | None = None  # checkpoint names in MLflow, once listed
        self.rejected: list[str] = []  # downloaded by fetch_newest and found invalid
        self._thread = threading.Thread(target=self._run, name="so8t-mirror", daemon=True)
        self._thread.start()

    def submit(self, name: str, step: int) -> None:
        with self._cond:
            # Older pending rolling uploads are superseded by this one (best ones by a best).
            kinds = ("rolling", "best") if name.startswith("best") else ("rolling",)
            self._pending = [(n, s) for n, s in self._pending if not n.startswith(kinds)]
            self._pending.append((name, step))
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted upload is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self) -> None:
        """Stop the thread once the queue is empty (call after :meth:`drain`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                name, step = self._pending.pop(0)
                self._busy = True
            done = False
            try:
                done = self._mirror(name, step)
            except Exception as err:  # the copy is best effort; the local one is the truth
                log.warning("mirroring checkpoint %s failed: %s", name, err)
            with self._cond:
                # Not copied (tracking server away): try again, unless closed or a newer
                # checkpoint is queued to be copied instead.
                again = not done and not self._closed
                again = again and not any(s > step for _n, s in self._pending)
                if again:
                    self._pending.insert(0, (name, step))
                self._busy = False
                self._cond.notify_all()
                if again:
                    self._cond.wait(RETRY_SECONDS)  # (a submit or close wakes it early)

    def _mirror(self, name: str, step: int) -> bool:
        """Copy one checkpoint; False if the store could not take it (worth retrying)."""
        folder = self.root / name
        if self.store is None:
            self.on_mirrored(name, step)
        elif not folder.is_dir():
            return True  # (pruned meanwhile: nothing to copy)
        elif not self.store.upload_checkpoint(folder):
            return False
        else:
            # Listed once per run, then kept up to date here: a listing per upload is as
            # much work as the upload itself.
            remote = self._remote
            if remote is None:
                remote = set(self.store.list_checkpoints())
                # (just uploaded: a listing without it failed, so list again next time)
                self._remote = remote if name in remote else None
            remote.add(name)
            for doomed in superseded(sorted(remote), self.keep):
                if self.store.delete_checkpoint(doomed):
                    remote.discard(doomed)
            self.on_mirrored(name, step)  # only now is it in MLflow
        return True

    def fetch_newest(self, above: int = -1) -> Path | None:
        """Download the newest checkpoint past step ``above`` that verifies into ``root``;
        None if none does. An upload cut short by a kill lacks files or its manifest and
        never verifies (its name is kept in :attr:`rejected`)."""
        if self.store is None:
            return None
        remote = sorted(
            (
                (p[1], fmt.KINDS.index(p[0]), n)
                for n in self.store.list_checkpoints()
                if (p := fmt.parse_name(n)) and p[1] > above
            ),
            reverse=True,
        )
        for _step, _kind, name in remote:
            # (a folder Windows will not let go of yet is removed at the next start)
            with tempfile.TemporaryDirectory(
                dir=self.root, prefix=".tmp-download-", ignore_cleanup_errors=True
            ) as tmp:
                staged = Path(tmp) / name
                if not self.store.download_checkpoint(name, staged):
                    continue
                problem = fmt.verify(staged)
                if problem:
                    log.warning("skipping MLflow checkpoint %s: %s", name, problem)
                    self.rejected.append(name)
                    continue
                target = self.root / name
                fsutil.replace_dir(staged, target)  # (an invalid local one of that name)
                log.info("restored checkpoint %s from MLflow artifacts", name)
                return target
        return None
