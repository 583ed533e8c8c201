"""What a run's MLflow page says about it: a name, a description and provenance tags.

A name a person tells apart in the runs table (``borea lr=2e-4 seed=7``), built from the
user's Hydra task overrides; a description (``mlflow.note.content``, markdown) with the
command, the session folder and a history line per start and resume; and the tags MLflow's
UI shows as source, user and commit.
"""

from __future__ import annotations

import getpass
import shlex
import subprocess
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from mlflow.tracking import MlflowClient

from so8t_exp.host import host_id
from so8t_exp.paths import PACKAGE_DIR
from so8t_exp.tracking.masking import mask_override

NOTE = "mlflow.note.content"
SOURCE = "so8t_exp.train"
HISTORY = "History:"
# Overrides of where and how a run is recorded, never of what it trains: left out of names.
_QUIET = ("hydra.", "tracking.", "session.", "progress.", "checkpoint.", "notify.")
_QUIET_KEYS = {"trainer.progress_bar"}
_MAX_VALUE = 40
_MAX_NAME = 200


def short_override(arg: str) -> str | None:
    """``trainer.optimizer.lr=2e-4`` -> ``lr=2e-4``; ``+experiment=smoke`` -> ``smoke``;
    None for bookkeeping overrides (tracking, checkpointing, ...) that do not change the model."""
    key, eq, value = mask_override(arg).partition("=")
    plain = key.lstrip("+~")
    if not eq or plain.startswith(_QUIET) or plain in _QUIET_KEYS:
        return None
    if len(value) > _MAX_VALUE:  # paths: the end tells them apart
        value = "…" + value[-(_MAX_VALUE - 1) :]
    if plain == "experiment":
        return value
    return f"{'~' if key.startswith('~') else ''}{plain.rsplit('.', 1)[-1]}={value}"


def base_name(overrides: Iterable[str], prefix: str = "") -> str:
    """The run name before de-duplication; ``default`` when no override says anything."""
    parts = [s for s in map(short_override, overrides) if s]
    # The experiment choice leads, as the thing the rest modifies.
    parts.sort(key=lambda s: "=" in s)
    name = " ".join(filter(None, [prefix, *parts])) or "default"
    return name[:_MAX_NAME]


def unique_name(client: MlflowClient, experiment_id: str, base: str) -> str:
    """``base``, or ``base #2``, ``base #3``, ... : the first not taken in the experiment."""
    quoted = base.replace("\\", "\\\\").replace("'", "\\'")
    try:
        runs = client.search_runs(
            [experiment_id], f"attributes.run_name LIKE '{quoted}%'", max_results=5000
        )
    except Exception:  # an odd character the filter parser refuses: just compare names
        runs = client.search_runs([experiment_id], max_results=5000)
    taken = {r.info.run_name for r in runs}
    if base not in taken:
        return base
    n = 2
    while f"{base} #{n}" in taken:
        n += 1
    return f"{base} #{n}"


def command_line(overrides: Iterable[str], multirun: bool = False) -> str:
    """The command that starts this run (secret values masked), quoted for a POSIX shell."""
    args = ["python", "-m", SOURCE, *(["-m"] if multirun else [])]
    return shlex.join([*args, *map(mask_override, overrides)])


def git_commit() -> str | None:
    """The checkout's commit, if the package runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def user() -> str | None:
    """The login name, or None where the OS cannot tell (containers without a passwd entry)."""
    try:
        return getpass.getuser()
    except Exception:
        return None


def provenance_tags() -> dict[str, str]:
    """Source, user and commit, as MLflow's own UI shows them."""
    tags = {
        "mlflow.source.name": SOURCE,
        "mlflow.source.type": "LOCAL",
        "mlflow.user": user(),
        "mlflow.source.git.commit": git_commit(),
    }
    return {k: v for k, v in tags.items() if v}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def history_line(what: str) -> str:
    """``- <UTC time> <what> on <host>``: one line of a description's history."""
    return f"- {now_iso()} {what} on {host_id()}"


def note(command: str, facts: dict[str, str], first: str) -> str:
    """A description: the command, ``facts`` as a list, and a history opened by ``first``."""
    lines = [f"`{command}`", "", *(f"- {k}: {v}" for k, v in facts.items())]
    return "\n".join([*lines, "", HISTORY, history_line(first)])


def with_history(current: str | None, what: str, fallback: str) -> str:
    """``current`` with one more history line; ``fallback`` (a whole note) if there is none
    (a run from before descriptions existed)."""
    if not current:
        return fallback
    return f"{current.rstrip()}\n{history_line(what)}"


def session_note(
    overrides: list[str], session_dir: Path, sweep: str | None = None, first: str = "started"
) -> str:
    """The description of a session's run."""
    facts = {"session folder": f"`{session_dir}`"}
    if sweep:
        facts["sweep"] = sweep
    return note(command_line(overrides), facts, first)
