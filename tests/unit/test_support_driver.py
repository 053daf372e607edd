"""tests.support.driver.Driver, the kept driver the store tests poll through, without Ray: its `init` line is
left out (`pass`), so the child process imports Ray but never connects."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.driver import Driver


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    d = Driver(dict(os.environ), tmp_path / "driver.log", "print('said at start, into the log')")
    yield d
    d.close()


def test_a_script_answers_with_the_last_line_it_printed_and_the_next_starts_afresh(driver: Driver) -> None:
    assert driver.run("print('chatter')\nX = 1\nprint(json.dumps({'x': X}))", 60) == {"x": 1}
    pid = driver.proc.pid  # type: ignore[union-attr]
    with pytest.raises(AssertionError, match="NameError: name 'X' is not defined"):
        driver.run("print(json.dumps(X))", 60)
    assert driver.run("print(json.dumps(ray.__name__))", 60) == "ray"
    assert driver.proc.pid == pid  # type: ignore[union-attr]  # one process for every script
    assert "said at start, into the log" in driver.log.read_text()


def test_a_script_that_does_not_answer_kills_the_driver_and_the_next_gets_another(driver: Driver) -> None:
    driver.run("print('{}')", 60)
    first = driver.proc
    with pytest.raises(AssertionError, match="did not answer in 0.5 s"):
        driver.run("import threading\nthreading.Event().wait()", 0.5)
    assert first is not None and first.poll() is not None
    assert driver.run("print('[1]')", 60) == [1]
    assert driver.proc is not first
