"""rma_ray.logs: one handler for the `rma.*` loggers, with timestamps; JSON lines when asked. No Ray."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from rma_ray import logs


@pytest.fixture
def rma_logger() -> Iterator[logging.Logger]:
    """The `rma` logger as it was before the test: configure() changes process-wide state."""
    root = logging.getLogger(logs.ROOT)
    saved = (root.handlers[:], root.level, root.propagate)
    yield root
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_text_lines_carry_a_timestamp_logger_and_component(rma_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure("coordinator", json_lines=False, stream=stream)
    logging.getLogger("rma.reconciler").warning("quarantined worker %s", "w1")
    logging.getLogger("rma.reconciler").debug("not at INFO")
    (line,) = stream.getvalue().splitlines()
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING rma\.reconciler \[coordinator\] "
        r"quarantined worker w1$",
        line,
    ), line


def test_json_lines_parse(rma_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMA_LOG_JSON", "1")
    stream = io.StringIO()
    logs.configure("agent", stream=stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("rma.agent").exception("heartbeat failed: %s", 'quote" and \n newline')
    logging.getLogger("rma.agent").info("second")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "ERROR" and first["logger"] == "rma.agent" and first["component"] == "agent"
    assert (
        first["message"] == 'heartbeat failed: quote" and \n newline' and "ValueError: boom" in first["exc"]
    )
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", first["ts"])
    assert second["message"] == "second" and "exc" not in second


def test_configure_again_replaces_its_handler(rma_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("up", stream=first)
    logs.configure("up", stream=second, level="warning")
    logging.getLogger("rma.head").warning("once")
    logging.getLogger("rma.head").info("below the level")
    assert first.getvalue() == "" and second.getvalue().count("once") == 1
    assert "below the level" not in second.getvalue()
    assert not rma_logger.propagate  # one line a record, even when the root logger has a handler too
