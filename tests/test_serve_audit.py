"""The serving audit log (a real sqlite file) and the ``serve.*`` config checks."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import so8t_exp.serve.__main__  # noqa: F401  (registers serve_schema)
from so8t_exp.config import ConfigError
from so8t_exp.paths import config_dir
from so8t_exp.serve.audit import AuditLog, AuditRecord
from so8t_exp.serve.config import AuditConfig, LabelPolicy, ServeConfig, check


def record(i: int = 0, **extra) -> AuditRecord:
    return AuditRecord(request_id=f"r{i}", endpoint="/think", status=200, latency_ms=1.0, **extra)


def rows(path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(
            "SELECT request_id, prompt, client_hash FROM audit ORDER BY seq"
        ).fetchall()
    finally:
        db.close()


def test_rows_are_committed_and_the_prompt_is_kept_only_when_asked(tmp_path):
    log = AuditLog(AuditConfig(path=str(tmp_path / "a.db")))
    log.write(record(1, prompt="the query", client_hash=log.client_hash("10.0.0.1")))
    assert rows(tmp_path / "a.db")[0][:2] == ("r1", None)  # read by another connection
    log.close()
    kept = AuditLog(AuditConfig(path=str(tmp_path / "b.db"), log_prompt=True))
    kept.write(record(2, prompt="the query"))
    assert rows(tmp_path / "b.db")[0][1] == "the query"


def test_client_hash_is_salted_and_stable_across_restarts(tmp_path):
    cfg = AuditConfig(path=str(tmp_path / "a.db"))
    first = AuditLog(cfg).client_hash("10.0.0.1")
    again = AuditLog(cfg).client_hash("10.0.0.1")
    other = AuditLog(AuditConfig(path=str(tmp_path / "other" / "a.db"))).client_hash("10.0.0.1")
    assert first == again != other  # another log has another salt
    if os.name == "posix":
        assert (tmp_path / "a.db.salt").stat().st_mode & 0o077 == 0


def test_update_and_delete_are_refused(tmp_path):
    log = AuditLog(AuditConfig(path=str(tmp_path / "a.db")))
    log.write(record())
    db = sqlite3.connect(tmp_path / "a.db")
    for sql in ("UPDATE audit SET status = 500", "DELETE FROM audit"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(sql)
    assert db.execute("SELECT status FROM audit").fetchall() == [(200,)]


def test_rotation_by_size_starts_a_new_file_and_loses_no_row(tmp_path):
    log = AuditLog(AuditConfig(path=str(tmp_path / "a.db"), rotate_mb=0.02))
    for i in range(300):
        log.write(record(i, reason="x" * 200))
    log.close()
    files = sorted(tmp_path.glob("a*.db"))
    assert len(files) >= 3 and ":" not in "".join(f.name for f in files)  # Windows names
    ids = [r[0] for f in files for r in rows(f)]
    assert sorted(ids, key=lambda s: int(s[1:])) == [f"r{i}" for i in range(300)]
    rotated = [f for f in files if f.name != "a.db"]
    assert all(not f.with_name(f.name + "-wal").exists() for f in rotated)  # complete alone


def test_rotation_by_age_and_retention(tmp_path):
    cfg = AuditConfig(path=str(tmp_path / "a.db"), rotate_days=1, retention_days=30)
    log = AuditLog(cfg)
    log.write(record(0))
    log._born -= 2 * 86400  # the current file was begun two days ago
    log.write(record(1))
    log.close()
    [rotated] = sorted(tmp_path.glob("a-*.db"))
    assert [r[0] for r in rows(rotated)] == ["r0"] and [r[0] for r in rows(tmp_path / "a.db")] == [
        "r1"
    ]
    old = time.time() - 40 * 86400
    os.utime(rotated, (old, old))
    AuditLog(cfg).close()  # retention is applied at start (and at each rotation check)
    assert not rotated.exists()


def test_keep_files_bounds_the_rotated_files(tmp_path):
    log = AuditLog(AuditConfig(path=str(tmp_path / "a.db"), rotate_mb=0.02, keep_files=2))
    for i in range(400):
        log.write(record(i, reason="x" * 200))
    log.close()
    assert len(list(tmp_path.glob("a-*.db"))) == 2


def test_one_server_per_audit_log(tmp_path):
    first = AuditLog(AuditConfig(path=str(tmp_path / "a.db")))
    with pytest.raises(ConfigError, match="another running server"):
        AuditLog(AuditConfig(path=str(tmp_path / "a.db")))
    first.close()
    AuditLog(AuditConfig(path=str(tmp_path / "a.db"))).close()  # free again


def test_retention_touches_only_this_logs_rotated_files(tmp_path):
    others = ["audit-eu.db", "audit-eu-20260101T000000000000Z.db", "audit-notes-1.db"]
    mine = tmp_path / "audit-20260101T000000000000Z.db"
    old = time.time() - 40 * 86400
    for path in [*(tmp_path / n for n in others), mine]:
        path.write_text("x")
        os.utime(path, (old, old))
    AuditLog(AuditConfig(path=str(tmp_path / "audit.db"), retention_days=30)).close()
    assert not mine.exists()
    assert all((tmp_path / n).exists() for n in others)  # another log's, or not a log


def test_writes_from_many_threads(tmp_path):
    log = AuditLog(AuditConfig(path=str(tmp_path / "a.db")))
    threads = [
        threading.Thread(target=lambda k=k: [log.write(record(k * 100 + i)) for i in range(50)])
        for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rows(tmp_path / "a.db")) == 200


def compose_serve(*overrides: str) -> ServeConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("serve", overrides=["serve.model=x", *overrides])
    return OmegaConf.to_object(cfg.serve)


def test_the_shipped_config_passes_its_checks():
    cfg = compose_serve()
    check(cfg)
    assert set(cfg.policy) == {"ALLOW", "ESCALATION", "DENY", "REFUSE"}
    assert "{query}" in cfg.prompt.template and "<final>" in cfg.prompt.template


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("serve.prompt.template=hello", "serve.prompt.template"),
        ("serve.policy.REFUSE.action=drop", "serve.policy.REFUSE.action"),
        ("serve.policy.REFUSE.text=''", "serve.policy.REFUSE.text"),
        ("serve.limits.max_concurrent=0", "serve.limits.max_concurrent"),
        ("serve.limits.default_max_new_tokens=600", "serve.limits.default_max_new_tokens"),
        ("serve.device=tpu", "serve.device"),
        ("serve.dtype=int4", "serve.dtype"),
        ("serve.port=70000", "serve.port"),
        ("serve.prompt.thinking_prefixes=[]", "serve.prompt.thinking_prefixes is empty"),
        ("serve.prompt.thinking_prefixes=['<think']", "serve.prompt.thinking_prefixes[0]"),
        ("serve.prompt.final_tag=thinking", "serve.prompt.final_tag"),
        ("serve.prompt.final_tag=''", "serve.prompt.final_tag"),
    ],
)
def test_bad_values_name_their_key(override, names):
    """(A label that does not exist, e.g. serve.policy.MAYBE, is refused by the schema
    itself when composing: see test_unknown_label_is_refused.)"""
    with pytest.raises(ConfigError, match=re.escape(names)):
        check(compose_serve(override))


def test_unknown_label_is_refused():
    cfg = compose_serve()
    cfg.policy["MAYBE"] = LabelPolicy()
    with pytest.raises(ConfigError, match=r"serve\.policy: \['MAYBE'\]"):
        check(cfg)


@pytest.mark.slow
def test_an_audit_log_that_cannot_be_written_gives_503_not_an_answer(tmp_path):
    """The app in this process on a real socket; the log's folder is then unusable (its
    path points into a folder that does not exist: sqlite itself fails to open it)."""
    import http.client
    import json
    import socket

    import uvicorn

    from so8t_exp.serve.app import create_app
    from so8t_exp.serve.engine import Engine
    from so8t_exp.serve.source import resolve
    from so8t_exp.serve.think import ThinkService
    from tests.serve_support import make_export

    served = resolve(str(make_export(tmp_path / "export")), None, str(tmp_path))
    cfg = compose_serve(f"serve.audit.path={tmp_path / 'audit.db'}")
    audit = AuditLog(cfg.audit)
    app = create_app(ThinkService(Engine(served.folder, "cpu"), cfg), audit, served, cfg.limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def ask(path: str = "/think") -> tuple[int, dict]:
        conn = http.client.HTTPConnection(*sock.getsockname(), timeout=60)
        body = json.dumps({"query": "How do I reset my password?", "max_new_tokens": 2})
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    try:
        while not server.started:
            time.sleep(0.05)
        assert ask()[0] == 200
        audit._db.close()  # (the lock on the path stays: the log is still ours)
        audit._db = None
        audit.path = tmp_path / "gone" / "audit.db"
        for path in ("/think", "/think/stream"):
            status, body = ask(path)
            assert status == 503 and "audit log cannot be written" in body["error"]["reason"]
            assert "answer" not in body
    finally:
        server.should_exit = True
        thread.join(10)
