"""structlog setup shared by every command: console output on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

ERROR_PREFIX = "splitserve: error: "  # a command's last line when it exits on an error (`up` quotes it)


def configure_logging(level: str = "info", json_logs: bool | None = None) -> None:
    """Configure structlog once per process. Bind request ids with structlog.contextvars."""
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def bind_request(request_id: str) -> None:
    """Tag every log line of the current task (one RPC or HTTP request) with its request id."""
    structlog.contextvars.bind_contextvars(request_id=request_id)


def bind_service(name: str, instance_id: str | None = None) -> None:
    """Tag every log line of this process with the service (and instance) it belongs to."""
    structlog.contextvars.bind_contextvars(service=name, **({"instance_id": instance_id} if instance_id else {}))


def describe(error: BaseException) -> str:
    """An exception for a log line: its type and message. Not repr(): redis-py's errors repr as
    "server:ResponseError", without the message that says what Redis refused."""
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
