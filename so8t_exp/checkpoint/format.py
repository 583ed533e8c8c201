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

import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from so8t_exp import fsutil
from so8t_exp.fsutil import atomic_write_json, file_sha256, fsync_dir

if TYPE_CHECKING:  # (torch is imported where tensors are handled: the writer process
    import torch  # imports this module and needs none of it)

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
    """What one checkpoint holds: tensor groups (one safetensors file each) and JSON docs.
    ``shared``: where its tensors lie in a shared-memory arena (:mod:`.arena`), when they
    were captured into one; the writer process reads them from there."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    docs: dict[str, Any] = field(default_factory=dict)
    shared: Any = None


# One tensor as the safetensors file holds it: name, dtype code, shape, raw bytes.
Entry = tuple[str, str, list[int], memoryview]
# torch dtype name -> safetensors dtype code
DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def dtype_code(dtype: torch.dtype) -> str:
    return DTYPE_CODES[str(dtype).removeprefix("torch.")]


def checkpoint_name(kind: str, step: int) -> str:
    assert kind in KINDS, kind
    return f"{kind}-step{step:08d}"


def parse_name(name: str) -> tuple[str, int] | None:
    """``("rolling", 120)`` for ``rolling-step00000120``; None for anything else."""
    m = _NAME.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def _write_chunks(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write ``chunks`` to ``path`` and fsync it; the sha256 of what was written (computed
    on the way, so the file is not read back)."""
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            digest.update(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest()


def write_safetensors(path: Path, entries: list[Entry]) -> str:
    """A safetensors file of ``entries`` (the format ``safetensors.torch.load`` reads:
    little-endian header length, JSON header padded to 8 bytes, the tensors' bytes back to
    back); its sha256. Written from raw bytes, so the writer process needs no torch."""
    header, offset = {}, 0
    for name, dtype, shape, data in entries:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return _write_chunks(path, [struct.pack("<Q", len(raw)), raw, *(e[3] for e in entries)])


def tensor_entries(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    """``tensors`` as safetensors entries (CPU, contiguous; views of their memory)."""
    import torch

    out = []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        out.append((name, dtype_code(t.dtype), list(t.shape), memoryview(raw).cast("B")))
    return out


def write(root: Path, name: str, payload: Payload, pause_after_first_file: float = 0.0) -> Path:
    """Write ``payload`` as ``root/name`` atomically; returns the final folder.

    ``pause_after_first_file`` exists for fault injection (a kill in mid-write).
    """
    groups = {g: tensor_entries(t) for g, t in payload.tensors.items()}
    return write_files(root, name, groups, payload.docs, pause_after_first_file)


def write_files(
    root: Path,
    name: str,
    groups: dict[str, list[Entry]],
    docs: dict[str, Any],
    pause_after_first_file: float = 0.0,
) -> Path:
    """Write checkpoint ``root/name`` from tensor groups given as raw entries and JSON
    docs: staged, each file fsynced, the manifest last, renamed into place."""
    final = root / name
    tmp = staging_folder(root, name)
    fsutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = {}
    for group, entries in groups.items():
        path = tmp / f"{group}.safetensors"
        files[path.name] = (path, write_safetensors(path, entries))
        if pause_after_first_file:
            time.sleep(pause_after_first_file)
            pause_after_first_file = 0.0
    for doc, obj in docs.items():
        path = tmp / f"{doc}.json"
        text = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        files[path.name] = (path, _write_chunks(path, [text]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "files": {n: {"sha256": sha, "bytes": p.stat().st_size} for n, (p, sha) in files.items()},
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
    from safetensors.torch import load

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
