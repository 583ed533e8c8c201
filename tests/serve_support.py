"""Helpers for the serving tests: an exported tiny model, a real ``python -m so8t_exp.serve``
process on 127.0.0.1, and plain HTTP calls to it (JSON and server-sent events)."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from email.message import Message
from pathlib import Path

import torch

from so8t_exp.export.write import write_export
from so8t_exp.model_sources import TinyPhi3
from so8t_exp.paths import asset_path
from so8t_exp.safety_head import SafetyHead


def make_export(out: Path) -> Path:
    """An export folder of the tiny model with a (seeded, untrained) safety head: what
    ``python -m so8t_exp.export`` writes, without training first."""
    model, tokenizer = TinyPhi3(tokenizer_path=str(asset_path("tokenizer"))).load()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = SafetyHead(model.config.hidden_size)
    info = {"run_id": None, "checkpoint": "untrained", "step": 0}
    return write_export(out, model, tokenizer, head, "float32", info)


class Server:
    """``python -m so8t_exp.serve`` with ``overrides`` on a free port, until :meth:`stop`."""

    def __init__(self, cwd: Path, env: dict, *overrides: str, timeout: float = 120) -> None:
        self.log = cwd / f"serve-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "so8t_exp.serve", "serve.port=0", *overrides]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not (found := re.search(r"http://127\.0\.0\.1:(\d+)", self.output())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"server did not start:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        self.port = int(found.group(1))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def call(
        self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes = None
    ) -> tuple[int, dict, Message]:
        """(status, JSON body, headers: case-insensitive) of one request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, json.loads(payload) if payload else {}, resp.headers
        finally:
            conn.close()

    def think(self, body: dict, **headers: str) -> tuple[int, dict]:
        status, data, _ = self.call("POST", "/think", body, headers)
        return status, data

    def stream(self, body: dict) -> tuple[int, list[tuple[str, dict]], bytes]:
        """(status, [(event, data)], the raw bytes received) of ``/think/stream``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", "/think/stream", body=json.dumps(body).encode())
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, parse_sse(raw), raw

    def open_stream(self, body: dict) -> tuple[http.client.HTTPConnection, str]:
        """Start ``/think/stream`` and read up to its ``label`` event: the open
        connection and the request id."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", "/think/stream", body=json.dumps(body).encode())
        resp = conn.getresponse()
        assert resp.readline().startswith(b"event: label")
        return conn, json.loads(resp.readline().split(b": ", 1)[1])["request_id"]

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def parse_sse(raw: bytes) -> list[tuple[str, dict]]:
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events
