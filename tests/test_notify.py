"""Notifiers against real parts: a local HTTP server, real player subprocesses, real WAV files.

Only ``winsound`` cannot run here: for Windows just the back-end selection is tested.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

import so8t_exp.config  # noqa: F401  (registers the Hydra schemas that compose_cfg needs)
from so8t_exp.notify import (
    ConsoleNotifier,
    Notifiers,
    SoundNotifier,
    WebhookNotifier,
    play,
    sound_backend,
)
from so8t_exp.tracking import flatten, mask_secrets
from tests.conftest import only_run, run_train, subprocess_env

# -- a real webhook receiver ----------------------------------------------------------------


@pytest.fixture
def hook(monkeypatch):
    """A ThreadingHTTPServer on 127.0.0.1; answers each POST with the next of ``statuses``
    (200 once they run out) and records path, headers and body."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    requests: list[SimpleNamespace] = []
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            requests.append(SimpleNamespace(path=self.path, headers=self.headers, body=body))
            self.send_response(statuses.pop(0) if statuses else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield SimpleNamespace(
        url=f"http://127.0.0.1:{server.server_port}", requests=requests, statuses=statuses
    )
    server.shutdown()
    server.server_close()
    thread.join(5)


def closed_port_url(secret: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/services/{secret}/hook?token={secret}-q"


def test_webhook_posts_json_for_slack_discord_and_scripts(hook):
    WebhookNotifier(url=f"{hook.url}/hook").notify("finished", "run abc: 2 steps")
    [req] = hook.requests
    assert req.path == "/hook"
    assert req.headers["Content-Type"] == "application/json"
    body = json.loads(req.body)
    assert body["text"] == body["content"] == "[so8t_exp] finished: run abc: 2 steps"
    assert body["event"] == "finished"
    assert body["message"] == "run abc: 2 steps"


def test_webhook_retries_server_errors_until_success(hook, caplog):
    hook.statuses[:] = [500, 500]
    with caplog.at_level(logging.WARNING, "so8t_exp.notify"):
        WebhookNotifier(url=f"{hook.url}/hook", retries=3).notify("failed", "boom")
    assert len(hook.requests) == 3
    assert [json.loads(r.body)["event"] for r in hook.requests] == ["failed"] * 3
    assert sum("attempt" in r.getMessage() for r in caplog.records) == 2


def test_webhook_stops_after_retries_attempts(hook):
    hook.statuses[:] = [500, 500, 500]
    WebhookNotifier(url=f"{hook.url}/hook", retries=1).notify("failed", "boom")
    assert len(hook.requests) == 1


def test_webhook_unreachable_logs_warnings_without_the_url(caplog):
    secret = "T0KEN-" + uuid.uuid4().hex
    with caplog.at_level(logging.DEBUG):
        WebhookNotifier(url=closed_port_url(secret), retries=2, timeout=2).notify("started", "m")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("started" in r.getMessage() for r in warnings)
    assert secret not in caplog.text
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_webhook_does_not_sleep_after_the_last_attempt():
    start = time.monotonic()
    WebhookNotifier(url=closed_port_url("x"), retries=1, timeout=2).notify("started", "m")
    assert time.monotonic() - start < 0.3


def test_webhook_url_from_environment_variable(hook, monkeypatch):
    monkeypatch.setenv("SO8T_TEST_HOOK_URL", f"{hook.url}/from-env")
    WebhookNotifier(url_env="SO8T_TEST_HOOK_URL").notify("resumed", "m")
    assert [r.path for r in hook.requests] == ["/from-env"]


def test_webhook_sends_only_configured_events(hook):
    notifier = WebhookNotifier(url=f"{hook.url}/hook", events=["finished", "failed"])
    for event in ("started", "checkpoint_failed", "finished"):
        notifier.notify(event, "m")
    assert [json.loads(r.body)["event"] for r in hook.requests] == ["finished"]


def test_webhook_without_url_warns_and_sends_nothing(hook, monkeypatch, caplog):
    monkeypatch.delenv("SO8T_TEST_UNSET_URL", raising=False)
    with caplog.at_level(logging.WARNING, "so8t_exp.notify"):
        WebhookNotifier(url_env="SO8T_TEST_UNSET_URL").notify("finished", "m")
    assert "no URL" in caplog.text and "finished" in caplog.text
    assert hook.requests == []


# -- fan-out ----------------------------------------------------------------------------------


class Raising:
    def notify(self, event: str, message: str) -> None:
        raise RuntimeError("notifier down")


class Recording:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def notify(self, event: str, message: str) -> None:
        self.seen.append((event, message))


def test_a_raising_notifier_does_not_stop_the_others(caplog):
    first, last = Recording(), Recording()
    notify = Notifiers({"first": first, "broken": Raising(), "last": last})
    with caplog.at_level(logging.WARNING, "so8t_exp.notify"):
        notify("finished", "done")
    assert first.seen == last.seen == [("finished", "done")]
    assert "broken" in caplog.text and "RuntimeError" in caplog.text


def test_console_notifier_writes_one_line_to_stderr(capsys):
    ConsoleNotifier(prefix="[x]").notify("given_up", "run r")
    assert capsys.readouterr().err == "[x] given_up: run r\n"


# -- sound ------------------------------------------------------------------------------------


def write_wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 400)
    return path


@pytest.fixture
def player(tmp_path, monkeypatch):
    """Put an executable ``paplay`` (a shell script) first on PATH; returns a function that
    (re)writes it with a given exit code and the file it appends its argv to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    record = tmp_path / "paplay.args"

    def make(code: int = 0, shebang: str = "#!/bin/sh") -> Path:
        script = bin_dir / "paplay"
        # Sleeps first: the record exists after play() returns only if play waited.
        script.write_text(f'{shebang}\nsleep 0.2\nprintf "%s\\n" "$@" >> "{record}"\nexit {code}\n')
        script.chmod(0o755)
        return record

    return make


def test_sound_backend_on_windows_is_winsound():
    # winsound itself (a Windows API) cannot run here: only the selection is tested.
    assert sound_backend("win32", which=lambda name: f"/usr/bin/{name}") == "winsound"


def test_sound_backend_on_linux_picks_an_installed_player():
    only_aplay = {"aplay": "/usr/bin/aplay"}
    both = {"aplay": "/usr/bin/aplay", "paplay": "/usr/bin/paplay"}
    assert sound_backend("linux", which=only_aplay.get) == "aplay"
    assert sound_backend("linux", which=both.get) == "paplay"
    assert sound_backend("linux", which=lambda name: None) == "bell"


def test_play_runs_the_player_synchronously(tmp_path, player):
    record = player()
    wav = write_wav(tmp_path / "done.wav")
    assert play(wav) == "paplay"
    assert record.read_text().splitlines() == [str(wav)]


def test_play_falls_back_to_the_bell_when_the_player_fails(tmp_path, player, capsys):
    record = player(code=1)
    assert play(write_wav(tmp_path / "done.wav")) == "bell"
    assert record.is_file()  # it was tried
    assert capsys.readouterr().err == "\a"


def test_play_missing_wav_rings_the_bell_without_the_player(tmp_path, player, capsys):
    record = player()
    assert play(tmp_path / "missing.wav") == "bell"
    assert play(None) == "bell"
    assert not record.exists()
    assert capsys.readouterr().err == "\a\a"


def test_play_falls_back_to_the_bell_when_the_player_cannot_start(tmp_path, player, capsys):
    player(shebang="#!/nonexistent/interpreter")  # on PATH and executable, but exec fails
    assert play(write_wav(tmp_path / "done.wav")) == "bell"
    assert capsys.readouterr().err == "\a"


def test_sound_notifier_plays_only_for_its_events(tmp_path, player):
    record = player()
    wav = write_wav(tmp_path / "done.wav")
    notifier = SoundNotifier(wav=str(wav), events=["finished"])
    notifier.notify("started", "m")
    assert not record.exists()
    notifier.notify("finished", "m")
    assert record.read_text().splitlines() == [str(wav)]


# -- secrets ----------------------------------------------------------------------------------


def test_webhook_url_is_masked_in_params(compose_cfg):
    secret = "T0KEN-" + uuid.uuid4().hex
    cfg = compose_cfg("notify=webhook", f"notify.notifiers.webhook.url=https://hooks.x/{secret}")
    masked = mask_secrets(flatten(OmegaConf.to_container(cfg.notify), "notify"))
    assert masked["notify.notifiers.webhook.url"] == "***"
    assert masked["notify.notifiers.webhook.timeout"] == "5.0"
    assert masked["notify.notifiers.webhook._target_"] == "so8t_exp.notify.WebhookNotifier"
    assert not any(secret in value for value in masked.values())


# -- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_posts_started_and_finished_and_never_records_the_url(tmp_path, store, hook):
    secret = "T0KEN-" + uuid.uuid4().hex
    url = f"{hook.url}/services/{secret}"
    run_dir = tmp_path / "run"
    out = run_train(
        tmp_path,
        store,
        run_dir,
        "+experiment=smoke",
        "trainer.max_steps=2",
        "notify=webhook",
        env=subprocess_env(tmp_path, SO8T_WEBHOOK_URL=url),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    bodies = [json.loads(r.body) for r in hook.requests]
    assert [b["event"] for b in bodies] == ["started", "finished"]
    assert {r.path for r in hook.requests} == {f"/services/{secret}"}
    client, run = only_run(store)
    assert run.info.run_id in bodies[-1]["message"]
    assert run.data.params["notify.notifiers.webhook._target_"] == "so8t_exp.notify.WebhookNotifier"
    assert not any(secret in v for v in [*run.data.params.values(), *run.data.tags.values()])
    assert secret not in out.stdout + out.stderr
    files = [p for p in [*run_dir.rglob("*"), *(tmp_path / "mlruns").rglob("*")] if p.is_file()]
    assert any(p.suffix == ".log" for p in files)  # the run's own log is among them
    leaked = [p for p in files if secret.encode() in p.read_bytes()]
    assert leaked == []
