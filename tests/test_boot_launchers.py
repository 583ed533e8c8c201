"""Boot launchers: the Windows scripts' invariants that Wine cannot show (its cmd.exe has no
code pages and expands ``%`` twice; tests/test_windows_launchers.py runs them for real), the
run_hidden.vbs quoting, and the Linux script for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    history,
    only_run,
    session_info,
    start_train,
    subprocess_env,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = ROOT / "launchers" / "windows"
RESUME_BAT = WINDOWS / "resume_at_boot.bat"
REGISTER_BAT = WINDOWS / "register_boot_task.bat"
HIDDEN_VBS = WINDOWS / "run_hidden.vbs"
LINUX_SH = ROOT / "launchers" / "linux" / "resume_at_boot.sh"
UNIT = ROOT / "launchers" / "linux" / "so8t-resume.service"
STAMP = re.compile(r"^\[\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\] ")


def code_lines(path: Path) -> list[str]:
    """Non-empty lines that are not ``rem`` comments."""
    lines = (line.strip() for line in path.read_text(encoding="ascii").splitlines())
    return [line for line in lines if line and not re.match(r"(?i)rem\b", line)]


def line_with(lines: list[str], *needles: str) -> int:
    found = [i for i, line in enumerate(lines) if all(n in line for n in needles)]
    assert found, f"no line with {needles}"
    return found[0]


# -- Windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(WINDOWS.iterdir()), ids=lambda p: p.name)
def test_windows_scripts_are_ascii_with_crlf_line_endings(path):
    data = path.read_bytes()
    data.decode("ascii")  # cmd.exe reads the file before chcp takes effect
    assert data.endswith(b"\r\n")
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")


@pytest.mark.parametrize("path", [RESUME_BAT, REGISTER_BAT], ids=lambda p: p.name)
def test_bat_files_never_prompt(path):
    for line in code_lines(path):
        assert not re.search(r"(?i)^pause\b|[\s&(]pause\b|\bset\s+/p\b|\bchoice\b", line), line


def test_bat_files_restore_the_code_page_and_never_expand_paths_twice():
    """``call`` and delayed expansion would expand ``%`` and ``!`` in a folder name again
    (Wine's cmd.exe always does, so only the text can show it)."""
    for path in (RESUME_BAT, REGISTER_BAT):
        text = path.read_text(encoding="ascii")
        lines = code_lines(path)
        assert "%CD%" not in text.upper()
        assert "setlocal EnableExtensions DisableDelayedExpansion" in lines
        assert not any(re.match(r"(?i)call\b", line) for line in lines)
        saved = line_with(lines, "in ('chcp')", 'set "OLDCP=%%C"')
        assert lines.index("chcp 65001 >nul") > saved
        assert lines[-2:] == ["if defined OLDCP chcp %OLDCP% >nul 2>&1", "exit /b %CODE%"]
        for name in ("PYTHONUTF8=1", "PYTHONUNBUFFERED=1"):
            assert f'set "{name}"' in lines


def test_bat_files_write_no_timestamps_of_their_own():
    """The launcher stamps every line (SO8T_STAMP_LINES); only the no-Python error, which no
    launcher can write, carries cmd's own date."""
    lines = code_lines(RESUME_BAT)
    assert 'set "SO8T_STAMP_LINES=1"' in lines
    stamped = [line for line in lines if "%DATE%" in line]
    assert len(stamped) == 1 and "%%~M" in stamped[0]


def vbs_string(expression: str, variables: dict[str, str]) -> str:
    """Evaluate a VBScript ``"literal" & name & "literal"`` expression."""
    parts = re.findall(r'"((?:[^"]|"")*)"|(\w+)', expression)
    return "".join(lit.replace('""', '"') if not name else variables[name] for lit, name in parts)


def test_run_hidden_vbs_runs_the_bat_hidden_waits_and_returns_its_code():
    text = HIDDEN_VBS.read_text(encoding="ascii")
    assert "WScript.ScriptFullName" in text and "CurrentDirectory" not in text
    assert not re.search(r"(?i)\b(MsgBox|InputBox)\b", text)
    run = re.search(r"^(\w+) = shell\.Run\((.*), 0, True\)\r?$", text, re.M)
    assert run, "shell.Run(..., 0, True): window style 0 (hidden), wait for the exit code"
    assert re.search(rf"^WScript\.Quit {run.group(1)}\r?$", text, re.M)
    command = vbs_string(run.group(2), {"here": r"C:\My Projects\so8t\launchers\windows"})
    # cmd /c strips the outer pair of quotes: a path with spaces stays one quoted argument.
    bat = r"C:\My Projects\so8t\launchers\windows\resume_at_boot.bat"
    assert command == f'cmd.exe /d /v:off /c ""{bat}""'


# -- the Linux script -------------------------------------------------------------------------


def test_linux_script_is_lf_and_executable():
    data = LINUX_SH.read_bytes()
    assert data.startswith(b"#!/usr/bin/env bash\n") and b"\r" not in data
    assert os.access(LINUX_SH, os.X_OK)


def fake_python(tmp_path: Path, body: str) -> Path:
    """A stand-in for SO8T_PYTHON: a shell script, so the launcher's plumbing runs for real
    without a trainer behind it."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def run_script(tmp_path: Path, *args: str, python: str = sys.executable, **env: str):
    return subprocess.run(
        ["bash", str(LINUX_SH), *args],
        cwd=tmp_path,
        env=subprocess_env(
            tmp_path, SO8T_PYTHON=python, SO8T_LOG_DIR=str(tmp_path / "logs"), **env
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )


def log_lines(tmp_path: Path) -> list[str]:
    lines = (tmp_path / "logs" / "resume_at_boot.log").read_text().splitlines()
    assert lines and all(STAMP.match(line) for line in lines), lines
    return [STAMP.sub("", line) for line in lines]


def raw_log(tmp_path: Path) -> list[str]:
    return (tmp_path / "logs" / "resume_at_boot.log").read_text().splitlines()


def test_linux_script_passes_arguments_and_propagates_the_exit_code(tmp_path):
    python = fake_python(
        tmp_path,
        'echo "args: $*"\necho "cwd: $(pwd -P)"\necho "stamp: $SO8T_STAMP_LINES'
        ' $PYTHONUNBUFFERED"\necho "oops" >&2\nexit 7',
    )
    out = run_script(tmp_path, "resume.dry_run=true", "a b", python=str(python))
    assert out.returncode == 7
    assert out.stdout == out.stderr == ""  # everything goes to the log
    assert raw_log(tmp_path) == [  # a stand-in Python: nobody stamps its lines
        "args: -m so8t_exp.resume resume.dry_run=true a b",
        f"cwd: {ROOT}",
        "stamp: 1 1",
        "oops",
    ]


def test_linux_script_says_when_there_is_no_python(tmp_path):
    out = run_script(tmp_path, python=str(tmp_path / "no-such-python"))
    assert out.returncode == 127
    assert "no Python found" in out.stderr
    (line,) = log_lines(tmp_path)
    assert line.startswith("resume_at_boot: error: no Python found")


def test_linux_script_runs_and_fails_when_the_log_cannot_be_written(tmp_path):
    (tmp_path / "logs" / "resume_at_boot.log").mkdir(parents=True)  # a folder: no appending
    python = fake_python(tmp_path, 'echo "ran"\nexit 0')
    out = run_script(tmp_path, python=str(python))
    assert out.returncode == 8  # it ran, but nothing of it was logged
    assert out.stdout == "ran\n" and "cannot write the log" in out.stderr


@pytest.mark.slow
def test_launcher_stamps_every_line_and_its_exit(tmp_path, store):
    out = run_script(tmp_path, f"tracking.uri={store}", "resume.dry_run=true")
    assert out.returncode == 0
    lines = log_lines(tmp_path)
    assert lines[0].startswith(f"resume_at_boot: starting {sys.executable} -m so8t_exp.resume")
    assert "dry run: nothing to resume" in lines
    assert lines[-1] == "resume_at_boot: exit code 0"
    bad = run_script(tmp_path, "resume.bogus=1")
    assert bad.returncode == 2
    lines = log_lines(tmp_path)
    assert any(line.startswith("error: ") and "resume.bogus" in line for line in lines)
    assert lines[-1] == "resume_at_boot: exit code 2"


@pytest.mark.slow
def test_linux_script_resumes_a_killed_run_to_the_end(tmp_path, store):
    run_dir = tmp_path / "run"
    proc = start_train(
        tmp_path,
        store,
        run_dir,
        "+experiment=smoke",
        "trainer.max_steps=40",
        "checkpoint.every_n_steps=4",
    )
    wait_for(lambda: session_info(run_dir).get("current_step", 0) >= 8, proc=proc, what="step 8")
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    run_id = session_info(run_dir)["session_id"]

    dry = run_script(tmp_path, f"tracking.uri={store}", "resume.dry_run=true")
    assert dry.returncode == 0
    dry_log = log_lines(tmp_path)
    assert any(line.startswith(run_id) and "resume" in line for line in dry_log), dry_log
    assert dry_log[-1] == "resume_at_boot: exit code 0"
    assert only_run(store)[1].info.status == "RUNNING"  # a dry run launches nothing

    out = run_script(tmp_path, f"tracking.uri={store}")
    assert out.returncode == 0, "\n".join(log_lines(tmp_path)[-40:])
    client, run = only_run(store)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    steps = [s for s, _ in history(client, run_id, "train/loss")]
    assert steps == list(range(1, 41))
    resumed_log = log_lines(tmp_path)
    assert resumed_log[: len(dry_log)] == dry_log  # appended, not rewritten
    assert any(f"resumed: run {run_id}" in line for line in resumed_log[len(dry_log) :])
    assert resumed_log[-1] == "resume_at_boot: exit code 0"

    again = run_script(tmp_path, f"tracking.uri={store}")
    assert again.returncode == 0
    final_log = log_lines(tmp_path)
    assert final_log[: len(resumed_log)] == resumed_log
    assert final_log[len(resumed_log) :][-2:] == [
        "nothing to resume",
        "resume_at_boot: exit code 0",
    ]
