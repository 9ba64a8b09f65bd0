"""proxy/observability/logs.py: the batched stderr handler keeps every record, in order, and never holds one
for long."""

import asyncio
import io
import logging

from proxy.observability.logs import BatchedStreamHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def logger_to(stream: CountingStream, name: str, delay: float = 0.05) -> tuple[logging.Logger, BatchedStreamHandler]:
    handler = BatchedStreamHandler(stream, delay=delay)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log, handler


def test_records_on_a_loop_go_out_together_and_soon():
    stream = CountingStream()
    log, _ = logger_to(stream, "test_logs.batched")

    async def main() -> None:
        for i in range(100):
            log.info("request %d", i)
        assert stream.getvalue() == ""  # waiting for the batch
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.06, done.set)  # just after the handler's own timer
        await done.wait()

    asyncio.run(main())
    assert stream.getvalue().splitlines() == [f"INFO request {i}" for i in range(100)]
    assert stream.writes == 1


def test_a_warning_goes_out_at_once_after_what_waited():
    stream = CountingStream()
    log, _ = logger_to(stream, "test_logs.warning", delay=3600)

    async def main() -> None:
        log.info("first")
        log.warning("second")
        assert stream.getvalue().splitlines() == ["INFO first", "WARNING second"]

    asyncio.run(main())


def test_off_a_loop_records_are_written_at_once_and_flush_empties_the_batch():
    stream = CountingStream()
    log, handler = logger_to(stream, "test_logs.plain", delay=3600)
    log.info("no loop here")
    assert stream.getvalue() == "INFO no loop here\n"

    async def main() -> None:
        log.info("on a loop")

    asyncio.run(main())
    assert "on a loop" not in stream.getvalue()
    handler.flush()  # what logging.shutdown does at exit
    assert stream.getvalue().splitlines() == ["INFO no loop here", "INFO on a loop"]


def test_a_new_loop_gets_its_own_timer():
    """A timer left on a loop that ended never runs: the next loop must not wait for it."""
    stream = CountingStream()
    log, _ = logger_to(stream, "test_logs.loops", delay=0.01)

    async def log_one(msg: str) -> None:
        log.info(msg)

    asyncio.run(log_one("first loop"))  # ends before its timer: the record waits

    async def second() -> None:
        log.info("second loop")
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, done.set)
        await done.wait()

    asyncio.run(second())
    assert stream.getvalue().splitlines() == ["INFO first loop", "INFO second loop"]


def test_json_records_are_one_line_of_json_with_every_field():
    """JsonFormatter (msgspec): one line, non-ASCII kept as is, numbers as numbers, anything else as its
    str(), the request's fields merged in, an exception as text."""
    import json
    from pathlib import PurePosixPath

    from proxy.observability.logs import JsonFormatter

    formatter = JsonFormatter()
    record = logging.LogRecord("dicomweb_edge.access", logging.INFO, "", 0, "request %s", ("done",), None)
    record.fields = {"request_id": "r1", "status": 200, "duration_ms": 0.31, "archive": "Zürich-東",  # type: ignore[attr-defined]
                     "where": PurePosixPath("/a/b"), "cache": None}
    line = formatter.format(record)
    assert "\n" not in line and "Zürich-東" in line
    out = json.loads(line)
    assert out["msg"] == "request done" and out["logger"] == "dicomweb_edge.access" and out["level"] == "info"
    assert out["status"] == 200 and out["duration_ms"] == 0.31 and out["where"] == "/a/b" and out["cache"] is None
    assert out["ts"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("dicomweb_edge", logging.ERROR, "", 0, "failed", None, sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(failed))["error"]


def test_access_records_skip_the_logging_machinery_only_where_that_changes_nothing():
    """edge.account writes the access record straight to the batched JSON handler under the configuration
    log_config makes (the same line as the logging path writes, timestamp aside), and through the
    logging module as soon as anything else listens (a handler added for debugging, a filter)."""
    import json
    import logging.config

    from proxy.config import Settings
    from proxy.http.edge import account
    from proxy.observability.logs import access, log_config, write_access
    from proxy.observability.metrics import Activity

    parent = logging.getLogger("dicomweb_edge")
    saved = (parent.handlers[:], parent.level, parent.propagate, access.handlers[:], access.level)
    try:
        logging.config.dictConfig(log_config(Settings()))
        handler = parent.handlers[0]
        handler.stream = stream = io.StringIO()
        fields = {"request_id": "r1", "cache": "hit", "archive": "Zürich"}
        account("frames", "GET", 200, 0.00031, 0.00028, 524938, 0, dict(fields), activity=Activity())
        handler.flush()
        fast = json.loads(stream.getvalue())

        record = logging.LogRecord(access.name, logging.INFO, "", 0, "request", None, None)
        record.fields = {**fields, "service": "frames", "method": "GET", "status": 200, "bytes_in": 0,  # type: ignore[attr-defined]
                         "bytes_out": 524938, "duration_ms": 0.31, "ttfb_ms": 0.28}
        slow = json.loads(handler.formatter.format(record))
        assert {k: v for k, v in fast.items() if k != "ts"} == {k: v for k, v in slow.items() if k != "ts"}
        assert list(fast) == list(slow)  # the same keys in the same order

        seen: list[logging.LogRecord] = []
        listener = logging.Handler()
        listener.emit = seen.append  # type: ignore[method-assign]
        access.addHandler(listener)
        assert not write_access(dict(fields))
        account("frames", "GET", 200, 0.001, 0.001, 1, 0, dict(fields), activity=Activity())
        assert len(seen) == 1 and seen[0].fields["request_id"] == "r1"  # type: ignore[attr-defined]
        access.removeHandler(listener)
        assert write_access(dict(fields))
    finally:
        parent.handlers[:], parent.level, parent.propagate, access.handlers[:], access.level = saved
