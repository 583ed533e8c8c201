"""Run the Windows launchers under a real cmd.exe and wscript.exe (Wine), with stand-in
``python.exe``/``py.exe``/``schtasks.exe`` built from ``tests/wine/standin.c`` by MinGW.

Only Windows itself is stood in for: the .bat and .vbs files, cmd.exe's parsing of them and
wscript's ``WScript.Shell.Run`` are real. ``.ci/run`` installs Debian's ``wine`` and
``gcc-mingw-w64-x86-64``; without them the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDIN_C = HERE / "wine" / "standin.c"
LAUNCHERS = HERE.parent / "launchers" / "windows"
EXES = ("python.exe", "py.exe", "schtasks.exe")


def missing_tools() -> str | None:
    """Why the Wine tests cannot run here, or None."""
    for tool, package in (("wine", "wine"), ("x86_64-w64-mingw32-gcc", "gcc-mingw-w64-x86-64")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian package {package}; .ci/run installs it)"
    return None


def win_path(path: Path) -> str:
    """The Windows name Wine gives a Linux path (drive Z: is the Linux root)."""
    return "Z:" + str(path).replace("/", "\\")


@dataclass
class Wine:
    prefix: Path
    bin_dir: Path  # the stand-in executables
    work: Path  # plain-named folder for wrapper scripts and outputs

    @property
    def system32(self) -> Path:
        return self.prefix / "drive_c" / "windows" / "system32"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "SO8T_", "WINE"))
        }
        env.update(
            WINEPREFIX=str(self.prefix),
            WINEDEBUG="-all",
            WINEDLLOVERRIDES="mscoree=;mshtml=",  # no Mono/Gecko install dialogs
            DISPLAY="",
        )
        env.update(extra)
        return env

    def make_project(self, parent: Path, name: str, venv: bool = True) -> Path:
        """A project folder called ``name`` with the real launchers and, with ``venv``, a
        stand-in ``.venv\\Scripts\\python.exe``."""
        root = parent / name
        shutil.copytree(LAUNCHERS, root / "launchers" / "windows")
        if venv:
            scripts = root / ".venv" / "Scripts"
            scripts.mkdir(parents=True)
            shutil.copy(self.bin_dir / "python.exe", scripts / "python.exe")
        return root

    def run(self, argv: list[str], cwd: Path | None = None, timeout: float = 120, **env: str):
        """``wine ARGV`` started in ``cwd`` (default C:\\Windows\\System32, as Task Scheduler
        starts a task)."""
        return subprocess.run(
            ["wine", *argv],
            cwd=cwd or self.system32,
            env=self.env(**env),
            capture_output=True,
            timeout=timeout,
        )

    def run_vbs(self, script: Path, **env: str) -> int:
        """``wscript.exe SCRIPT`` (the task's own command); its exit code."""
        return self.run(["wscript.exe", win_path(script)], **env).returncode

    def run_bat(self, bat: Path, args: str = "", **env: str) -> tuple[int, str]:
        """``BAT ARGS`` typed at a cmd.exe prompt in C:\\Windows\\System32; its exit code and
        console output (stdout and stderr). A wrapper .vbs starts it, as run_hidden.vbs does,
        so the path reaches cmd.exe exactly as Windows passes it, whatever it holds. (JScript,
        not VBScript: Wine's VBScript lacks ChrW, and the file must stay ASCII.)"""
        out = self.work / "console.txt"
        out.unlink(missing_ok=True)
        command = f'cmd.exe /d /v:off /c ""{win_path(bat)}" {args} > "{win_path(out)}" 2>&1"'
        wrapper = self.work / "wrapper.js"
        wrapper.write_text(
            'var shell = new ActiveXObject("WScript.Shell");\r\n'
            f"WScript.Quit(shell.Run({json.dumps(command)}, 0, true));\r\n",
            encoding="ascii",
        )
        code = self.run_vbs(wrapper, **env)
        text = out.read_bytes().decode("utf-8", errors="replace") if out.exists() else ""
        return code, text


def build_wine(root: Path) -> Wine:
    """A fresh Wine prefix and the stand-ins compiled into ``root``."""
    bin_dir, work = root / "bin", root / "work"
    bin_dir.mkdir(parents=True)
    work.mkdir()
    for exe in EXES:
        subprocess.run(
            [
                "x86_64-w64-mingw32-gcc",
                "-municode",
                "-O1",
                "-o",
                str(bin_dir / exe),
                str(STANDIN_C),
            ],
            check=True,
            timeout=300,
        )
    wine = Wine(prefix=root / "prefix", bin_dir=bin_dir, work=work)
    boot = wine.run(["cmd.exe", "/c", "ver"], cwd=root, timeout=300)  # creates the prefix
    if not wine.system32.is_dir():
        raise RuntimeError(f"wine could not create its prefix: {boot.stderr[-2000:]!r}")
    return wine


def read_records(path: Path) -> list[dict[str, list[str]]]:
    """The stand-ins' record file: one dict per start, ``{key: [values]}``."""
    if not path.exists():
        return []
    starts, current = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line == "end":
            starts.append(current)
            current = {}
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return starts
