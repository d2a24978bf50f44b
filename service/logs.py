"""Structured logs: one JSON object per line when `Settings.log_format == "json"`."""

from __future__ import annotations

import datetime
import logging

import orjson

ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")
LOGGERS = ("", "service", "uvicorn", "uvicorn.error", "uvicorn.access")


class JSONFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...}`; uvicorn's access lines get their fields
    (client, method, path, http_version, status) as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            entry.update(zip(ACCESS_FIELDS, args, strict=True))
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(log_format: str) -> None:
    """Switch the handlers of the root, service and uvicorn loggers to JSON lines (text: leave
    them as configured by `unfold serve` and uvicorn)."""
    if log_format != "json":
        return
    formatter = JSONFormatter()
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
