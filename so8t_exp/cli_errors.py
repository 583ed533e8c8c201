"""Exit codes of the commands, and one clear line for each user error.

A user error (bad config, unknown run, unreachable store) ends a command with one line
``error: ...`` on stderr and the code the README documents — no traceback, unless
``HYDRA_FULL_ERROR=1`` (Hydra's own switch, honoured by every command here).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1  # training failed (the log says why)
EXIT_BAD_INPUT = 2  # a config key/value, an override or a data line is wrong
EXIT_LOCKED = 3  # the session folder is in use by another live process
EXIT_NOT_FOUND = 4  # no such run id / the run named is not resumable
EXIT_FENCED = 5  # another process took over this run; this one stopped writing
EXIT_TRACKING = 6  # the tracking store is unreachable (after retrying) or unusable
EXIT_RUN_LOST = 7  # the session's run is not in the tracking store (session "lost")
EXIT_PEER_LOST = 8  # torchrun: another process of the run ended or stopped answering


def shell_exit_code(returncode: int) -> int:
    """A child's ``Popen.returncode`` as a shell reports it: killed by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


# Lines of Hydra's and OmegaConf's messages that say nothing the key and reason don't.
_NOISE = (
    "full_key:",
    "reference_type=",
    "object_type=",
    "Config search path",
    "provider=",
    "See https://hydra.cc",
    "Set the environment variable HYDRA_FULL_ERROR",
    # Misleading for a schema key: `+` cannot add keys the schema does not have.
    "To append to your config use",
)


def debug() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def report(message: str, code: int) -> int:
    """Print ``error: message`` on one line (after the traceback of the exception being
    handled, in debug mode); returns ``code``."""
    if debug() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code


def fail(message: str, code: int) -> NoReturn:
    """:func:`report`, then exit with ``code``."""
    sys.exit(report(message, code))


def config_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the configuration is wrong": Hydra's compact (user-facing)
    errors — override syntax, composition, missing group options — OmegaConf's, and ours."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    from so8t_exp.config_checks import ConfigError

    return (CompactHydraException, OmegaConfBaseException, ConfigError)


def config_error_line(err: BaseException) -> str:
    """One line for a Hydra, OmegaConf or :class:`ConfigError` error, naming the key."""
    options = getattr(err, "options", None)
    missing = getattr(err, "missing_cfg_file", None)
    if missing:  # "model/nonexist" -> model=nonexist
        group, _, name = str(missing).rpartition("/")
        choice = f"{group}={name}" if group else name
        if options:
            return f"{choice}: no such config; choose one of: {', '.join(options)}"
        return f"{choice}: no such config"
    override = getattr(err, "override", None)
    if override is not None:
        return f"cannot parse override {override!r}: {_lines(getattr(err, 'message', str(err)))}"
    cause = err.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf"):
        err = cause  # Hydra's own line ("Error merging override ...") adds nothing
    text = str(err)
    key = getattr(err, "full_key", None) or _full_key(text)
    unknown = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    where = _composing(text)
    if key and unknown:
        return _unknown_key(key, unknown.group(2), where)
    line = _lines(re.sub(r"^In '[^']+': \w+ raised while composing config:", "", text))
    return f"{key}{where}: {line}" if key and not line.startswith(str(key)) else line


def _composing(text: str) -> str:
    """`` (in experiment/x)`` when the error comes from a config file, else ``""``."""
    found = re.match(r"In '([^']+)': ", text)
    return f" (in {found.group(1)})" if found else ""


def _unknown_key(key: str, schema_name: str, where: str) -> str:
    """The same line as for a ``+key`` outside the schema, with the nearest real key."""
    from so8t_exp import config
    from so8t_exp.config_checks import schema_hint

    fields = set()
    schema = getattr(config, schema_name, None)
    if dataclasses.is_dataclass(schema):
        fields = {f.name for f in dataclasses.fields(schema)}
    prefix, _, name = key.rpartition(".")
    hint = schema_hint(name, fields, f"{prefix}." if prefix else "")
    return f"{key}{where}: not a key of the schema ({schema_name}){hint}"


def _full_key(text: str) -> str | None:
    found = re.search(r"full_key: (\S+)", text)
    return found.group(1) if found else None


def _lines(text: str) -> str:
    kept = [line.strip() for line in str(text).splitlines()]
    kept = [line for line in kept if line and not line.startswith(_NOISE)]
    return " ".join(kept)


def _report_config_errors(func: Callable[[], Any]) -> Any:
    """``func()``; a config error becomes one line and exit 2. ``SystemExit`` is not an
    ``Exception``, so Hydra's own reporter, around this, lets it through."""
    try:
        return func()
    except config_errors() as err:
        fail(config_error_line(err), EXIT_BAD_INPUT)


@contextmanager
def hydra_config_errors() -> Iterator[None]:
    """While this is open, Hydra's errors in composing the config (a misspelled key, a
    wrong type, an unknown group option, a bad override) exit 2 with one line instead
    of exit 1 with a paragraph.

    Hydra reports them from inside ``hydra.main`` with its ``run_and_report``, which
    prints and exits 1; it is replaced, for this block only, by a wrapper that handles
    config errors first and hands everything else to Hydra's as before.
    """
    from hydra._internal import utils as hydra_utils

    original = hydra_utils.run_and_report
    hydra_utils.run_and_report = lambda func: original(lambda: _report_config_errors(func))
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def pipe_safe(main: Callable[[], int]) -> int:
    """``main()``, ending quietly when the reader of stdout went away (``... | head``), as
    a shell tool does: exit 141 (128 + SIGPIPE), no traceback."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it somewhere that accepts the rest.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
