"""The HTTP side of serving: ``POST /think``, ``POST /think/stream`` (server-sent events),
``GET /health``; admission (token, concurrency) and the audit row of every request.

Every request — answered, refused as bad input, turned away as busy, timed out, failed —
gets a request id (``X-Request-Id``) and one audit row; every error is JSON
``{"error": {"status", "reason", "request_id"}}`` and never carries generated text.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from so8t_exp.serve.audit import AuditLog, AuditRecord
from so8t_exp.serve.config import LimitsConfig
from so8t_exp.serve.protocol import (
    BODY_DOC,
    RESULT_AUDIT,
    Call,
    HTTPProblem,
    as_problem,
    busy,
    parse,
    response_body,
    timeout_reason,
)
from so8t_exp.serve.source import ServedModel
from so8t_exp.serve.stream import StreamEvents
from so8t_exp.serve.think import ThinkService

log = logging.getLogger(__name__)


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
    streams: weakref.WeakSet[StreamEvents] = weakref.WeakSet()
    started = time.time()
    engine = service.engine

    def record(call: Call, status: int, reason=None, result=None, sent: int | None = None):
        """The request's audit row; ``sent``: answer bytes a stream sent, whatever the end."""
        fields = {}
        if result is not None:
            fields = {k: getattr(result, k) for k in RESULT_AUDIT}
            fields["thinking_sha256"] = result.internal_reasoning_hash
            fields["answer_bytes"] = len(result.answer.encode("utf-8"))
        if sent is not None:
            fields["answer_bytes"] = sent
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
            return call, await problem(call, busy(limits))
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

    @app.post("/think", openapi_extra=BODY_DOC)
    async def think(request: Request):
        call, refused = await admit(request, "/think")
        if refused:
            return refused
        result, cancelled, audited = None, threading.Event(), False
        try:
            query, sampling = await parse(request, limits, call)
            deadline = call.started + limits.timeout_s
            result = await run_in_threadpool(
                service.think, query, sampling, deadline, cancelled=cancelled
            )
            if result.finish_reason == "timeout":
                raise HTTPProblem(504, timeout_reason(limits))
            response = JSONResponse(  # built first: a row says 200 only for a real answer
                response_body(call, result, served), headers={"X-Request-Id": call.request_id}
            )
            try:
                await run_in_threadpool(record, call, 200, None, result)
            except Exception:  # noqa: BLE001
                log.exception("audit write failed for %s", call.request_id)
                raise HTTPProblem(503, "the audit log cannot be written; not answering") from None
            audited = True
            return response
        except Exception as err:  # noqa: BLE001  (every failure is answered; serving goes on)
            return await problem(call, as_problem(err, call, limits), result)
        except asyncio.CancelledError:  # the server is shutting down and gave up waiting
            cancelled.set()
            if not audited:
                _record_quietly(record, call, 499, "the server shut down", result)
            raise
        finally:
            gate.leave()

    @app.post("/think/stream", openapi_extra=BODY_DOC)
    async def think_stream(request: Request):
        call, refused = await admit(request, "/think/stream")
        if refused:
            return refused
        started = False  # once the stream's worker runs, it gives the slot back
        try:
            query, sampling = await parse(request, limits, call)
            try:  # the row is written at the end: can it be written at all?
                await run_in_threadpool(audit.check_writable)
            except Exception:  # noqa: BLE001
                log.exception("audit log not writable for %s", call.request_id)
                raise HTTPProblem(503, "the audit log cannot be written; not answering") from None
            events = StreamEvents(service, call, query, sampling, limits, record, gate, served)
            events.start()
            started = True
        except Exception as err:  # noqa: BLE001
            return await problem(call, as_problem(err, call, limits))
        finally:
            if not started:
                gate.leave()
        streams.add(events)
        headers = {"X-Request-Id": call.request_id, "Cache-Control": "no-cache"}
        return StreamingResponse(events.run(), media_type="text/event-stream", headers=headers)

    @app.on_event("shutdown")
    def stop() -> None:
        """Streams still generating stop at their next token and write their rows; the
        model's queue and the audit log close. (Here, not after the server returns:
        uvicorn re-raises SIGTERM once it has shut down, which ends the process.)"""
        live = [s for s in streams if s.worker is not None and s.worker.is_alive()]
        for s in live:
            s.cancelled.set()
        for s in live:
            s.worker.join(30)
        service.close()
        audit.close()

    return app


_UNAUTHORIZED = "a missing or wrong bearer token (the server's serve.auth_token_env)"


def _bearer_ok(request: Request, token: str) -> bool:
    sent = request.headers.get("authorization", "")
    scheme, _, value = sent.partition(" ")
    # As bytes: compare_digest refuses str that is not ASCII (a 500, not a 401). The
    # server decoded the header's bytes as latin-1: encoding back gives them unchanged.
    given = value.strip().encode("latin-1")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, token.encode("utf-8"))


def _record_quietly(record, call: Call, status: int, reason: str, result=None) -> None:
    try:
        record(call, status, reason, result)
    except Exception:  # noqa: BLE001
        log.exception("audit write failed for %s", call.request_id)
