"""Hostile files are parsed in child processes with a memory and a CPU limit, so that a file built to exhaust
a parser (a decompression bomb, a page that renders to gigapixels, a pathological XML tree) kills a child,
not the replica and the other requests it serves.

Pebble's ProcessPool keeps a few workers and reuses them across requests (starting a Python process with
pypdf, pypdfium2, python-docx, lxml and Pillow imported costs ~0.3 s of CPU: too much per request, and fork
per request from a Ray worker, which runs gRPC threads, is unsafe). Workers come from a forkserver (a clean
process started once, not a fork of the threaded replica) that imports the parsers once, so a replacement
worker is a cheap fork. When a worker dies, only the request it was serving fails (pebble answers
ProcessExpired for that task and starts a new worker); that request is answered 422 `parser_limits_exceeded`,
naming the file as the cause, never retried.

Under Ray, multiprocessing re-imports the replica's main module (Ray's default_worker.py, whose work is behind
its `__name__` guard) in each worker: ~0.7 s of CPU and ~60 MiB of address space once per worker, not per
file.

Limits: RLIMIT_AS (address space) set once per worker; RLIMIT_CPU set per task as the worker's CPU time so far
plus the task's budget (the limit counts a process's whole life, and workers are reused); a wall-clock timeout
as a backstop for a task that waits rather than computes. The defaults suit one parse or one page render on a
service-tier node (8 GB); RMA_PARSER_MEMORY_MB and RMA_PARSER_CPU_S change them."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from deployments.gateway.refusal import Refusal

log = logging.getLogger("rma.services.sandbox")

T = TypeVar("T")
MEMORY_LIMIT_MB = int(os.environ.get("RMA_PARSER_MEMORY_MB", "1024"))
CPU_LIMIT_S = int(os.environ.get("RMA_PARSER_CPU_S", "60"))
# Serve sends an OCR or a documents replica 2 requests at a time
WORKERS = int(os.environ.get("RMA_PARSER_WORKERS", "2"))
MAX_TASKS = 200  # a worker is replaced after this many tasks: what a parser's allocator kept is given back
# imported once in the forkserver, so that every worker forked from it starts with the parsers loaded
PRELOAD = [
    "pypdf",
    "pypdfium2",
    "docx",
    "lxml.etree",
    "bs4",
    "markdown_it",
    "filetype",
    "PIL.Image",
    "numpy",
    "deployments.services.documents",
    "deployments.services.ocr",
]


LIMITS_CODE = "parser_limits_exceeded"


def limits_exceeded(
    what: str, detail: str, memory_mb: int = MEMORY_LIMIT_MB, cpu_s: int = CPU_LIMIT_S
) -> Refusal:
    """The file made its parser exceed the child's memory, CPU or time limit (the child was killed): a 422
    that names the file as the cause (a Refusal, so it pickles back from a child too)."""
    return Refusal(
        422,
        LIMITS_CODE,
        f"this file made the {what} exceed its limits ({detail}; at most {memory_mb} MiB "
        f"of memory and {cpu_s} s of CPU per file); it was not processed: send a smaller or "
        f"simpler file",
    )


def _init_worker(memory_bytes: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _limited(fn: Callable[..., T], what: str, memory_mb: int, cpu_s: int, args: tuple[Any, ...]) -> T:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(usage.ru_utime + usage.ru_stime) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = spent + cpu_s if hard == resource.RLIM_INFINITY else min(spent + cpu_s, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))  # SIGXCPU (which ends the process) past it
    try:
        return fn(*args)
    except Refusal:
        raise
    except MemoryError:
        raise limits_exceeded(what, "it ran out of memory", memory_mb, cpu_s) from None
    except RecursionError:
        raise limits_exceeded(what, "it is nested too deeply", memory_mb, cpu_s) from None
    except Exception as exc:  # a parser's own error on a malformed file: the caller's file, so a 4xx
        raise Refusal(
            422,
            "unreadable_file",
            f"the {what} could not read this file ({type(exc).__name__}: {str(exc)[:300]})",
        ) from None


class Sandbox:
    """A pool of limited child processes; `run` (blocking) and `arun` (async) call a module-level function in
    one of them and return its result or raise its exception (Refusal included)."""

    def __init__(
        self, workers: int = WORKERS, memory_mb: int = MEMORY_LIMIT_MB, cpu_s: int = CPU_LIMIT_S
    ) -> None:
        self.workers, self.memory_mb, self.cpu_s = workers, memory_mb, cpu_s
        self._pool: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._pool is None or not self._pool.active:
                from pebble import ProcessPool

                if self._pool is not None:  # broken (its workers could not start): replaced
                    self._pool.stop()

                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(PRELOAD)
                self._pool = ProcessPool(
                    max_workers=self.workers,
                    max_tasks=MAX_TASKS,
                    context=ctx,
                    initializer=_init_worker,
                    initargs=[self.memory_mb * 2**20],
                )
            return self._pool

    def _schedule(self, what: str, fn: Callable[..., T], args: tuple[Any, ...]) -> Any:
        # wall-clock backstop: the CPU limit ends a busy child; this ends one that waits
        return self._get().schedule(
            _limited, args=[fn, what, self.memory_mb, self.cpu_s, args], timeout=self.cpu_s * 2 + 10
        )

    def _outcome(self, what: str, future: Any) -> Any:
        from pebble import ProcessExpired

        try:
            return future.result()
        except ProcessExpired as exc:
            log.warning(
                "a %s child died (exit code %s): the file is refused, not retried", what, exc.exitcode
            )
            raise limits_exceeded(what, _why(exc.exitcode), self.memory_mb, self.cpu_s) from None
        except FutureTimeout:
            raise limits_exceeded(what, "it ran past the time limit", self.memory_mb, self.cpu_s) from None
        except BrokenProcessPool as exc:  # no worker could start (not the file's doing): replaced next call
            log.error("the %s pool is broken: %s", what, exc)
            raise Refusal(
                503, "parser_unavailable", f"the {what} could not start a worker process; retry shortly", 5
            ) from None

    def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        return self._outcome(what, self._schedule(what, fn, args))  # type: ignore[no-any-return]

    async def arun(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        future = self._schedule(what, fn, args)
        try:
            await asyncio.wrap_future(future)
        except Exception:  # noqa: S110 - the outcome below says what went wrong
            pass
        return self._outcome(what, future)  # type: ignore[no-any-return]

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join(timeout=10)
                self._pool = None


def _why(exitcode: int | None) -> str:
    import signal

    if exitcode is not None and exitcode < 0:
        sig = -exitcode
        if sig == signal.SIGXCPU:
            return "it used up its CPU time"
        if sig == signal.SIGKILL:
            return "it was killed, most likely for memory"
        if sig in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
            return "the parser crashed, most likely out of memory"
    return f"the parser process died (exit code {exitcode})"


_shared: Sandbox | None = None
_shared_lock = threading.Lock()


def shared() -> Sandbox:
    """This process's sandbox (one pool per replica, started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Sandbox()
        return _shared
