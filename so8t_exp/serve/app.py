"""The HTTP side of serving: ``POST /think``, ``POST /think/stream`` (server-sent events),
``GET /health``. Limits, errors and the audit row of every request live here.

Every request — answered, refused as bad input, turned away as busy, timed out, failed —
gets a request id (``X-Request-Id``) and one audit row; every error is JSON
``{"error": {"status", "reason", "request_id"}}`` and never carries generated text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from so8t_exp.serve.audit import AuditLog, AuditRecord
from so8t_exp.serve.config import LimitsConfig
from so8t_exp.serve.engine import Sampling
from so8t_exp.serve.source import ServedModel
from so8t_exp.serve.think import Busy, ThinkResult, ThinkService

log = logging.getLogger(__name__)


class ThinkBody(BaseModel):
    """The JSON a client sends; unknown keys are refused (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")
    query: str
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


class HTTPProblem(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Call:
    """One request as it goes: its id, start, client and what the audit row needs."""

    request_id: str
    endpoint: str
    client_hash: str
    started: float
    query: str | None = None

    def ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)


class Admission:
    """At most ``limit`` requests inside at once; one more is turned away (503)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.inside, self._lock = limit, 0, threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.inside >= self.limit:
                return False
            self.inside += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


def create_app(
    service: ThinkService,
    audit: AuditLog,
    served: ServedModel,
    limits: LimitsConfig,
    token: str | None = None,
) -> FastAPI:
    """The FastAPI application serving ``service``; with ``token``, ``/think`` asks for
    ``Authorization: Bearer <token>``."""
    app = FastAPI(title="so8t_exp /think", version=served.version)
    gate = Admission(limits.max_concurrent)
    started = time.time()
    engine = service.engine

    def record(call: Call, status: int, reason: str | None = None, result=None) -> None:
        fields = {}
        if result is not None:
            fields = {k: getattr(result, k) for k in _RESULT_AUDIT}
            fields["thinking_sha256"] = result.internal_reasoning_hash
            fields["answer_bytes"] = len(result.answer.encode("utf-8"))
        audit.write(
            AuditRecord(
                request_id=call.request_id,
                endpoint=call.endpoint,
                status=status,
                reason=reason,
                latency_ms=call.ms(),
                client_hash=call.client_hash,
                model_name=served.name,
                model_version=served.version,
                prompt=call.query,
                **fields,
            )
        )

    async def problem(call: Call, err: HTTPProblem, result=None) -> JSONResponse:
        try:
            await run_in_threadpool(record, call, err.status, err.reason, result)
        except Exception:  # noqa: BLE001  (the error is reported either way)
            log.exception("audit write failed for %s", call.request_id)
        body = {
            "error": {"status": err.status, "reason": err.reason, "request_id": call.request_id}
        }
        headers = {"X-Request-Id": call.request_id}
        if err.status == 503:
            headers["Retry-After"] = "1"
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(body, status_code=err.status, headers=headers)

    def new_call(request: Request, endpoint: str) -> Call:
        client = request.headers.get(audit.cfg.client_header) or (
            request.client.host if request.client else "unknown"
        )
        return Call(uuid.uuid4().hex, endpoint, audit.client_hash(client), time.monotonic())

    async def admit(request: Request, endpoint: str) -> tuple[Call, JSONResponse | None]:
        """The new request's call, and the response that turns it away, if any."""
        call = new_call(request, endpoint)
        if token and not _bearer_ok(request, token):
            return call, await problem(call, HTTPProblem(401, _UNAUTHORIZED))
        if not gate.enter():
            return call, await problem(call, _busy(limits))
        return call, None

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": served.name,
            "version": served.version,
            "source": served.uri,
            "device": str(engine.device),
            "dtype": str(engine.model.dtype).removeprefix("torch."),
            "safety_labels": engine.labels,
            "in_flight": gate.inside,
            "max_concurrent": gate.limit,
            "uptime_s": round(time.time() - started, 1),
        }

    @app.post("/think")
    async def think(request: Request):
        call, refused = await admit(request, "/think")
        if refused:
            return refused
        result = None
        try:
            query, sampling = await _parse(request, limits, call)
            deadline = call.started + limits.timeout_s
            result = await run_in_threadpool(service.think, query, sampling, deadline)
            if result.finish_reason == "timeout":
                raise HTTPProblem(504, _timeout(limits))
            try:
                await run_in_threadpool(record, call, 200, None, result)
            except Exception:  # noqa: BLE001
                log.exception("audit write failed for %s", call.request_id)
                raise HTTPProblem(503, "the audit log cannot be written; not answering") from None
            return JSONResponse(
                _response(call, result, served), headers={"X-Request-Id": call.request_id}
            )
        except HTTPProblem as err:
            return await problem(call, err, result)
        except Busy:
            return await problem(call, HTTPProblem(503, "the model stayed busy until the deadline"))
        except Exception as err:  # noqa: BLE001  (the server keeps serving)
            log.exception("request %s failed", call.request_id)
            return await problem(call, HTTPProblem(500, f"internal error ({type(err).__name__})"))
        finally:
            gate.leave()

    @app.post("/think/stream")
    async def think_stream(request: Request):
        call, refused = await admit(request, "/think/stream")
        if refused:
            return refused
        try:
            query, sampling = await _parse(request, limits, call)
        except HTTPProblem as err:
            gate.leave()
            return await problem(call, err)
        events = _StreamEvents(service, call, query, sampling, limits, record, gate, served)
        headers = {"X-Request-Id": call.request_id, "Cache-Control": "no-cache"}
        return StreamingResponse(events.run(), media_type="text/event-stream", headers=headers)

    return app


_RESULT_AUDIT = (
    "safety_label",
    "safety_confidence",
    "policy_action",
    "thinking_bytes",
    "answer_complete",
    "finish_reason",
    "generated_tokens",
)


def _response(call: Call, result: ThinkResult, served: ServedModel) -> dict:
    body = asdict(result)
    body.pop("thinking_bytes")
    model = {"model": served.name, "model_version": served.version}
    return {"request_id": call.request_id, **body, **model, "latency_ms": call.ms()}


_UNAUTHORIZED = "a missing or wrong bearer token (the server's serve.auth_token_env)"


def _bearer_ok(request: Request, token: str) -> bool:
    sent = request.headers.get("authorization", "")
    scheme, _, value = sent.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token)


def _busy(limits: LimitsConfig) -> HTTPProblem:
    return HTTPProblem(
        503, f"busy: serve.limits.max_concurrent={limits.max_concurrent} requests are in"
    )


def _timeout(limits: LimitsConfig) -> str:
    return f"the answer took longer than serve.limits.timeout_s={limits.timeout_s}"


async def _parse(request: Request, limits: LimitsConfig, call: Call) -> tuple[str, Sampling]:
    raw = await _read_body(request, limits.max_body_bytes)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPProblem(400, f"the body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise HTTPProblem(400, 'the body must be a JSON object such as {"query": "..."}')
    try:
        body = ThinkBody.model_validate(data)
    except ValidationError as err:
        raise HTTPProblem(422, _validation_reason(err)) from None
    call.query = body.query
    return body.query, _sampling(body, limits)


def _sampling(body: ThinkBody, limits: LimitsConfig) -> Sampling:
    if not body.query.strip():
        raise HTTPProblem(422, "query is empty")
    if len(body.query) > limits.max_query_chars:
        raise HTTPProblem(
            422,
            f"query has {len(body.query)} characters; serve.limits.max_query_chars="
            f"{limits.max_query_chars}",
        )
    n = body.max_new_tokens
    n = limits.default_max_new_tokens if n is None else n
    checks = [
        (1 <= n <= limits.max_new_tokens, f"max_new_tokens={n}: 1..{limits.max_new_tokens}"),
        (
            0 <= body.temperature <= limits.max_temperature,
            f"temperature={body.temperature}: 0..{limits.max_temperature}",
        ),
        (0 < body.top_p <= 1, f"top_p={body.top_p}: above 0, at most 1"),
        (body.top_k >= 0, f"top_k={body.top_k}: 0 (off) or more"),
        (body.seed is None or 0 <= body.seed < 2**63, f"seed={body.seed}: 0..2**63-1"),
    ]
    for ok, reason in checks:
        if not ok:
            raise HTTPProblem(422, f"{reason} (the server's limits)")
    return Sampling(n, body.temperature, body.top_p, body.top_k, body.seed)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_big = f"the body is over serve.limits.max_body_bytes={limit} bytes"
    if declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():  # a body without a length is counted as it comes
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def _validation_reason(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


class _StreamEvents:
    """The server-sent events of one streamed request. The work runs in a thread and
    hands events over; the client going away cancels it at the next token."""

    def __init__(self, service, call, query, sampling, limits, record, gate, served) -> None:
        self.service, self.call, self.query, self.sampling = service, call, query, sampling
        self.limits, self.record, self.gate, self.served = limits, record, gate, served
        self.cancelled = threading.Event()

    async def run(self):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        put = lambda kind, data: loop.call_soon_threadsafe(queue.put_nowait, (kind, data))  # noqa: E731
        worker = threading.Thread(target=self._work, args=(put,), daemon=True)
        worker.start()
        try:
            while True:
                kind, data = await queue.get()
                yield _sse(kind, data)
                if kind in ("done", "error"):
                    return
        finally:
            self.cancelled.set()  # the client left (or we are done): stop at the next token

    def _work(self, put) -> None:
        call, status, reason, result = self.call, 200, None, None
        try:
            result = self.service.think(
                self.query,
                self.sampling,
                call.started + self.limits.timeout_s,
                on_label=lambda label, p, action: put(
                    "label",
                    {
                        "request_id": call.request_id,
                        "safety_label": label,
                        "safety_confidence": p,
                        "policy_action": action,
                    },
                ),
                on_text=lambda text: put("answer", {"text": text}),
                cancelled=self.cancelled,
            )
            if result.finish_reason == "timeout":
                status, reason = 504, _timeout(self.limits)
            elif result.finish_reason == "cancelled":
                status, reason = 499, "the client closed the stream"
        except Busy:
            status, reason = 503, "the model stayed busy until the deadline"
        except Exception as err:  # noqa: BLE001
            log.exception("request %s failed", call.request_id)
            status, reason = 500, f"internal error ({type(err).__name__})"
        try:
            self.record(call, status, reason, result)
        except Exception:  # noqa: BLE001
            log.exception("audit write failed for %s", call.request_id)
            status, reason = 503, "the audit log cannot be written"
        finally:
            self.gate.leave()
        if status == 200:
            put("done", _response(call, result, self.served))
        else:
            put("error", {"status": status, "reason": reason, "request_id": call.request_id})


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
