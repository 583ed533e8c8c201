"""``python -m so8t_exp.boot``: the systemd unit for any folder name (checked by
``systemd-analyze verify``), install -> status -> remove in a temporary config home, the
Task Scheduler XML, and the launcher's own timestamped boot log."""

from __future__ import annotations

import io
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from so8t_exp.boot.actions import _exec_start
from so8t_exp.boot.boot_log import LineStamper, last_start
from so8t_exp.boot.systemd import UnitSpec, quote_word, unit_text
from so8t_exp.boot.task_xml import SYSTEM_SID, TaskSpec, parse_task, task_bytes, task_xml
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
NAMES = {
    "space": "My Projects",
    "ampersand": "R&D proj",
    "percent": "100% done %h",
    "quotes": 'say "hi" it\'s',
    "dollar": "$HOME ${USER}",
    "backslash": "back\\slash",
    "japanese": "学習プロジェクト",
    "zip-copy": "so8t_exp-main (1)",
}


def python_in(root: Path) -> Path:
    """A real interpreter at ``<root>/.venv/bin/python`` (``verify`` checks it exists)."""
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    return python


# -- the unit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_unit_names_the_folder_exactly(tmp_path, name):
    root = tmp_path / name
    python = python_in(root)
    text = unit_text(UnitSpec(root=root, python=str(python)))
    assert f"WorkingDirectory={str(root).replace('%', '%%')}\n" in text
    assert shlex.split(_exec_start(text)) in (
        [str(python), "-m", "so8t_exp.resume"],
        ["/usr/bin/env", str(python), "-m", "so8t_exp.resume"],  # quotes: systemd refuses them
    )
    log = str(root / "logs" / "resume_at_boot.log").replace("%", "%%")
    assert f"StandardOutput=append:{log}\n" in text


@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_unit_verifies(tmp_path, name):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    root = tmp_path / name
    unit = tmp_path / "so8t-resume.service"
    unit.write_text(unit_text(UnitSpec(root=root, python=str(python_in(root)))))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in out.stderr.splitlines() if unit.name in line]
    assert out.returncode == 0 and problems == [], out.stderr


def test_quote_word_escapes_what_systemd_would_read():
    assert quote_word('a "b" \\ 50% $X') == '"a \\"b\\" \\\\ 50%% $$X"'
    assert quote_word("$X", variables=False) == '"$X"'
    with pytest.raises(ValueError, match="line break"):
        quote_word("a\nb")


# -- install -> status -> remove ----------------------------------------------------------------


def boot(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(
        tmp_path,
        XDG_CONFIG_HOME=str(tmp_path / "config home"),
        SO8T_LOG_DIR=str(tmp_path / "logs"),
    )
    return subprocess.run(
        [sys.executable, "-m", "so8t_exp.boot", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_install_status_remove_round_trip(tmp_path, store):
    unit = tmp_path / "config home" / "systemd" / "user" / "so8t-resume.service"
    status = boot(tmp_path, "status", f"tracking.uri={store}")
    assert status.returncode == 0, status.stderr
    assert "boot task: not installed" in status.stdout
    assert "last start: none logged" in status.stdout

    out = boot(tmp_path, "install")
    assert out.returncode == 0, out.stderr
    assert unit.read_text() == boot(tmp_path, "print").stdout
    assert f"wrote {unit}" in out.stdout
    assert f"  with SO8T_EXP_HOME={tmp_path} (from this shell)" in out.stdout
    environment = next(x for x in unit.read_text().splitlines() if x.startswith("Environment="))
    assert quote_word(f"SO8T_EXP_HOME={tmp_path}") in environment  # the boot run's store
    if "no systemd user manager answered" in out.stdout:  # a container, CI
        assert "systemctl --user enable so8t-resume.service" in out.stdout
        assert "loginctl enable-linger" in out.stdout
    else:
        assert "enabled so8t-resume.service" in out.stdout

    log = tmp_path / "logs" / "resume_at_boot.log"
    log.write_text(
        "[2026-12-01 08:00:00] resume_at_boot: starting /x/python -m so8t_exp.resume\n"
        "[2026-12-01 08:00:05] resume_at_boot: exit code 0\n"
        "[2026-12-02 08:00:00] resume_at_boot: starting /x/python -m so8t_exp.resume\n"
        "[2026-12-02 09:30:00] resume_at_boot: exit code 4\n"
    )
    status = boot(tmp_path, "status", f"tracking.uri={store}")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert f"boot task: installed ({unit})" in lines
    assert f"  runs: {shlex.join([sys.executable, '-m', 'so8t_exp.resume'])}" in lines
    assert "last start: 2026-12-02 08:00:00, ended 2026-12-02 09:30:00 with exit code 4" in lines
    assert "dry run: nothing to resume" in lines
    assert "differs" not in status.stdout

    assert (
        boot(tmp_path, "status", "boot.delay_seconds=5", f"tracking.uri={store}").stdout.count(
            "differs from what `install` would write now"
        )
        == 1
    )

    out = boot(tmp_path, "remove")
    assert out.returncode == 0 and f"removed {unit}" in out.stdout
    assert not unit.exists()
    again = boot(tmp_path, "remove")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frobnicate"], "unknown action 'frobnicate'"),
        (["install", "extra"], "unexpected 'extra'"),
        (
            ["install", "boot.mode=sometimes"],
            "boot.mode='sometimes': must be one of logon, startup",
        ),
        (["install", "boot.delay=1"], "boot.delay"),
        (["install", "boot.mode=startup"], "loginctl enable-linger"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    out = boot(tmp_path, *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "config home").exists()  # nothing written


# -- the Task Scheduler XML ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [*NAMES.values(), "a!b%PATH%c"], ids=[*NAMES.keys(), "bang"])
def test_task_xml_carries_any_folder_name(name):
    root = f"C:\\Users\\me\\{name}".replace("/", "\\")
    task = parse_task(task_bytes(TaskSpec(root=root, user="PC\\me")))
    assert task["Arguments"] == f'//B //Nologo "{root}\\launchers\\windows\\run_hidden.vbs"'
    assert task["WorkingDirectory"] == root


def test_task_xml_settings_keep_a_multi_day_run_going():
    task = parse_task(task_xml(TaskSpec(root="C:\\p", user="PC\\me")).replace("UTF-16", "UTF-8"))
    assert task["ExecutionTimeLimit"] == "PT0S"  # schtasks' default stops it after 72 h
    assert task["DisallowStartIfOnBatteries"] == task["StopIfGoingOnBatteries"] == "false"
    assert task["Priority"] == "5"  # normal, not schtasks' below-normal 7
    assert task["RunOnlyIfNetworkAvailable"] == "false"
    assert (task["RestartOnFailure.Count"], task["RestartOnFailure.Interval"]) == ("3", "PT5M")
    assert task["Trigger"] == "LogonTrigger" and task["Trigger.UserId"] == "PC\\me"
    assert task["Trigger.Delay"] == "PT30S"
    startup = parse_task(task_bytes(TaskSpec(root="C:\\p", mode="startup", restart_count=0)))
    assert startup["Trigger"] == "BootTrigger" and startup["UserId"] == SYSTEM_SID
    assert "RestartOnFailure.Count" not in startup


# -- the launcher's timestamps ------------------------------------------------------------------


def test_line_stamper_writes_whole_stamped_lines():
    sink = io.StringIO()
    out = LineStamper(sink)
    out.write("one\ntw")
    out.write("o\r\nbar 10%\rbar 100%\nlast words")
    out.close()
    lines = sink.getvalue().splitlines()
    assert [line[22:] for line in lines] == ["one", "two", "bar 100%", "last words"]
    assert all(line[0] == "[" and line[20:22] == "] " for line in lines)


def test_stdout_and_stderr_lines_never_mix_in_the_log():
    sink = io.StringIO()  # the log: stdout and stderr both go to it
    streams = {"a": LineStamper(sink), "b": LineStamper(sink)}

    def write(letter: str) -> None:
        for _ in range(500):
            streams[letter].write(letter * 3)  # half a line, then the rest
            streams[letter].write(letter * 3 + "\n")

    threads = [threading.Thread(target=write, args=(x,)) for x in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = [line[22:] for line in sink.getvalue().splitlines()]
    assert sorted(lines) == ["aaaaaa"] * 500 + ["bbbbbb"] * 500


def test_last_start_reads_the_newest_start_and_its_end(tmp_path):
    log = tmp_path / "boot.log"
    assert last_start(log) is None
    log.write_text(
        "[2026-12-01 08:00:00] resume_at_boot: starting py -m so8t_exp.resume\n"
        "[2026-12-01 08:00:01] some output\n"
        "garbage without a stamp\n"
        "[2026-12-01 09:00:00] resume_at_boot: exit code 130\n"
        "[2026-12-02 08:00:00] resume_at_boot: starting py -m so8t_exp.resume resume.all=true\n"
    )
    last = last_start(log)
    assert (last.started, last.command, last.ended) == (
        "2026-12-02 08:00:00",
        "py -m so8t_exp.resume resume.all=true",
        None,
    )
    with log.open("a") as fh:
        fh.write("[2026-12-02 08:10:00] resume_at_boot: exit code 0\n")
    assert last_start(log).exit_code == 0
    with log.open("a", encoding="utf-8") as fh:  # the .bat's own line: cmd's %DATE% %TIME%
        fh.write("[Thu 12/03/2026 14:00:00.12] resume_at_boot: error: no Python found: ...\n")
    last = last_start(log)
    assert last.started == "Thu 12/03/2026 14:00:00.12" and "no Python found" in last.error


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """``... | head -1`` (pipe_safe, as `sessions` and `boot` use it): a real closed pipe,
    written past its buffer, ends with 141 and no BrokenPipeError traceback."""
    code = (
        "import sys; from so8t_exp.cli_errors import pipe_safe; "
        "sys.exit(pipe_safe(lambda: print('x' * 4_000_000) or 0))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(tmp_path),
    )
    proc.stdout.read(10)
    proc.stdout.close()  # as `head -c 10` does
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and "Traceback" not in err, err
