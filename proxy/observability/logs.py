"""Logs: one JSON object per line (or plain text), each carrying the id of the request it belongs to.

The access log is one record per request with what an operator needs (service, status, bytes in and
out, duration, time to first byte, archive, cache result) and nothing of the patient: no path, no
query, no UID, unless `log_patient_data` is switched on for debugging. Any other record logged while
a request is being answered (an archive failure, a cache error) carries the same `request_id`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextvars import ContextVar
from typing import Any, TextIO

import msgspec

from proxy.config import Settings

REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("dicomweb_edge_request", default=None)
"""The fields of the request being answered (set by the edge middleware, added to by the phases)."""

access = logging.getLogger("dicomweb_edge.access")


def annotate(key: str, value: str) -> None:
    """Add a field to the current request's access record (several values of one key are joined by ',')."""
    fields = REQUEST.get()
    if fields is None:
        return
    old = fields.get(key)
    if old is None:
        fields[key] = value
    elif value not in old.split(","):
        fields[key] = f"{old},{value}"


def _lean_records() -> None:
    """Records need no thread, process or caller fields (no formatter here prints them); skipping them
    takes about a quarter off every record, and the access log writes one per request."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no stack walk for the caller's file and line


class JsonFormatter(logging.Formatter):
    """`{"ts": …, "level": …, "logger": …, "msg": …, "request_id": …, …}` on one line."""

    def __init__(self) -> None:
        super().__init__()
        _lean_records()  # runs in every worker process that configures logging with this formatter
        # msgspec: 0.6 µs an access record against 4.3 µs for json's encoder (same text; NaN becomes null).
        self._encode = msgspec.json.Encoder(enc_hook=str).encode
        self._second = -1
        self._stamp = ""

    def _ts(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a record
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def access_line(self, fields: dict[str, Any]) -> str:
        """What `format` makes of an INFO "request" record of the access logger carrying `fields`."""
        out = self._head(time.time(), "info", access.name, "request")
        out.update(fields)
        return self._encode(out).decode()

    def _head(self, created: float, level: str, logger: str, msg: str) -> dict[str, Any]:
        return {"ts": self._ts(created), "level": level, "logger": logger, "msg": msg}

    def format(self, record: logging.LogRecord) -> str:
        out = self._head(record.created, record.levelname.lower(), record.name, record.getMessage())
        fields = getattr(record, "fields", None)
        if fields is not None:
            out.update(fields)
        else:
            current = REQUEST.get()
            if current is not None:
                out["request_id"] = current["request_id"]
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return self._encode(out).decode()


class TextFormatter(logging.Formatter):
    """`time level logger message key=value …` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        _lean_records()

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields is None:
            current = REQUEST.get()
            fields = {"request_id": current["request_id"]} if current is not None else {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return f"{line} {extra}" if extra else line


class BatchedStreamHandler(logging.StreamHandler):
    """A StreamHandler that writes in batches, like nginx's `access_log ... buffer= flush=`.

    The access log writes a record per request, and a write plus a flush per record cost about a third
    of it. Records logged on a thread running an event loop wait at most `delay` seconds (or until
    `limit` characters are waiting) and go out in one write; a warning or an error goes out at once,
    after what was waiting, so the order is kept. Other threads write at once. `flush()` (called at exit
    by logging.shutdown) writes what is left.
    """

    def __init__(self, stream: TextIO | None = None, delay: float = 0.05, limit: int = 65536) -> None:
        super().__init__(stream)
        self.delay = delay
        self.limit = limit
        self.pending: list[str] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._queue(line, record.levelno)

    def queue_info(self, line: str) -> None:
        """An INFO line formatted already (`write_access`), queued as `emit` queues one."""
        with self.lock:  # type: ignore[union-attr]
            self._queue(line + self.terminator, logging.INFO)

    def _queue(self, line: str, levelno: int) -> None:
        self.pending.append(line)
        self.size += len(line)
        if levelno >= logging.WARNING or self.size >= self.limit:
            self._write()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write()
            return
        if self.timer is None or self.timer_loop is not loop:  # (a timer of a loop gone would never run)
            self.timer, self.timer_loop = loop.call_later(self.delay, self._due), loop

    def _due(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.timer = None
            self._write()

    def _write(self) -> None:
        if not self.pending:
            return
        try:
            self.stream.write("".join(self.pending))
            self.stream.flush()
        except Exception:  # like StreamHandler: a broken stderr must not break the request
            pass
        self.pending.clear()
        self.size = 0

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()


def write_access(fields: dict[str, Any]) -> bool:
    """Write an access record straight to the batched JSON handler when that is all `access.info` would
    do (the configuration `log_config` makes, JSON format): the same line, without a LogRecord or the
    logging module's dispatch, which were half of what a cached frame's answer cost in Python (cProfile:
    ~57 of ~98 µs spent in `edge.account`). False when anything else is configured: the caller logs it."""
    parent = access.parent
    if (access.handlers or access.filters or not access.propagate or access.disabled or parent is None
            or parent.filters or parent.propagate or parent.disabled or len(parent.handlers) != 1):
        return False
    handler = parent.handlers[0]
    formatter = handler.formatter
    if (type(handler) is not BatchedStreamHandler or handler.filters or handler.level > logging.INFO
            or type(formatter) is not JsonFormatter):
        return False
    handler.queue_info(formatter.access_line(fields))
    return True


def log_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` document: our formatter for our loggers and uvicorn's, on stderr.

    uvicorn applies it in every worker process, so all workers log the same way.
    """
    formatter = {"()": f"{__name__}.{'JsonFormatter' if settings.log_format == 'json' else 'TextFormatter'}"}
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"edge": formatter},
        "handlers": {"stderr": {"class": f"{__name__}.BatchedStreamHandler", "formatter": "edge",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "dicomweb_edge": {"handlers": ["stderr"], "level": level, "propagate": False},
            "proxy": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }
