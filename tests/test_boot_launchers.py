"""Boot launchers: the Windows scripts' invariants (cmd.exe, wscript.exe and Task Scheduler
cannot run here, so their text is checked), the systemd unit, and the Linux script for real."""

from __future__ import annotations

import os
import re
import shutil
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


def test_resume_bat_finds_the_project_from_its_own_location():
    text = RESUME_BAT.read_text(encoding="ascii")
    assert "%CD%" not in text.upper()
    lines = code_lines(RESUME_BAT)
    assert "chcp 65001" in lines[line_with(lines, "chcp")]
    root_line = lines[line_with(lines, "%~dp0", 'set "ROOT=')]
    relative = re.search(r'"%~dp0([^"]*)"', root_line).group(1)
    assert (RESUME_BAT.parent / relative.replace("\\", "/")).resolve() == ROOT
    assert 'cd /d "%ROOT%"' in lines


def test_resume_bat_prefers_the_venv_python_then_py_launcher():
    lines = code_lines(RESUME_BAT)
    venv = line_with(lines, 'set "PYEXE=%ROOT%\\.venv\\Scripts\\python.exe"')
    fallback = line_with(lines, 'if not exist "%PYEXE%"')
    assert venv < fallback
    assert lines[fallback + 1 : fallback + 3] == ['set "PYEXE=py"', 'set "PYARGS=-3"']


def test_resume_bat_appends_timestamped_lines_and_propagates_the_exit_code():
    lines = code_lines(RESUME_BAT)
    assert lines[line_with(lines, 'set "LOG=')] == 'set "LOG=%ROOT%\\logs\\resume_at_boot.log"'
    to_log = [line for line in lines if '"%LOG%"' in line and not line.startswith("set ")]
    assert len(to_log) == 3
    assert all(re.search(r'>>\s*"%LOG%"', line) for line in to_log)
    assert not any(re.search(r'(?<!>)>\s*"%LOG%"', line) for line in to_log)  # never truncates
    assert all("[%DATE% %TIME%]" in line for line in to_log if line.startswith("echo "))
    run = line_with(lines, "-m so8t_exp.resume", "2>&1")
    assert lines[run] == '"%PYEXE%" %PYARGS% -m so8t_exp.resume %* >> "%LOG%" 2>&1'
    assert lines[run + 1] == 'set "CODE=%ERRORLEVEL%"'
    assert "exit code %CODE%" in lines[run + 2]
    assert lines[-1] == "exit /b %CODE%"


def expand(line: str, values: dict[str, str]) -> str:
    """cmd.exe's percent expansion of ``%NAME%`` (enough for these lines)."""
    return re.sub(r"%(\w+)%", lambda m: values.get(m.group(1), m.group(0)), line)


def test_resume_bat_log_lines_survive_single_digit_values():
    values = {"DATE": "Mon 01/05/2026", "TIME": "12:00:00.00", "LOG": r"C:\p\logs\r.log"}
    for line in code_lines(RESUME_BAT):
        if line.startswith("echo ") and ">>" in line:
            for code in "0124":
                expanded = expand(line, {**values, "CODE": code})
                assert not re.search(r"\s\d>", expanded), expanded


def test_register_task_needs_admin_and_recreates_the_task():
    lines = code_lines(REGISTER_BAT)
    admin = line_with(lines, "net session")
    assert lines[admin + 1].startswith("if errorlevel 1")
    assert "exit /b 1" in lines[admin + 2 : admin + 6]
    creates = [line for line in lines if line.startswith("schtasks /Create")]
    assert len(creates) == 2
    assert all('/F /TN "%TASK%" /TR "%ACTION%"' in line for line in creates)
    logon = [line for line in creates if "/SC ONLOGON" in line]
    startup = [line for line in creates if "/SC ONSTART" in line]
    assert len(logon) == len(startup) == 1
    assert "/IT" in logon[0].split() and "SYSTEM" not in logon[0]
    assert "/RU SYSTEM" in startup[0] and "/IT" not in startup[0].split()
    mode = line_with(lines, 'if /i "%~1"=="/startup"')
    assert lines[mode].endswith('set "MODE=startup"')
    assert lines[line_with(lines, 'if /i "%MODE%"=="startup"') + 1] == startup[0]


def test_register_task_runs_the_vbs_with_wscript_and_shows_how_to_remove_it():
    lines = code_lines(REGISTER_BAT)
    action = lines[line_with(lines, 'set "ACTION=')]
    assert action == 'set "ACTION=wscript.exe \\"%HERE%\\run_hidden.vbs\\""'
    here = lines[line_with(lines, 'set "HERE=')]
    assert '"%~dp0."' in here
    assert any(line.startswith('schtasks /Query /TN "%TASK%"') for line in lines)
    assert 'echo   schtasks /Delete /TN "%TASK%" /F' in lines
    assert not any(line.startswith("schtasks /Delete") for line in lines)  # printed, not run
    assert lines[-1] == "exit /b 0"


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
    assert command == r'cmd.exe /d /c ""C:\My Projects\so8t\launchers\windows\resume_at_boot.bat""'


# -- systemd ----------------------------------------------------------------------------------


def unit_sections(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            current[key] = value
    return sections


def test_systemd_unit_runs_the_linux_script_from_the_checkout():
    unit = unit_sections(UNIT.read_text())
    assert unit["Service"]["ExecStart"] == "@ROOT@/launchers/linux/resume_at_boot.sh"
    assert unit["Service"]["WorkingDirectory"] == "@ROOT@"
    assert unit["Install"]["WantedBy"] == "default.target"
    script = Path(unit["Service"]["ExecStart"].replace("@ROOT@", str(ROOT)))
    assert script == LINUX_SH and os.access(script, os.X_OK)


def test_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("@ROOT@", str(ROOT)))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in out.stderr.splitlines() if UNIT.name in line]
    assert out.returncode == 0 and problems == [], out.stderr


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


def test_linux_script_passes_arguments_and_propagates_the_exit_code(tmp_path):
    python = fake_python(
        tmp_path, 'echo "args: $*"\necho "cwd: $(pwd -P)"\necho "oops" >&2\nexit 7'
    )
    out = run_script(tmp_path, "resume.dry_run=true", "a b", python=str(python))
    assert out.returncode == 7
    assert out.stdout == ""  # everything goes to the log
    assert log_lines(tmp_path) == [
        f"resume_at_boot: starting {python} -m so8t_exp.resume resume.dry_run=true a b",
        "args: -m so8t_exp.resume resume.dry_run=true a b",
        f"cwd: {ROOT}",
        "oops",
        "resume_at_boot: exit code 7",
    ]


def test_linux_script_keeps_an_unterminated_last_line(tmp_path):
    python = fake_python(tmp_path, "printf 'last words'")
    assert run_script(tmp_path, python=str(python)).returncode == 0
    assert "last words" in log_lines(tmp_path)


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
