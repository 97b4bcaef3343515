"""Independent suite steps in other processes, so a suite on a small CPU uses every core (`suite --jobs N`).

Each job runs in a freshly spawned interpreter (forking a process that holds torch's thread pools can hang) with
its own torch thread count, and sends back its return value or its traceback. A job left running when the caller
fails is terminated, so Ctrl-C or an error never leaves a training run behind in the background.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def _run(conn: Connection, threads: int, fn: Callable, args: tuple) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - whatever ends the job is reported to the caller, never swallowed
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Job:
    """One function call running in another process; `result()` waits for it."""

    def __init__(self, name: str, threads: int, fn: Callable, args: tuple) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_run, args=(child, threads, fn, args), name=f"lofa-{name}", daemon=True)
        self.process.start()
        child.close()  # only the job holds the sending end: if it dies, recv() ends with EOFError
        self._outcome: tuple[str, Any] | None = None

    def result(self) -> Any:
        if self._outcome is None:
            try:
                self._outcome = self._conn.recv()
            except EOFError:
                self.process.join()
                self._outcome = ("error", f"the process exited with code {self.process.exitcode} without a result")
            self.process.join()
        status, value = self._outcome
        if status != "ok":
            raise RuntimeError(f"suite step '{self.name}' failed in its own process:\n{value}")
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()


class Jobs:
    """Up to `jobs` processes at once (the caller's included) with `threads` torch threads each. Use as a context
    manager: leaving it stops whatever still runs (after an error; normally every job has been waited for)."""

    def __init__(self, jobs: int, threads: int) -> None:
        if jobs < 1:
            raise SystemExit(f"--jobs is {jobs}; use 1 (one process) or more (steps that do not depend on each "
                             "other run side by side, one process each)")
        self.jobs, self.threads = jobs, threads
        self._started: list[Job] = []

    def start(self, name: str, fn: Callable, *args) -> Job:
        """Run `fn(*args)` in another process (`fn` a module-level function, `args` picklable)."""
        job = Job(name, self.threads, fn, args)
        self._started.append(job)
        return job

    def run_all(self, calls: list[tuple[str, Callable, tuple]], at_once: int | None = None) -> list[Any]:
        """Run every `(name, fn, args)`, at most `at_once` (default: `jobs`) at a time, and return their results in
        order. One at a time runs them in this process."""
        at_once = self.jobs if at_once is None else min(at_once, self.jobs)
        if at_once <= 1 or len(calls) <= 1:
            return [fn(*args) for _, fn, args in calls]
        running: list[Job] = []
        results = []
        for name, fn, args in calls:
            if len(running) == at_once:
                results.append(running.pop(0).result())
            running.append(self.start(name, fn, *args))
        results.extend(job.result() for job in running)
        return results

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc) -> None:
        for job in self._started:
            job.stop()
