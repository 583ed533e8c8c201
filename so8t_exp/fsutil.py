"""Durable file operations that behave the same on Windows and POSIX."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

# Windows: os.replace onto a file that another process (a reader, an indexer, antivirus) has
# open fails with PermissionError until it closes it, typically within milliseconds.
REPLACE_RETRY_SECONDS = 2.0
_serial = itertools.count()  # next() on it is atomic under the GIL: a unique temp per write


def fsync_dir(path: Path) -> None:
    """Persist a rename on POSIX; Windows cannot open directories and needs no such call."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """Where ``path`` is staged before its atomic ``os.replace``: a name no other write uses,
    whatever the process or thread (two writers sharing one would clobber each other)."""
    tag = f"{os.getpid()}-{threading.get_ident()}-{next(_serial)}"
    return path.with_name(f".{path.name}.tmp-{tag}")


def replace(src: Path, dst: Path, retry_seconds: float = REPLACE_RETRY_SECONDS) -> None:
    """``os.replace(src, dst)``, retried briefly on PermissionError (Windows refuses to
    replace a file that a reader holds open); atomic wherever ``os.replace`` is."""
    deadline = time.monotonic() + retry_seconds
    delay = 0.005
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then ``os.replace`` (atomic on NTFS and POSIX).
    Safe to call from several threads at once: each write stages under its own name."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented UTF-8 JSON, written atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8"))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` as a hard link (no data copied, no extra disk) or, across
    file systems or where links are not allowed, a copy; atomically replaces ``dst``.
    Only for files that are never modified in place (checkpoint files)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
