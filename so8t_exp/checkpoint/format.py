"""The on-disk checkpoint format: write atomically, verify, read without unpickling.

A checkpoint is a folder ``<kind>-step<NNNNNNNN>`` holding safetensors files (tensors) and
JSON files (everything else), and ``manifest.json`` with the sha256 and size of every file.
It is written as ``.tmp-<name>-<pid>``, each file fsynced, the manifest written last, then
renamed into place: a folder with a valid manifest is complete by construction. A folder of
the same name already there is replaced by :func:`so8t_exp.fsutil.replace_dir` (set aside as
``<name>.old-<tag>``, rename in, delete); :func:`recover_leftovers` finishes or undoes what a
crash cut short, so at any point one complete copy exists and is found.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save_file

from so8t_exp import fsutil
from so8t_exp.fsutil import atomic_write_json, file_sha256, fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Kinds, in the order that breaks a tie of steps (any is a complete state of its step).
KINDS = ("rolling", "best", "emergency", "final")
_NAME = re.compile(r"^(rolling|best|emergency|final)-step(\d{8,})$")
# What a crash can leave: a staged write (``.tmp-<name>-<pid>``) and the previous copy set
# aside while a folder of the same name was replaced (``<name>.old-<tag>``).
_CKPT = r"(?P<name>(?:rolling|best|emergency|final)-step\d{8,})"
_STAGED = re.compile(rf"^\.tmp-{_CKPT}-\d+$")
_ASIDE = re.compile(rf"^{_CKPT}{re.escape(fsutil.ASIDE_MARK)}[\w-]+$")


@dataclass
class Payload:
    """What one checkpoint holds: tensor groups (one safetensors file each) and JSON docs."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    docs: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(kind: str, step: int) -> str:
    assert kind in KINDS, kind
    return f"{kind}-step{step:08d}"


def parse_name(name: str) -> tuple[str, int] | None:
    """``("rolling", 120)`` for ``rolling-step00000120``; None for anything else."""
    m = _NAME.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write(root: Path, name: str, payload: Payload, pause_after_first_file: float = 0.0) -> Path:
    """Write ``payload`` as ``root/name`` atomically; returns the final folder.

    ``pause_after_first_file`` exists for fault injection (a kill in mid-write).
    """
    final = root / name
    tmp = staging_folder(root, name)
    fsutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = {}
    for group, tensors in payload.tensors.items():
        path = tmp / f"{group}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        files[path.name] = path
        if pause_after_first_file:
            time.sleep(pause_after_first_file)
            pause_after_first_file = 0.0
    for doc, obj in payload.docs.items():
        path = tmp / f"{doc}.json"
        path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
        files[path.name] = path
    for path in files.values():
        _fsync_file(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "files": {
            n: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for n, p in files.items()
        },
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    fsync_dir(tmp)
    # Same kind and step written before (e.g. a corrupt one resumed past): replace it.
    fsutil.replace_dir(tmp, final)
    return final


def staging_folder(root: Path, name: str) -> Path:
    """Where this process writes checkpoint ``name`` before renaming it into place."""
    return root / f".tmp-{name}-{os.getpid()}"


def verify(folder: Path) -> str | None:
    """None if ``folder`` is a complete checkpoint, else why not."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format_version") != FORMAT_VERSION or not isinstance(files, dict):
            return f"unknown format {manifest.get('format_version')!r}"
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    if "state.json" not in files:
        return "manifest lists no state.json"
    for fname, meta in files.items():
        path = folder / fname
        if not path.is_file():
            return f"missing {fname}"
        if path.stat().st_size != meta.get("bytes"):
            return f"{fname} has {path.stat().st_size} bytes, manifest says {meta.get('bytes')}"
        if file_sha256(path) != meta.get("sha256"):
            return f"{fname} checksum mismatch"
    return None


def read(folder: Path) -> Payload:
    """Load a verified checkpoint: safetensors and JSON only, nothing unpickled."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    payload = Payload()
    for fname in manifest["files"]:
        path = folder / fname
        if fname.endswith(".safetensors"):
            # From bytes, not memory-mapped: a mapped file could not be deleted or replaced
            # on Windows while the optimizer still uses its tensors.
            payload.tensors[fname.removesuffix(".safetensors")] = load(path.read_bytes())
        elif fname.endswith(".json"):
            payload.docs[fname.removesuffix(".json")] = json.loads(path.read_text("utf-8"))
    return payload


def candidates(root: Path) -> list[tuple[int, int, Path]]:
    """Checkpoint folders under ``root``, newest first: by step, then final > emergency >
    best > rolling (never by modification time)."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            parsed = parse_name(child.name)
            if parsed and child.is_dir():
                found.append((parsed[1], KINDS.index(parsed[0]), child))
    return sorted(found, key=lambda t: (t[0], t[1]), reverse=True)


def newest_valid(root: Path, kind: str | None = None) -> Path | None:
    """The newest checkpoint (of ``kind``, if given) that verifies; each invalid newer one
    is skipped with a warning."""
    for _step, k, folder in candidates(root):
        if kind is not None and KINDS[k] != kind:
            continue
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def recover_leftovers(root: Path) -> None:
    """Put right what a crash (or a refused rename) left under ``root``; call before
    choosing a checkpoint, while holding the session lock.

    For each checkpoint name with a staged write or an aside copy: if the folder of that
    name is missing or invalid, the first complete one of them (the staged write, the newer,
    first) takes its place; every other leftover is deleted. Other ``.tmp-*`` folders
    (cut-short downloads) are deleted. Each step is logged."""
    if not root.is_dir():
        return
    by_name: dict[str, list[Path]] = {}
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        m = _STAGED.match(child.name) or _ASIDE.match(child.name)
        if m:
            by_name.setdefault(m["name"], []).append(child)
        elif child.name.startswith(".tmp-"):
            log.info("removing %s, left by an interrupted download", child.name)
            fsutil.rmtree(child, ignore_errors=True)
    for name, leftovers in by_name.items():
        leftovers.sort(key=lambda p: not p.name.startswith(".tmp-"))  # staged first
        final = root / name
        problem = verify(final) if final.exists() else "missing"
        if problem is not None:
            for folder in leftovers:
                if verify(folder) is None:
                    fsutil.replace_dir(folder, final)
                    leftovers.remove(folder)
                    log.warning(
                        "checkpoint %s (%s) restored from %s, left by an interrupted write",
                        name,
                        problem,
                        folder.name,
                    )
                    break
        for folder in leftovers:
            log.info("removing %s, left by an interrupted checkpoint write", folder.name)
            fsutil.rmtree(folder, ignore_errors=True)
