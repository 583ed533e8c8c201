"""Load test of ``python -m so8t_exp.serve`` (the /think endpoint) with the tiny model.

    python bench/serve_load.py            # about 3 minutes on 2 CPU cores
    python bench/serve_load.py --quick    # about 1 minute: fewer requests per level

Exports the tiny model (``tests/serve_support.make_export``: untrained, seeded safety head),
starts the real server process on 127.0.0.1 with ``ScriptedEngine`` and
``serve.limits.max_concurrent=16`` (nothing is turned away), and calls it over plain HTTP
from client threads. The scripted transcript is tagged like the model's output: four short
``<think-*>`` sections (about ten words each, each starting and ending with the marker word
``MARKER`` below), then a ``<final>`` answer of two sentences — 250 tokens with the tiny
model's tokenizer, which spends about three tokens a word. The real model runs every step;
only the chosen token is forced,
so every scripted request generates the same number of tokens (``tokens_per_request``) and
the section parser does real work. Every level starts after one warm-up request and is
bounded in requests and in seconds (a level that runs out of time reports the requests it
finished: ``n_*``).

Prints a table (progress goes to stderr) and ENDS with one JSON line. Keys:

rps_cN, p50_ms_cN, p99_ms_cN, n_cN
    ``POST /think`` of the scripted query from N client threads at once (N = 1, 4, 8):
    answered (200) requests/s over the level's wall time, median and 99th-percentile
    (nearest rank; with few requests it is the slowest one) client-side wall time per
    answered request, requests answered.
tokens_per_s_cN
    Generated tokens per second over the level (``tokens_per_request`` x rps).
server_ms_c1
    Mean ``latency_ms`` the server reports (its own view of a request) at N = 1.
rps_unscripted_c4, p50_ms_unscripted_c4, p99_ms_unscripted_c4, tokens_per_s_unscripted_c4,
tokens_per_request_unscripted
    The same at N = 4 for a query not in the script: the tiny model generates freely
    (greedy, ``max_new_tokens`` = 64; the server's label policy is set to ``answer`` for
    every label so the untrained head cannot skip generation).
stream_first_answer_p50_ms_cN, stream_first_answer_p99_ms_cN, stream_done_p50_ms_cN,
stream_done_p99_ms_cN
    ``POST /think/stream`` of the scripted query at N = 1 and 4: client-side time from
    sending the request to the first ``answer`` event, and to the ``done`` event.
parser_us_per_request, parser_us_per_token, parser_share
    The transcript is tokenized with the export's tokenizer and decoded piece by piece with
    the engine's own ``_Detokenizer`` (the exact text pieces the server feeds); the pieces
    are replayed through a fresh ``SectionParser`` (``feed`` each, then ``close``) many
    times. Median time per request and per token; ``parser_share`` is that over
    ``server_ms_c1``. ``detok_us_per_token``: the detokenizer, timed the same way.
failures
    Requests that did not come back 200 with exactly the expected answer (the stream: the
    ``answer`` events joined, and ``done``'s answer) and the expected token count, in the
    levels above. The first few are printed to stderr.
leaks
    Responses, streams or audit-log files in which the thinking marker appears (must be 0).
overload_503, overload_200, overload_other
    A second server with ``serve.limits.max_concurrent=2`` hit by 8 scripted ``/think``
    requests released at once: how many were turned away with 503, answered, or neither.
other_load_*, other_load_cores_max
    CPU the rest of the machine used during each level, in cores (all busy time minus this
    process and the server): the machine is shared, read the figures against it.
server_errors
    Lines with ``Traceback`` or ``ERROR`` in the servers' output; ``server_exit``: their
    exit codes after SIGTERM (0 or -15 is a clean stop).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.serve_support and this checkout's so8t_exp
    sys.path.insert(0, str(ROOT))

MARKER = "qzx"  # in every thinking section; must reach no client
SCRIPTED_QUERY = "How long should I boil dried pasta?"
FREE_QUERY = "Write a short note about the weather in spring."
THINKING = {
    "logic": "qzx Dried pasta cooks in eight to twelve minutes. qzx",
    "ethics": "qzx An everyday cooking question; nothing harmful here. qzx",
    "practical": "qzx Give a range; say taste it early. qzx",
    "creative": "qzx Friendly tone; explain al dente briefly. qzx",
}
ANSWER = (
    "Most dried pasta takes 8 to 12 minutes in salted boiling water. Taste it a minute "
    "early: it should be tender with a little bite."
)
TRANSCRIPT = (
    "".join(f"<think-{name}>\n{text}\n</think-{name}>\n" for name, text in THINKING.items())
    + f"<final>\n{ANSWER}\n</final>"
)


@dataclass(frozen=True)
class Plan:
    per_level: int  # scripted /think requests per concurrency level
    unscripted: int  # free-generation requests at concurrency 4
    stream: int  # /think/stream requests per level
    level_s: float  # no request of a level starts after this many seconds
    parser_reps: int  # replays of the transcript through the parser


PLANS = {
    "quick": Plan(8, 6, 6, 20.0, 50),
    "full": Plan(40, 16, 20, 45.0, 300),
}
LEVELS = (1, 4, 8)
STREAM_LEVELS = (1, 4)
FREE_TOKENS = 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan without data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]


@dataclass
class Tally:
    """What the checks found, shared by the client threads."""

    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)
            if len(self.failures) <= 5:
                log(f"  FAILURE: {what}")

    def leak(self, what: str) -> None:
        with self.lock:
            self.leaks.append(what)
            log(f"  LEAK: {what}")


# -- HTTP calls ---------------------------------------------------------------------------


def post_think(port: int, body: dict) -> tuple[int, bytes, float]:
    """(status, raw body, client wall seconds) of one ``POST /think``; status 0 and the
    error as the body when the connection failed."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", "/think", body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, raw, time.perf_counter() - t0
    except (OSError, http.client.HTTPException) as err:
        return 0, repr(err).encode(), time.perf_counter() - t0
    finally:
        conn.close()


def post_stream(port: int, body: dict) -> dict:
    """``POST /think/stream`` read line by line: status, events, raw bytes, and the client
    times (s) to the first ``answer`` event and to ``done``/``error``."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
    out = {"status": None, "events": [], "raw": b"", "first_answer": None, "end": None}
    try:
        data = json.dumps(body).encode()
        conn.request(
            "POST", "/think/stream", body=data, headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        out["status"] = resp.status
        if resp.status != 200:
            out["raw"] = resp.read()
            return out
        raw, event = bytearray(), None
        while line := resp.readline():
            raw += line
            text = line.decode("utf-8").rstrip("\r\n")
            if text.startswith("event: "):
                event = text[len("event: ") :]
            elif text.startswith("data: "):
                now = time.perf_counter() - t0
                out["events"].append((event, json.loads(text[len("data: ") :])))
                if event == "answer" and out["first_answer"] is None:
                    out["first_answer"] = now
                if event in ("done", "error"):
                    out["end"] = now
        out["raw"] = bytes(raw)
        return out
    except (OSError, http.client.HTTPException) as err:
        out["status"], out["raw"] = out["status"] or 0, repr(err).encode()
        return out
    finally:
        conn.close()


class OtherLoad:
    """CPU the rest of the machine used during a level, in cores: all busy time (steal
    included) minus this process and the server's (the machine is shared)."""

    def __init__(self, server_pid: int) -> None:
        self.procs = [psutil.Process(), psutil.Process(server_pid)]

    def _own(self) -> float:
        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def __enter__(self) -> OtherLoad:
        self._t, self._b, self._o = time.monotonic(), self._busy(), self._own()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.monotonic() - self._t
        self.cores = max(0.0, (self._busy() - self._b) - (self._own() - self._o)) / elapsed


# -- levels -------------------------------------------------------------------------------


def run_level(n: int, concurrency: int, budget_s: float, one) -> tuple[list, float]:
    """``one(i)`` called ``n`` times from ``concurrency`` threads, none started after
    ``budget_s``; (results of the calls made, wall seconds)."""
    counter, lock, results = iter(range(n)), threading.Lock(), []
    stop = time.monotonic() + budget_s

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None or time.monotonic() > stop:
                return
            r = one(i)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return results, time.perf_counter() - t0


def check_think(status: int, raw: bytes, tally: Tally, tokens: int | None, where: str) -> dict:
    if MARKER.encode() in raw:
        tally.leak(f"{where}: /think response contains the thinking marker")
    body = {}
    with contextlib.suppress(json.JSONDecodeError):
        body = json.loads(raw) if raw else {}
    if status != 200:
        tally.fail(f"{where}: status {status}: {raw[:200]!r}")
    elif tokens is not None and (
        body.get("answer") != ANSWER or body.get("generated_tokens") != tokens
    ):
        tally.fail(
            f"{where}: answer {body.get('answer')!r} tokens {body.get('generated_tokens')} "
            f"finish {body.get('finish_reason')}"
        )
    return body


def think_level(port: int, n: int, concurrency: int, budget_s: float, tally, tokens) -> dict:
    query = SCRIPTED_QUERY if tokens is not None else FREE_QUERY
    max_new = tokens + 16 if tokens is not None else FREE_TOKENS
    where = f"/think c{concurrency}" + ("" if tokens is not None else " unscripted")

    def one(_i):
        status, raw, wall = post_think(port, {"query": query, "max_new_tokens": max_new})
        return wall, check_think(status, raw, tally, tokens, where), status

    done, wall = run_level(n, concurrency, budget_s, one)
    results = [(w, b) for w, b, status in done if status == 200]  # failures: counted only
    walls = [w * 1000 for w, _ in results]
    gen = [b.get("generated_tokens", 0) for _, b in results]
    server = [b["latency_ms"] for _, b in results if "latency_ms" in b]
    rps = len(results) / wall
    return {
        "n": len(results),
        "rps": rps,
        "p50_ms": pct(walls, 50),
        "p99_ms": pct(walls, 99),
        "tokens_per_s": sum(gen) / wall,
        "tokens_per_request": statistics.mean(gen) if gen else float("nan"),
        "server_ms": statistics.mean(server) if server else float("nan"),
        "wall_s": wall,
    }


def stream_level(port: int, n: int, concurrency: int, budget_s: float, tally, tokens) -> dict:
    where = f"/think/stream c{concurrency}"

    def one(_i):
        r = post_stream(port, {"query": SCRIPTED_QUERY, "max_new_tokens": tokens + 16})
        if MARKER.encode() in r["raw"]:
            tally.leak(f"{where}: stream contains the thinking marker")
        kinds = [k for k, _ in r["events"]]
        joined = "".join(d.get("text", "") for k, d in r["events"] if k == "answer")
        done = r["events"][-1][1] if kinds and kinds[-1] == "done" else {}
        if r["status"] != 200:
            tally.fail(f"{where}: status {r['status']}: {r['raw'][:200]!r}")
        elif (
            not kinds
            or kinds[0] != "label"
            or joined != ANSWER
            or done.get("answer") != ANSWER
            or done.get("generated_tokens") != tokens
        ):
            tally.fail(f"{where}: events {kinds[:3]}...{kinds[-2:]} answer {joined[:60]!r}")
        return r

    done, wall = run_level(n, concurrency, budget_s, one)
    results = [r for r in done if r["status"] == 200]
    first = [r["first_answer"] * 1000 for r in results if r["first_answer"] is not None]
    end = [r["end"] * 1000 for r in results if r["end"] is not None]
    return {
        "n": len(results),
        "first_answer_p50_ms": pct(first, 50),
        "first_answer_p99_ms": pct(first, 99),
        "done_p50_ms": pct(end, 50),
        "done_p99_ms": pct(end, 99),
        "wall_s": wall,
    }


def overload(port: int, tokens: int, clients: int = 8) -> dict:
    """``clients`` scripted requests released at once; statuses counted."""
    barrier, statuses = threading.Barrier(clients), []

    def one(_i):
        barrier.wait()
        status, _raw, _wall = post_think(
            port, {"query": SCRIPTED_QUERY, "max_new_tokens": tokens + 16}
        )
        return status

    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(one, range(clients)))
    return {
        "overload_503": statuses.count(503),
        "overload_200": statuses.count(200),
        "overload_other": len(statuses) - statuses.count(503) - statuses.count(200),
        "overload_statuses": sorted(statuses),
    }


# -- the parser alone ---------------------------------------------------------------------


def parser_cost(export: Path, reps: int) -> dict:
    """Replay the transcript's decoded pieces through the parser (and time the detokenizer)."""
    from transformers import AutoTokenizer

    from so8t_exp.serve.engine import _Detokenizer
    from so8t_exp.serve.sections import SectionParser, SectionTags

    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer(TRANSCRIPT, add_special_tokens=False)["input_ids"]
    detok = _Detokenizer(tokenizer)
    pieces = [detok.push(t) for t in ids]
    tags = SectionTags()  # conf/serve.yaml's: final, thinking prefix "think"

    def replay() -> str:
        parser = SectionParser(tags)
        parser.feed("")  # the answer prefix (empty in conf/serve.yaml)
        for piece in pieces:
            parser.feed(piece)
        return parser.close().answer

    assert replay() == ANSWER, replay()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        replay()
        times.append(time.perf_counter() - t0)
    detok_times = []
    for _ in range(max(3, reps // 20)):
        d = _Detokenizer(tokenizer)
        t0 = time.perf_counter()
        for t in ids:
            d.push(t)
        detok_times.append(time.perf_counter() - t0)
    per_request = statistics.median(times) * 1e6
    return {
        "tokens": len(ids),
        "parser_us_per_request": per_request,
        "parser_us_per_token": per_request / len(ids),
        "detok_us_per_token": statistics.median(detok_times) * 1e6 / len(ids),
    }


# -- servers ------------------------------------------------------------------------------


def start_server(tmp: Path, export: Path, name: str, *overrides: str):
    from tests.serve_support import Server

    (tmp / name).mkdir()
    env = {**os.environ, "SO8T_EXP_HOME": str(tmp / name), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return Server(
        tmp / name,
        env,
        f"serve.model={export}",
        f"serve.audit.path={tmp / name / 'audit' / 'audit.db'}",
        "serve.engine._target_=so8t_exp.serve.engine.ScriptedEngine",
        f"+serve.engine.script_file={tmp / 'script.json'}",
        *overrides,
    )


def stop_server(server, name: str, report: dict, tmp: Path, tally: Tally) -> None:
    if server.proc.poll() is not None:
        report.setdefault("server_died", []).append(name)
        log(f"  server {name} had already exited ({server.proc.returncode}) before the stop")
        log("  its output ends: " + server.output()[-1500:])
    report.setdefault("server_exit", {})[name] = server.stop()
    out = server.output()
    bad = [ln for ln in out.splitlines() if "Traceback" in ln or "ERROR" in ln]
    report["server_errors"] = report.get("server_errors", 0) + len(bad)
    for line in bad[:5]:
        log(f"  server {name}: {line[:200]}")
    if MARKER in out:
        tally.leak(f"server {name}'s output contains the thinking marker")
    for f in (tmp / name / "audit").glob("*"):
        if f.is_file() and MARKER.encode() in f.read_bytes():
            tally.leak(f"audit file {f.name} of server {name} contains the thinking marker")


# -- main ---------------------------------------------------------------------------------


def table(r: dict) -> str:
    """Markdown-ish table of what ``r`` holds (a run that broke off shows dashes)."""
    r = _Missing(r)
    f = lambda x, d=1: "—" if x is None or x != x else f"{x:.{d}f}"  # noqa: E731
    lines = [
        f"serve load, tiny model, {r['cpu_cores']} CPU cores, {r['mode']}: "
        f"{r['tokens_per_request']} tokens per scripted request, {r['runtime_s']:.0f} s",
        "",
        "| /think | n | req/s | p50 ms | p99 ms | tokens/s | other load (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in LEVELS:
        lines.append(
            f"| scripted, concurrency {c} | {r[f'n_c{c}']} | {f(r[f'rps_c{c}'], 2)} | "
            f"{f(r[f'p50_ms_c{c}'])} | {f(r[f'p99_ms_c{c}'])} | {f(r[f'tokens_per_s_c{c}'])} | "
            f"{f(r[f'other_load_c{c}'], 2)} |"
        )
    lines.append(
        f"| unscripted ({FREE_TOKENS} max tokens, {f(r['tokens_per_request_unscripted'])} "
        f"generated), concurrency 4 | {r['n_unscripted_c4']} | "
        f"{f(r['rps_unscripted_c4'], 2)} | {f(r['p50_ms_unscripted_c4'])} | "
        f"{f(r['p99_ms_unscripted_c4'])} | {f(r['tokens_per_s_unscripted_c4'])} | "
        f"{f(r['other_load_unscripted_c4'], 2)} |"
    )
    lines += ["", "| /think/stream | n | first answer p50/p99 ms | done p50/p99 ms | other load |"]
    lines.append("|---|---|---|---|---|")
    for c in STREAM_LEVELS:
        p = f"stream_first_answer_p{{}}_ms_c{c}"
        d = f"stream_done_p{{}}_ms_c{c}"
        lines.append(
            f"| concurrency {c} | {r[f'n_stream_c{c}']} | {f(r[p.format(50)])} / "
            f"{f(r[p.format(99)])} | {f(r[d.format(50)])} / {f(r[d.format(99)])} | "
            f"{f(r[f'other_load_stream_c{c}'], 2)} |"
        )
    lines += [
        "",
        f"server latency_ms at c1 (mean): {f(r['server_ms_c1'])} ms; parser "
        f"{f(r['parser_us_per_request'])} µs/request = {f(r['parser_us_per_token'], 2)} "
        f"µs/token; parser_share {f(r['parser_share'], 5)}; detokenizer "
        f"{f(r['detok_us_per_token'], 1)} µs/token",
        f"failures {r['failures']}, leaks {r['leaks']}; overload (max_concurrent=2, 8 at "
        f"once): {r['overload_503']} x 503, {r['overload_200']} x 200, "
        f"{r['overload_other']} other; server errors {r['server_errors']}, exits "
        f"{r['server_exit']}",
    ]
    if r["error"]:
        lines.append(f"THE RUN BROKE OFF: {r['error']}")
    return "\n".join(lines)


class _Missing(dict):
    def __missing__(self, key):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per level")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="so8t-serve-load-"))
    tally, r, servers = Tally(), {"mode": mode, "cpu_cores": os.cpu_count()}, []
    r["python"] = platform.python_version()
    stamp = lambda: f"[{time.monotonic() - started:5.0f} s]"  # noqa: E731
    try:
        from tests.serve_support import make_export

        log(f"{stamp()} exporting the tiny model ...")
        export = make_export(tmp / "export")
        script = {SCRIPTED_QUERY: {"output": TRANSCRIPT, "label": "ALLOW"}}
        (tmp / "script.json").write_text(json.dumps(script), encoding="utf-8")

        log(f"{stamp()} parser replay ({plan.parser_reps} x) ...")
        p = parser_cost(export, plan.parser_reps)
        tokens = p["tokens"]
        r.update({k: v for k, v in p.items() if k != "tokens"}, tokens_per_request=tokens)

        log(f"{stamp()} starting the server (max_concurrent=16) ...")
        every_label_answers = [f"serve.policy.{k}.action=answer" for k in ("DENY", "REFUSE")]
        every_label_answers += ["serve.policy.ESCALATION.action=answer"]
        main_srv = start_server(
            tmp, export, "main", "serve.limits.max_concurrent=16", *every_label_answers
        )
        servers.append((main_srv, "main"))
        port = main_srv.port
        warm = post_think(port, {"query": SCRIPTED_QUERY, "max_new_tokens": tokens + 16})
        check_think(warm[0], warm[1], tally, tokens, "warm-up")
        post_think(port, {"query": FREE_QUERY, "max_new_tokens": 4})

        for c in LEVELS:
            log(f"{stamp()} /think scripted, concurrency {c}, {plan.per_level} requests ...")
            with OtherLoad(main_srv.proc.pid) as load:
                lv = think_level(port, plan.per_level, c, plan.level_s, tally, tokens)
            r[f"other_load_c{c}"] = load.cores
            for k in ("n", "rps", "p50_ms", "p99_ms", "tokens_per_s"):
                r[f"{k}_c{c}"] = lv[k]
            if c == 1:
                r["server_ms_c1"] = lv["server_ms"]
            log(f"        {lv['n']} in {lv['wall_s']:.1f} s, p50 {lv['p50_ms']:.0f} ms")

        log(f"{stamp()} /think unscripted, concurrency 4, {plan.unscripted} requests ...")
        with OtherLoad(main_srv.proc.pid) as load:
            lv = think_level(port, plan.unscripted, 4, plan.level_s, tally, None)
        r["other_load_unscripted_c4"] = load.cores
        for k in ("n", "rps", "p50_ms", "p99_ms", "tokens_per_s"):
            r[f"{k}_unscripted_c4"] = lv[k]
        r["tokens_per_request_unscripted"] = lv["tokens_per_request"]

        for c in STREAM_LEVELS:
            log(f"{stamp()} /think/stream, concurrency {c}, {plan.stream} requests ...")
            with OtherLoad(main_srv.proc.pid) as load:
                lv = stream_level(port, plan.stream, c, plan.level_s, tally, tokens)
            r[f"other_load_stream_c{c}"] = load.cores
            r[f"n_stream_c{c}"] = lv["n"]
            for k in ("first_answer_p50_ms", "first_answer_p99_ms", "done_p50_ms", "done_p99_ms"):
                r[f"stream_{k}_c{c}"] = lv[k]

        r["parser_share"] = r["parser_us_per_request"] / 1000 / r["server_ms_c1"]
        servers.pop()
        stop_server(main_srv, "main", r, tmp, tally)

        log(f"{stamp()} overload: max_concurrent=2, 8 requests at once ...")
        small = start_server(tmp, export, "overload", "serve.limits.max_concurrent=2")
        servers.append((small, "overload"))
        r.update(overload(small.port, tokens))
        servers.pop()
        stop_server(small, "overload", r, tmp, tally)
    except Exception as err:  # noqa: BLE001  (print what was measured all the same)
        traceback.print_exc()
        r["error"] = f"{type(err).__name__}: {err}"[:500]
    finally:
        for srv, name in servers:  # stopped here only when something above failed
            stop_server(srv, name, r, tmp, tally)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    loads = [v for k, v in r.items() if k.startswith("other_load_")]
    r["other_load_cores_max"] = max(loads) if loads else None
    r["failures"] = len(tally.failures)
    r["leaks"] = len(tally.leaks)
    r["runtime_s"] = time.monotonic() - started
    print(table(r), flush=True)
    print(json.dumps(_rounded(r)), flush=True)


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6 if abs(x) < 0.01 else 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


if __name__ == "__main__":
    main()
