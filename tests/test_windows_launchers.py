"""The Windows launchers under a real cmd.exe and wscript.exe (Wine), started from
C:\\Windows\\System32 as Task Scheduler starts them, in folders with awkward names.

Stood in for (Windows cannot run here): python.exe, py.exe and schtasks.exe, by a tiny MinGW
program that records its arguments, folder and environment and exits with a chosen code.
Wine's cmd.exe differs from Windows' in one way that matters here: it expands ``%`` again
inside ``%~dp0`` and variable values, so a folder with ``%`` is checked only in the XML and
unit tests (real cmd.exe expands once).
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path, PureWindowsPath

import pytest

from so8t_exp.boot.actions import Target, install, remove
from so8t_exp.boot.config import BootConfig
from so8t_exp.boot.task_xml import SYSTEM_SID, parse_task
from tests.wine_harness import build_wine, missing_tools, read_records, win_path

_MISSING = missing_tools()
pytestmark = [
    pytest.mark.slow,  # Wine and subprocesses: ~90 s
    pytest.mark.skipif(_MISSING is not None, reason=f"Wine tests: {_MISSING}"),
]

FOLDERS = {
    "space": "My Projects",
    "ampersand": "R&D",
    "zip-copy": "so8t_exp-main (1)",
    "bang": "wow!",
    "japanese": "学習プロジェクト",
    "all": "R&D (1) 学習! x",
}
STAMPED_ENV = {"PYTHONUNBUFFERED": ["1"], "PYTHONUTF8": ["1"], "SO8T_STAMP_LINES": ["1"]}


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    return build_wine(tmp_path_factory.mktemp("wine"))


@pytest.fixture
def record(tmp_path) -> Path:
    return tmp_path / "record.txt"


def env_of(start: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k.removeprefix("env."): v for k, v in start.items() if k.startswith("env.")}


def boot_log(root: Path) -> str:
    return (root / "logs" / "resume_at_boot.log").read_text(encoding="utf-8")


# -- resume_at_boot.bat, through run_hidden.vbs as the task runs it -----------------------------


@pytest.mark.parametrize("name", FOLDERS.values(), ids=FOLDERS.keys())
def test_task_runs_the_venv_python_in_the_project_from_any_folder(wine, tmp_path, record, name):
    root = wine.make_project(tmp_path, name)
    vbs = root / "launchers" / "windows" / "run_hidden.vbs"
    code = wine.run_vbs(vbs, STANDIN_RECORD=win_path(record), STANDIN_EXIT="7")
    assert code == 7  # the launcher's exit code, through cmd.exe and wscript.exe
    (start,) = read_records(record)
    assert start["exe"] == [win_path(root / ".venv" / "Scripts" / "python.exe")]
    assert start["cwd"] == [win_path(root)]  # not System32, where the task started
    assert start["arg"] == ["-m", "so8t_exp.resume"]
    assert env_of(start) == STAMPED_ENV
    log = boot_log(root)  # appended by the .bat, both streams, non-ASCII intact
    assert "stand-in out: 学習\n" in log and "stand-in err\n" in log


def test_arguments_pass_through_and_the_log_is_appended(wine, tmp_path, record):
    root = wine.make_project(tmp_path, "R&D (1)")
    bat = root / "launchers" / "windows" / "resume_at_boot.bat"
    for _ in range(2):
        code, console = wine.run_bat(bat, "resume.dry_run=true", STANDIN_RECORD=win_path(record))
        assert code == 0 and console == ""  # everything goes to the log
    starts = read_records(record)
    assert [s["arg"] for s in starts] == [["-m", "so8t_exp.resume", "resume.dry_run=true"]] * 2
    assert boot_log(root).count("stand-in out") == 2


def test_the_py_launcher_is_used_without_a_venv(wine, tmp_path, record):
    root = wine.make_project(tmp_path, "no venv & co", venv=False)
    bat = root / "launchers" / "windows" / "resume_at_boot.bat"
    code, _ = wine.run_bat(
        bat, STANDIN_RECORD=win_path(record), STANDIN_EXIT="3", WINEPATH=win_path(wine.bin_dir)
    )
    assert code == 3
    (start,) = read_records(record)
    assert start["exe"] == [win_path(wine.bin_dir / "py.exe")]
    assert start["arg"] == ["-3", "-m", "so8t_exp.resume"]


def test_no_python_is_said_on_the_console_and_in_the_log(wine, tmp_path, record):
    root = wine.make_project(tmp_path, "R&D (1)", venv=False)
    bat = root / "launchers" / "windows" / "resume_at_boot.bat"
    code, console = wine.run_bat(bat, STANDIN_RECORD=win_path(record))
    assert code == 9009 % 256  # Wine hands Linux the low byte of the Windows exit code
    assert read_records(record) == []
    message = f"no Python found: neither {win_path(root)}\\.venv\\Scripts\\python.exe nor"
    assert message in console and "SO8T_PYTHON" in console
    assert message in boot_log(root)


def test_an_unwritable_log_still_runs_and_fails_the_task(wine, tmp_path, record):
    root = wine.make_project(tmp_path, "R&D (1)")
    (root / "logs" / "resume_at_boot.log").mkdir(parents=True)  # a folder: cannot append
    bat = root / "launchers" / "windows" / "resume_at_boot.bat"
    code, console = wine.run_bat(bat, STANDIN_RECORD=win_path(record))
    assert code == 8  # the launcher succeeded, but nothing of it was logged
    assert len(read_records(record)) == 1
    assert "cannot write the log" in console and "stand-in out" in console
    code, _ = wine.run_bat(bat, STANDIN_RECORD=win_path(record), STANDIN_EXIT="4")
    assert code == 4  # the launcher's own failure wins


@pytest.mark.parametrize("quoted", [False, True], ids=["plain", "quoted"])
def test_so8t_python_and_log_dir_override_the_defaults(wine, tmp_path, record, quoted):
    """``set SO8T_PYTHON="C:\\py sp\\python.exe"`` (quotes and all) works as well."""
    root = wine.make_project(tmp_path, "R&D (1)")
    bat = root / "launchers" / "windows" / "resume_at_boot.bat"
    chosen_dir = tmp_path / "py sp"
    chosen_dir.mkdir()
    (chosen_dir / "python.exe").write_bytes((wine.bin_dir / "py.exe").read_bytes())
    logs = tmp_path / "log dir"
    chosen, log_dir = win_path(chosen_dir / "python.exe"), win_path(logs)
    if quoted:
        chosen, log_dir = f'"{chosen}"', f'"{log_dir}"'
    code, console = wine.run_bat(
        bat, STANDIN_RECORD=win_path(record), SO8T_PYTHON=chosen, SO8T_LOG_DIR=log_dir
    )
    assert code == 0 and console == ""
    (start,) = read_records(record)
    assert start["exe"] == [win_path(chosen_dir / "python.exe")]
    assert start["arg"] == ["-m", "so8t_exp.resume"]
    assert "stand-in out" in (logs / "resume_at_boot.log").read_text(encoding="utf-8")


# -- register_boot_task.bat: the same code as `python -m so8t_exp.boot` -------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("", ["install"]),
        ("/startup", ["install", "boot.mode=startup"]),
        ("/print", ["print"]),
        ("/status", ["status"]),
        ("/remove", ["remove"]),
    ],
)
def test_register_bat_calls_the_boot_command(wine, tmp_path, record, args, expected):
    root = wine.make_project(tmp_path, FOLDERS["all"])
    bat = root / "launchers" / "windows" / "register_boot_task.bat"
    code, console = wine.run_bat(bat, args, STANDIN_RECORD=win_path(record), STANDIN_EXIT="1")
    assert code == 1
    (start,) = read_records(record)
    assert start["arg"] == ["-m", "so8t_exp.boot", *expected]
    assert start["cwd"] == [win_path(root)]
    assert "stand-in out: 学習" in console  # shown on the console, not logged


def test_register_bat_refuses_unknown_arguments(wine, tmp_path, record):
    root = wine.make_project(tmp_path, "R&D")
    bat = root / "launchers" / "windows" / "register_boot_task.bat"
    code, console = wine.run_bat(bat, "/bogus", STANDIN_RECORD=win_path(record))
    assert code == 2 and "usage: register_boot_task.bat" in console
    assert read_records(record) == []


# -- the task XML, as schtasks.exe receives it ----------------------------------------------


def schtasks_target(wine, root: Path) -> Target:
    return Target(
        platform="win32", root=root, schtasks=("wine", str(wine.bin_dir / "schtasks.exe"))
    )


@pytest.mark.parametrize("mode", ["logon", "startup"])
def test_install_hands_schtasks_the_xml(wine, tmp_path, record, monkeypatch, capsys, mode):
    root = wine.make_project(tmp_path, FOLDERS["all"])
    monkeypatch.setenv("SO8T_LOG_DIR", str(tmp_path / "logs"))
    for key, value in wine.env(STANDIN_RECORD=win_path(record)).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("USERDOMAIN", "WORKSTATION")
    monkeypatch.setenv("USERNAME", "me")
    assert install(BootConfig(mode=mode), schtasks_target(wine, root)) == 0
    (start,) = read_records(record)
    xml_file = tmp_path / "logs" / "boot" / "so8t_task.xml"
    assert start["arg"] == ["/Create", "/TN", "so8t_exp resume", "/XML", str(xml_file), "/F"]
    handed = Path(f"{record}.xml").read_bytes()
    assert handed.startswith(b"\xff\xfe")  # UTF-16 with its byte-order mark
    task = parse_task(handed)
    assert task["ExecutionTimeLimit"] == "PT0S"
    assert task["DisallowStartIfOnBatteries"] == task["StopIfGoingOnBatteries"] == "false"
    assert task["RunOnlyIfNetworkAvailable"] == "false"
    assert task["Priority"] == "5"
    assert task["RestartOnFailure.Count"] == "3"
    assert task["Command"] == "wscript.exe"
    windows_root = PureWindowsPath(root)  # as it reads on Windows
    vbs = f"{windows_root}\\launchers\\windows\\run_hidden.vbs"
    assert task["Arguments"] == f'//B //Nologo "{vbs}"'
    assert task["WorkingDirectory"] == str(windows_root)
    if mode == "logon":
        assert task["Trigger"] == "LogonTrigger"
        assert task["Trigger.UserId"] == task["UserId"] == "WORKSTATION\\me"
        assert task["LogonType"] == "InteractiveToken"
    else:
        assert task["Trigger"] == "BootTrigger" and task["UserId"] == SYSTEM_SID
    out = capsys.readouterr().out
    assert 'registered Task Scheduler task "so8t_exp resume"' in out
    assert 'schtasks /Query /TN "so8t_exp resume" /XML' in out


def test_a_failing_schtasks_is_reported(wine, tmp_path, record, monkeypatch, capsys):
    root = wine.make_project(tmp_path, "R&D")
    monkeypatch.setenv("SO8T_LOG_DIR", str(tmp_path / "logs"))
    for key, value in wine.env(STANDIN_RECORD=win_path(record), STANDIN_EXIT="1").items():
        monkeypatch.setenv(key, value)
    assert install(BootConfig(), schtasks_target(wine, root)) == 1
    assert "schtasks could not create the task 'so8t_exp resume'" in capsys.readouterr().err


def test_remove_deletes_only_an_existing_task(wine, tmp_path, record, monkeypatch, capsys):
    root = wine.make_project(tmp_path, "R&D")
    for key, value in wine.env(STANDIN_RECORD=win_path(record), STANDIN_EXIT="1").items():
        monkeypatch.setenv(key, value)
    assert remove(BootConfig(), schtasks_target(wine, root)) == 0  # query fails: none there
    assert "nothing removed" in capsys.readouterr().out
    monkeypatch.setenv("STANDIN_EXIT", "0")
    record.unlink()
    assert remove(BootConfig(), schtasks_target(wine, root)) == 0
    query, delete = read_records(record)
    assert query["arg"] == ["/Query", "/TN", "so8t_exp resume", "/XML"]
    assert delete["arg"] == ["/Delete", "/TN", "so8t_exp resume", "/F"]


def test_wines_task_scheduler_reads_the_settings(wine, tmp_path):
    """Wine's own schtasks.exe and Task Scheduler service parse the XML and store the task:
    the settings it understood are read back from its task file."""
    from so8t_exp.boot.task_xml import TaskSpec, task_bytes

    xml_file = tmp_path / "task.xml"
    xml_file.write_bytes(task_bytes(TaskSpec(root="C:\\R&D (1) 学習!", user="PC\\me")))
    out = wine.run(
        ["schtasks.exe", "/Create", "/TN", "so8t check", "/XML", win_path(xml_file), "/F"]
    )
    stored = wine.system32 / "tasks" / "so8t check"
    if out.returncode != 0 or not stored.exists():
        pytest.skip(f"Wine's schtasks did not store the task (rc {out.returncode})")
    # Only the Settings part: Wine writes the description back without escaping its "&".
    text = stored.read_bytes().decode("utf-8-sig")
    part = re.search(r"<Settings>.*</Settings>", text, re.S).group(0)
    settings = {el.tag: el.text for el in ET.fromstring(part)}
    assert settings["ExecutionTimeLimit"] == "PT0S"
    assert settings["DisallowStartIfOnBatteries"] == "false"
    assert settings["StopIfGoingOnBatteries"] == "false"
    assert settings["RunOnlyIfNetworkAvailable"] == "false"
    assert settings["Priority"] == "5"


def test_boot_print_on_windows_shows_the_xml_without_registering(wine, tmp_path, record):
    """``python -m so8t_exp.boot print`` (what ``register_boot_task.bat /print`` runs)."""
    root = wine.make_project(tmp_path, "R&D")
    code = (
        "import sys; from so8t_exp.boot.__main__ import main; from so8t_exp.boot.actions import"
        f" Target; sys.exit(main(['print'], Target(platform='win32', root=__import__('pathlib')"
        f".Path({str(root)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert parse_task(out.stdout.replace("UTF-16", "UTF-8").encode())["Command"] == "wscript.exe"
    assert "R&amp;D" in out.stdout
    assert read_records(record) == []
