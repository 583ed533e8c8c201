"""Durable file operations that behave the same on Windows and POSIX.

Windows refuses a rename, replace or delete for a moment while another process holds the
file or a file in the folder (antivirus, the search indexer, a backup tool, a reader): the
call fails with "access denied" or "being used by another process" and works milliseconds
later. Every such operation here goes through :func:`retrying`, a short bounded backoff.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a refused operation is retried: a scanner holds a file for milliseconds, an
# indexer rarely over a second; longer than this is a real problem worth an error.
RETRY_SECONDS = 2.0
# ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION: another handle is open.
SHARING_WINERRORS = frozenset({5, 32, 33})
# ERROR_DIR_NOT_EMPTY: rmtree deleted every file, but one still open elsewhere stays "delete
# pending" until its handle closes, so removing the folder fails for that moment.
_DIR_NOT_EMPTY = 145
ASIDE_MARK = ".old-"  # <name>.old-<tag>: the previous copy while a folder is replaced
_serial = itertools.count()  # next() on it is atomic under the GIL: a unique temp per write


def is_transient(err: BaseException, extra_winerrors: frozenset[int] = frozenset()) -> bool:
    """True for the errors Windows gives while another handle is open on the file: worth a
    retry. Not for ENOSPC, ENOENT and the like, which a retry would only delay."""
    if isinstance(err, PermissionError):
        return True
    winerror = getattr(err, "winerror", None)
    return isinstance(err, OSError) and winerror in SHARING_WINERRORS | extra_winerrors


def retrying(
    op: Callable[[], T],
    retry_seconds: float | None = None,
    extra_winerrors: frozenset[int] = frozenset(),
) -> T:
    """``op()``, retried with a short exponential backoff (5 ms doubling to 100 ms) for up to
    ``retry_seconds`` (default :data:`RETRY_SECONDS`) while it fails with a transient error
    (:func:`is_transient`); any other error, or the last transient one, is raised."""
    deadline = time.monotonic() + (RETRY_SECONDS if retry_seconds is None else retry_seconds)
    delay = 0.005
    while True:
        try:
            return op()
        except OSError as err:
            if not is_transient(err, extra_winerrors) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def fsync_dir(path: Path) -> None:
    """Persist a rename on POSIX; Windows cannot open directories and needs no such call."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_tag() -> str:
    """A tag no other temporary name uses, whatever the process or thread."""
    return f"{os.getpid()}-{threading.get_ident()}-{next(_serial)}"


def temp_sibling(path: Path) -> Path:
    """Where ``path`` is staged before its atomic ``os.replace``: a name no other write uses,
    whatever the process or thread (two writers sharing one would clobber each other)."""
    return path.with_name(f".{path.name}.tmp-{unique_tag()}")


def replace(src: Path, dst: Path, retry_seconds: float | None = None) -> None:
    """``os.replace(src, dst)`` (a file, or a folder onto a name that does not exist),
    retried while Windows refuses it for a moment; atomic wherever ``os.replace`` is."""
    retrying(lambda: os.replace(src, dst), retry_seconds)


def unlink(path: Path, missing_ok: bool = True) -> None:
    """``path.unlink()``, retried while Windows refuses it for a moment."""
    retrying(lambda: path.unlink(missing_ok=missing_ok))


def rmtree(path: Path, ignore_errors: bool = False) -> bool:
    """Delete the folder ``path`` (nothing if it does not exist), retried while Windows
    refuses a file in it for a moment; each try goes on from what the last one left.
    ``ignore_errors``: a failure after the retries is logged, not raised. True if gone."""

    def once() -> None:
        if path.is_dir():
            shutil.rmtree(path)

    try:
        retrying(once, extra_winerrors=frozenset({_DIR_NOT_EMPTY}))
    except FileNotFoundError:
        pass  # (someone else removed part of it meanwhile: the rest is gone too, or next try)
    except OSError as err:
        if not ignore_errors:
            raise
        log.warning("could not delete %s: %s", path, err)
    return not path.exists()


def replace_dir(staged: Path, final: Path) -> None:
    """Put the complete folder ``staged`` at ``final``, replacing any folder there, so that
    a crash at any point leaves one complete copy under a recognisable name.

    A folder cannot be replaced atomically (``os.replace`` onto a non-empty folder fails;
    ``rmtree`` + rename loses both copies in between), so: (1) the old folder is renamed
    aside to ``<final>.old-<tag>``, (2) ``staged`` is renamed to ``final``, (3) the aside one
    is deleted. Between (1) and (2) only the aside name and ``staged`` hold it; whoever
    starts next recognises that (see ``checkpoint.format.recover_leftovers``)."""
    parent = final.parent
    if not final.exists():  # the common case: nothing to set aside
        replace(staged, final)
        fsync_dir(parent)
        return
    aside = final.with_name(f"{final.name}{ASIDE_MARK}{unique_tag()}")
    replace(final, aside)  # (1)
    fsync_dir(parent)
    try:
        replace(staged, final)  # (2)
    except BaseException:
        if not final.exists():  # (not a crash, a refusal: put the old copy back)
            try:
                replace(aside, final)
            except OSError as err:
                log.error("could not put %s back as %s: %s", aside, final, err)
        raise
    fsync_dir(parent)
    rmtree(aside, ignore_errors=True)  # (3) a leftover is removed at the next start


def recover_aside(final: Path) -> None:
    """Tidy what an interrupted :func:`replace_dir` onto ``final`` left: with ``final``
    missing, the aside copy (complete: only a complete folder is ever set aside) goes back;
    asides beside an existing ``final`` are deleted."""
    asides = sorted(final.parent.glob(f"{final.name}{ASIDE_MARK}*"))
    for aside in asides:
        if not final.exists():
            log.warning("restoring %s from %s, left by an interrupted replacement", final, aside)
            replace(aside, final)
        else:
            log.info("removing %s, left by an interrupted replacement", aside)
            rmtree(aside, ignore_errors=True)


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
        unlink(tmp)  # a failed write leaves nothing behind
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
        unlink(tmp)
        raise
