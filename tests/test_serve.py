"""``python -m so8t_exp.serve`` end to end: a real server process on 127.0.0.1, called over
HTTP. Tagged outputs come from ``ScriptedEngine`` — the real tiny model runs every step,
its chosen token is replaced by a given transcript's — so each leak case is exact: the
thinking is marked (SECRET, 秘密) and must appear in no response, stream or audit row."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import threading
import time

import pytest

from tests.conftest import subprocess_env
from tests.serve_support import Server, make_export

pytestmark = pytest.mark.slow

THINK = "<think-logic>SECRET logic 秘密</think-logic>\n<think-ethics>SECRET ethics</think-ethics>\n"
SCRIPT = {
    "tagged": {"output": THINK + "<final>\nThe answer is 42.\n</final>", "label": "ALLOW"},
    "after": {
        "output": "<final>Short.</final><think-creative>SECRET after</think-creative>",
        "label": "ALLOW",
    },
    "nested": {
        "output": "<FINAL>ok <Think-Practical>SECRET inside</THINK-practical> done</Final >",
        "label": "ALLOW",
    },
    "unclosed": {"output": "<think-logic>SECRET never closed <final>SECRET", "label": "ALLOW"},
    "truncated": {"output": THINK + "<final>cut off before the closing tag", "label": "ALLOW"},
    "untagged": {"output": "SECRET plain text with no sections", "label": "ALLOW"},
    "refuse": {"output": THINK + "<final>SECRET harmful</final>", "label": "REFUSE"},
    "escalate": {"output": "<final>SECRET</final>", "label": "ESCALATION"},
    "deny": {"output": THINK + "<final>Here is a safe part.</final>", "label": "DENY"},
    "attrs": {
        "output": '<final>A <think mode="x">SECRET attr</think> B<think/></final>',
        "label": "ALLOW",
    },
    "slow": {"output": "<think-logic>" + "SECRET " * 400, "label": "ALLOW", "delay_s": 0.04},
}
DENY_PREFIX = "Careful: this touches a policy."


def thinking_of(output: str) -> bytes:
    """What the server hashes: the text inside thinking sections, tags excluded."""
    import re

    return "".join(re.findall(r"<think-[a-z]+>(.*?)</think-[a-z]+>", output, re.S)).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    export = make_export(tmp / "export")
    (tmp / "script.json").write_text(json.dumps(SCRIPT, ensure_ascii=False), encoding="utf-8")
    srv = Server(
        tmp,
        subprocess_env(tmp),
        f"serve.model={export}",
        f"serve.audit.path={tmp / 'audit' / 'audit.db'}",
        "serve.engine._target_=so8t_exp.serve.engine.ScriptedEngine",
        f"+serve.engine.script_file={tmp / 'script.json'}",
        "serve.limits.max_concurrent=2",
        "serve.limits.timeout_s=5",
        "serve.limits.max_new_tokens=300",
        "serve.limits.max_body_bytes=16384",
        "serve.limits.max_query_chars=1000",
        "serve.policy.DENY.action=prefix",
        f"serve.policy.DENY.text='{DENY_PREFIX}'",
    )
    srv.audit = tmp / "audit" / "audit.db"
    yield srv
    code = srv.stop()  # uvicorn shuts down gracefully, then ends by the signal it got
    assert code in (0, -signal.SIGTERM), srv.output()[-2000:]
    assert "Application shutdown complete" in srv.output()


def audit_rows(server) -> list[dict]:
    db = sqlite3.connect(server.audit)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY seq")]
    finally:
        db.close()


def row_of(server, request_id: str) -> dict:
    [row] = [r for r in audit_rows(server) if r["request_id"] == request_id]
    return row


def no_secret(*texts) -> None:
    for text in texts:
        text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        assert "SECRET" not in text and "秘密" not in text, text


def test_health_names_the_model(server):
    status, body, _ = server.call("GET", "/health")
    assert status == 200
    assert body["status"] == "ok" and body["model"] == "export"
    assert body["version"] == "untrained" and body["safety_labels"][3] == "REFUSE"


def test_answer_is_the_final_section_only_and_the_thinking_is_hashed(server):
    status, body = server.think({"query": "tagged"}, **{"X-Client-Id": "alice"})
    assert status == 200, body
    no_secret(body)
    assert body["answer"] == "The answer is 42."
    assert body["safety_label"] == "ALLOW" and body["answer_complete"] is True
    assert body["finish_reason"] == "final" and body["flags"] == []
    assert (body["model"], body["model_version"]) == ("export", "untrained")
    thinking = thinking_of(SCRIPT["tagged"]["output"])
    assert body["internal_reasoning_hash"] == hashlib.sha256(thinking).hexdigest()
    row = row_of(server, body["request_id"])
    assert row["status"] == 200 and row["thinking_sha256"] == body["internal_reasoning_hash"]
    assert row["thinking_bytes"] == len(thinking) and row["safety_label"] == "ALLOW"
    assert row["model_name"] == "export" and row["model_version"] == "untrained"
    assert row["prompt"] is None and len(row["client_hash"]) == 64
    assert row["client_hash"] != hashlib.sha256(b"alice").hexdigest()  # salted
    again = server.think({"query": "tagged"}, **{"X-Client-Id": "alice"})[1]
    assert row_of(server, again["request_id"])["client_hash"] == row["client_hash"]


def test_stream_sends_only_answer_text(server):
    status, events, raw = server.stream({"query": "tagged"})
    assert status == 200
    no_secret(raw.decode())
    kinds = [e for e, _ in events]
    assert kinds[0] == "label" and kinds[-1] == "done" and "answer" in kinds
    text = "".join(d["text"] for e, d in events if e == "answer")
    done = events[-1][1]
    assert text == done["answer"] == "The answer is 42."
    assert (
        done["internal_reasoning_hash"]
        == hashlib.sha256(thinking_of(SCRIPT["tagged"]["output"])).hexdigest()
    )


@pytest.mark.parametrize(
    ("query", "answer", "flags", "complete"),
    [
        ("after", "Short.", [], True),
        ("nested", "ok  done", [], True),
        ("unclosed", "", ["no_final"], False),
        ("truncated", "", ["final_truncated"], False),
        ("untagged", "", ["no_final"], False),
        ("attrs", "A  B", [], True),
    ],
)
def test_leak_cases(server, query, answer, flags, complete):
    status, body = server.think({"query": query})
    assert status == 200, body
    no_secret(body)
    assert (body["answer"], body["flags"], body["answer_complete"]) == (answer, flags, complete)
    _, events, raw = server.stream({"query": query})
    no_secret(raw.decode())
    assert events[-1][1]["answer"] == answer
    streamed = "".join(d["text"] for e, d in events if e == "answer")
    # An unclosed answer was streamed as it came (it was answer text); the end says so.
    assert streamed == ("cut off before the closing tag" if query == "truncated" else answer)
    assert events[-1][1]["answer_complete"] is complete


def test_max_new_tokens_cuts_the_answer_to_nothing(server):
    status, body = server.think({"query": "tagged", "max_new_tokens": 40})
    assert status == 200
    assert body["answer"] == "" and body["finish_reason"] == "length"
    assert body["generated_tokens"] == 40 and body["flags"] in (["final_truncated"], ["no_final"])


@pytest.mark.parametrize(
    ("query", "label", "answer"),
    [
        ("refuse", "REFUSE", "I can't help with that."),
        (
            "escalate",
            "ESCALATION",
            "This request needs a qualified person's judgement; it has been escalated for "
            "human review.",
        ),
        ("deny", "DENY", f"{DENY_PREFIX}\n\nHere is a safe part."),
    ],
)
def test_policy_per_label(server, query, label, answer):
    status, body = server.think({"query": query})
    assert status == 200, body
    assert (body["safety_label"], body["answer"]) == (label, answer)
    if label != "DENY":  # replaced: nothing was generated
        assert body["generated_tokens"] == 0 and body["policy_action"] == "replace"
    _, events, raw = server.stream({"query": query})
    no_secret(raw.decode())
    assert "".join(d["text"] for e, d in events if e == "answer").strip() == answer


def test_a_query_not_scripted_runs_the_real_model(server):
    status, body = server.think({"query": "How do I reset my password?", "max_new_tokens": 8})
    assert status == 200
    tiny = {"query": "How do I reset my password?", "temperature": 1e-300, "max_new_tokens": 4}
    assert server.think(tiny)[0] == 200  # 1e-300 is 0 in float32: no 0/0
    assert body["safety_label"] in ("ALLOW", "ESCALATION", "DENY", "REFUSE")
    assert 0 < body["safety_confidence"] <= 1


BAD = [
    (b"not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"max_new_tokens": 5}', 422, "query: Field required"),
    (b'{"query": "x", "max_tokens": 5}', 422, "max_tokens: Extra inputs"),
    (b'{"query": "x", "max_new_tokens": 301}', 422, "max_new_tokens=301: 1..300"),
    (b'{"query": "x", "max_new_tokens": 0}', 422, "max_new_tokens=0"),
    (b'{"query": "x", "temperature": -1}', 422, "temperature=-1.0"),
    (b'{"query": "x", "top_p": 0}', 422, "top_p=0.0"),
    (b'{"query": "   "}', 422, "query is empty"),
    (b'{"query": 5}', 422, "query: Input should be a valid string"),
    (json.dumps({"query": "x" * 1001}).encode(), 422, "max_query_chars=1000"),
    (json.dumps({"query": "x" * 20000}).encode(), 413, "max_body_bytes=16384"),
    (b"\xff\xfe", 400, "not JSON"),
    (b'{"query": "x", "max_new_tokens": ' + b"9" * 5000 + b"}", 400, "not JSON"),
    (b"[" * 5000 + b"]" * 5000, 400, "not JSON"),
    (b'{"query": "\\ud800 x"}', 422, "lone surrogate"),
    (b'{"query": "x", "max_new_tokens": true}', 422, "max_new_tokens: Input should be"),
    (b'{"query": "x", "temperature": "0.5"}', 422, "temperature: Input should be"),
]


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server):
    before = len(audit_rows(server))
    for path in ("/think/stream", "/think"):
        for raw, status, reason in BAD:
            got, body, headers = server.call("POST", path, raw=raw)
            assert got == status, (path, raw[:40], body)
            assert reason in body["error"]["reason"], body
            assert body["error"]["request_id"] == headers["X-Request-Id"]
    assert server.call("GET", "/health")[1]["in_flight"] == 0  # every slot given back
    # A body without Content-Length, over the limit: counted as it arrives.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/think")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for _ in range(20):
        chunk = b"x" * 1000
        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 413
    conn.close()
    assert server.call("GET", "/think")[0] == 405
    rows = audit_rows(server)[before:]
    assert [r["status"] for r in rows] == [s for _, s, _ in BAD] * 2 + [413]
    assert all(r["reason"] for r in rows)
    assert server.think({"query": "tagged"})[0] == 200


def test_busy_gets_503_and_a_slow_answer_504(server):
    results: list = []

    def slow():
        results.append(server.stream({"query": "slow", "max_new_tokens": 300}))

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while server.call("GET", "/health")[1]["in_flight"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, body, headers = server.call("POST", "/think", {"query": "tagged"})
    assert status == 503 and "max_concurrent=2" in body["error"]["reason"]
    assert headers["Retry-After"] == "1"
    for t in threads:
        t.join(30)
    for _status, events, raw in results:
        no_secret(raw.decode())
        assert events[-1][0] == "error" and events[-1][1]["status"] in (503, 504), events[-1]
    assert 504 in [events[-1][1]["status"] for _, events, _ in results]
    status, body = server.think({"query": "slow", "max_new_tokens": 300})
    assert status == 504 and "timeout_s=5" in body["error"]["reason"]
    row = row_of(server, body["error"]["request_id"])
    assert row["status"] == 504 and row["thinking_bytes"] > 0 and row["finish_reason"] == "timeout"
    assert server.think({"query": "tagged"})[0] == 200


def test_the_audit_log_is_append_only_and_never_holds_the_thinking(server):
    server.think({"query": "tagged"})
    db = sqlite3.connect(server.audit)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET status = 0")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")
    db.close()
    for path in server.audit.parent.iterdir():
        data = path.read_bytes()
        assert b"SECRET" not in data and "秘密".encode() not in data, path


def test_a_client_that_leaves_a_stream_frees_the_model(server):
    conn, request_id = server.open_stream({"query": "slow"})
    conn.sock.shutdown(2)
    conn.close()
    started = time.monotonic()
    while not [r for r in audit_rows(server) if r["request_id"] == request_id]:
        assert time.monotonic() - started < 10
        time.sleep(0.05)
    row = row_of(server, request_id)
    assert row["status"] == 499 and row["finish_reason"] == "cancelled"
    assert time.monotonic() - started < 4  # before the 5 s timeout would have ended it
    assert server.call("GET", "/health")[1]["in_flight"] == 0


def test_stopping_the_server_ends_a_stream_in_flight_and_audits_it(server):
    """(Last in this module: it stops the module's server.)"""
    _conn, request_id = server.open_stream({"query": "slow"})
    code = server.stop()
    assert code in (0, -signal.SIGTERM), server.output()[-2000:]
    row = row_of(server, request_id)  # ended by its timeout (5 s) or by the shutdown
    assert (row["status"], row["finish_reason"]) in ((504, "timeout"), (499, "cancelled"))
    assert "Traceback" not in server.output()
