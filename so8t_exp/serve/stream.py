"""``POST /think/stream``: one request's server-sent events.

``label`` (before generation), ``answer`` pieces (final-answer text only, from the
section parser), then ``done`` or ``error``. The work runs in a thread started before the
response is, so its admission slot is given back and its audit row written even if the
response never starts; the client going away cancels it at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading

from so8t_exp.serve.protocol import HTTPProblem, as_problem, response_body, timeout_reason

log = logging.getLogger(__name__)


class StreamEvents:
    """The events of one streamed request (:meth:`start` the work, then :meth:`run`)."""

    def __init__(self, service, call, query, sampling, limits, record, gate, served) -> None:
        self.service, self.call, self.query, self.sampling = service, call, query, sampling
        self.limits, self.record, self.gate, self.served = limits, record, gate, served
        self.cancelled = threading.Event()
        self.worker: threading.Thread | None = None
        self.sent = 0  # answer bytes handed to the client

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    async def run(self):
        try:
            while True:
                kind, data = await self._queue.get()
                yield _sse(kind, data)
                if kind in ("done", "error"):
                    return
        finally:
            self.cancelled.set()  # the client left (or we are done): stop at the next token

    def _put(self, kind: str, data: dict) -> None:
        # A closed event loop: the server is shutting down and nobody listens any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, data))

    def _text(self, text: str) -> None:
        self.sent += len(text.encode("utf-8"))
        self._put("answer", {"text": text})

    def _label(self, label, confidence, action) -> None:
        self._put(
            "label",
            {
                "request_id": self.call.request_id,
                "safety_label": label,
                "safety_confidence": confidence,
                "policy_action": action,
            },
        )

    def _work(self) -> None:
        call, problem, result = self.call, None, None
        try:
            result = self.service.think(
                self.query,
                self.sampling,
                call.started + self.limits.timeout_s,
                on_label=self._label,
                on_text=self._text,
                cancelled=self.cancelled,
            )
            if result.finish_reason == "timeout":
                problem = HTTPProblem(504, timeout_reason(self.limits))
            elif result.finish_reason == "cancelled":
                problem = HTTPProblem(499, "the stream was closed (by the client or the server)")
        except Exception as err:  # noqa: BLE001  (every failure is answered; serving goes on)
            problem = as_problem(err, call, self.limits)
        try:
            self.record(
                call, problem.status if problem else 200, problem and problem.reason, result
            )
        except Exception:  # noqa: BLE001
            log.exception("audit write failed for %s", call.request_id)
            problem = HTTPProblem(503, "the audit log cannot be written")
        finally:
            self.gate.leave()
        if problem is None:
            self._put("done", response_body(call, result, self.served))
        else:
            error = {"status": problem.status, "reason": problem.reason}
            self._put("error", error | {"request_id": call.request_id})


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
