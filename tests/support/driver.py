"""One Ray driver process kept for many short scripts. A fresh driver (a Python process that imports Ray and
connects) costs 2-4 s on a busy 2-core box; a test that polls a supervisor's status through one per poll spends
most of its time starting them. The driver is a child process, not this one: a Ray client reads its token
settings once, at import, and pytest's own process runs clusters with other tokens."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

# Each line on stdin is one script (JSON-encoded); each line it writes back is one answer: what the script printed,
# or its traceback. Whatever else writes to stdout (Ray, a library) goes to the log: fd 1 is the log's.
SERVER = """
import contextlib, io, json, os, sys, traceback
answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
import ray
%s
for line in sys.stdin:
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(json.loads(line), "<script>", "exec"), {"__name__": "__main__", "json": json, "ray": ray})
        answer = {"printed": printed.getvalue()}
    except BaseException:
        answer = {"error": printed.getvalue()[-2000:] + traceback.format_exc()[-4000:]}
    answers.write(json.dumps(answer) + "\\n")
    answers.flush()
"""


class Driver:
    """Runs scripts (with `ray` and `json` in scope, each in a fresh namespace) on one connected Ray driver,
    started at the first script; a script's answer is the JSON of the last line it printed. A script that does
    not answer in its timeout fails the test and kills the driver (the next script starts another). Module state
    a script changes (a monkeypatch) stays for the next: such scripts want a driver of their own."""

    def __init__(self, env: dict[str, str], log: Path, init: str) -> None:
        self.env, self.log, self.init = env, log, init
        self.proc: subprocess.Popen[str] | None = None
        self.answers: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> subprocess.Popen[str]:
        log = self.log.open("a")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-u", "-c", SERVER % self.init],
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        finally:
            log.close()
        self.answers = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stdout, self.answers), daemon=True).start()
        return proc

    @staticmethod
    def _read(stdout: IO[str], answers: queue.Queue[str | None]) -> None:
        for line in stdout:
            answers.put(line)
        answers.put(None)  # the driver exited

    def run(self, script: str, timeout: float = 180) -> Any:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(script) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            self.close(grace=0)
            raise AssertionError(
                f"the script did not answer in {timeout} s (driver log: {self.log})"
            ) from None
        assert line is not None, f"the driver exited (its log: {self.log})"
        answer = json.loads(line)
        assert "error" not in answer, answer["error"]
        return json.loads(answer["printed"].strip().splitlines()[-1])

    def close(self, grace: float = 30) -> None:
        """Disconnect (stdin closed: the driver leaves its loop and Ray shuts it down), killed after `grace`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if grace > 0 and proc.stdin is not None:
                proc.stdin.close()
                proc.wait(grace)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
