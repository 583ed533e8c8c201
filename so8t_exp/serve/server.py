"""Start serving: resolve the model, load it, open the audit log, listen.

The socket is bound before uvicorn starts, so ``serve.port=0`` works and the start line
can say where the server listens; the model is loaded before that, so a server that
answers ``/health`` is ready to answer ``/think``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

import uvicorn

from so8t_exp.build import build_engine
from so8t_exp.config import ConfigError
from so8t_exp.serve.app import create_app
from so8t_exp.serve.audit import AuditLog
from so8t_exp.serve.config import ServeConfig, check
from so8t_exp.serve.source import resolve
from so8t_exp.serve.think import ThinkService

log = logging.getLogger(__name__)


def serve(cfg: ServeConfig, tracking_uri: str | None) -> int:
    """Serve until SIGINT/SIGTERM (SIGBREAK on Windows); returns the exit code."""
    check(cfg)
    token = _token(cfg.auth_token_env)
    served = resolve(cfg.model, tracking_uri, cfg.cache_dir)
    log.info("loading %s version %s from %s", served.name, served.version, served.folder)
    engine = build_engine(cfg.engine, folder=served.folder, device=cfg.device, dtype=cfg.dtype)
    audit = AuditLog(cfg.audit)
    service = ThinkService(engine, cfg)
    try:
        app = create_app(service, audit, served, cfg.limits, token)
        sock = _bind(cfg.host, cfg.port)
        host, port = sock.getsockname()[:2]
        print(
            f"so8t serve: {served.name} version {served.version} on "
            f"http://{_url_host(host)}:{port} (POST /think, /think/stream; GET /health); "
            f"audit log {audit.path}",
            flush=True,
        )
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10)
        with contextlib.closing(sock):
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()  # the request on the model finishes (and is audited) first
        audit.close()
    return 0


def _token(env_name: str | None) -> str | None:
    if not env_name:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise ConfigError(f"serve.auth_token_env={env_name}: that environment variable is empty")
    return token


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if sys.platform != "win32":  # on Windows this would let two servers share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"serve.host={host} serve.port={port}: {err.strerror}") from None
    sock.listen(128)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
