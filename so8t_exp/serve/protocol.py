"""What goes over the wire for ``/think``: the request body and its checks against
``serve.limits``, the error every failure becomes (``HTTPProblem``), the response body.

Bad input is a 4xx whose reason names the field and the limit; nothing here ever puts
generated text into an error.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import CancelledError as FutureCancelled
from dataclasses import asdict, dataclass

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import ClientDisconnect

from so8t_exp.serve.config import LimitsConfig
from so8t_exp.serve.engine import Sampling
from so8t_exp.serve.source import ServedModel
from so8t_exp.serve.think import Busy, ThinkResult

log = logging.getLogger(__name__)


class ThinkBody(BaseModel):
    """The JSON a client sends; unknown keys are refused (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # no "5" for 5, no true for 1
    query: str
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


# The body is read by hand (size limit, one-line reasons); this shows its schema in /docs.
BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ThinkBody.model_json_schema()}},
    }
}


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


RESULT_AUDIT = (
    "safety_label",
    "safety_confidence",
    "policy_action",
    "thinking_bytes",
    "answer_complete",
    "finish_reason",
    "generated_tokens",
)


def response_body(call: Call, result: ThinkResult, served: ServedModel) -> dict:
    body = asdict(result)
    body.pop("thinking_bytes")
    model = {"model": served.name, "model_version": served.version}
    return {"request_id": call.request_id, **body, **model, "latency_ms": call.ms()}


def as_problem(err: Exception, call: Call, limits: LimitsConfig) -> HTTPProblem:
    """The HTTP answer to a request that failed with ``err`` (logged when unexpected)."""
    if isinstance(err, HTTPProblem):
        return err
    if isinstance(err, Busy):  # waiting for the model counts against the timeout
        return HTTPProblem(504, timeout_reason(limits) + " (the model was busy with others)")
    if isinstance(err, ClientDisconnect):
        return HTTPProblem(499, "the client went away while sending the request")
    if isinstance(err, FutureCancelled) or (
        isinstance(err, RuntimeError) and "after shutdown" in str(err)
    ):  # dropped from the model's queue at shutdown, or queued after it closed
        return HTTPProblem(503, "the server is shutting down")
    log.error("request %s failed", call.request_id, exc_info=err)
    return HTTPProblem(500, f"internal error ({type(err).__name__})")


def busy(limits: LimitsConfig) -> HTTPProblem:
    return HTTPProblem(
        503, f"busy: serve.limits.max_concurrent={limits.max_concurrent} requests are in"
    )


def timeout_reason(limits: LimitsConfig) -> str:
    return f"the answer took longer than serve.limits.timeout_s={limits.timeout_s}"


async def parse(request: Request, limits: LimitsConfig, call: Call) -> tuple[str, Sampling]:
    raw = await _read_body(request, limits.max_body_bytes)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, a 5000-digit int
        raise HTTPProblem(400, f"the body is not JSON that can be read: {err}") from None
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
    try:
        body.query.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPProblem(422, "query is not valid Unicode text (a lone surrogate)") from None
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
