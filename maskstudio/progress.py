"""Progress and cooperative stopping for long work: a run's tokens, knockout windows, training
steps, scored examples.

Library loops call `tick(message)` once per unit of work. It hands the message to the current
job's listener (the app's status line; nothing outside a job) and answers whether the job should
stop (its Stop button, its visitor gone, its time budget spent). A loop that can keep what it
computed ends early and says so (`stopped()` is the reason); one that cannot calls `check()`,
which raises `Stopped`. The current job is a context variable: threads and sessions never see
each other's jobs, and the CLI (no job) never stops.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from typing import Callable

from .errors import RunError


class Stopped(RunError):
    """The job was stopped before anything worth keeping was computed."""


class Job:
    """One unit of model work: a listener for its progress lines, a stop flag, a deadline
    (`time.monotonic()` seconds, or None) and an optional `alive()` probe (False: the visitor left)."""

    def __init__(self, report: Callable[[str], None] | None = None, deadline: float | None = None,
                 alive: Callable[[], bool] | None = None, budget_s: float | None = None):
        self.report, self.deadline, self.alive, self.budget_s = report, deadline, alive, budget_s
        self.reason = ""
        self.message = ""
        self.note = ""  # how the job ended, where the work knows better than "what was computed is shown"
        self.started = time.monotonic()
        self._flag = threading.Event()

    def stop(self, reason: str = "stopped") -> None:
        """Ask the job to stop at its next tick (any thread)."""
        if not self._flag.is_set():
            self.reason = reason
            self._flag.set()

    def should_stop(self) -> bool:
        """Whether to stop now: asked to, past the deadline, or the visitor is gone."""
        if not self._flag.is_set():
            if self.deadline is not None and time.monotonic() > self.deadline:
                budget = f" ({self.budget_s:.0f} s)" if self.budget_s is not None else ""
                self.stop(f"the job's time budget{budget} ran out")
            elif self.alive is not None and not self.alive():
                self.stop("the visitor left")
        return self._flag.is_set()


_CURRENT: contextvars.ContextVar[Job | None] = contextvars.ContextVar("maskstudio_job", default=None)


@contextlib.contextmanager
def running(job: Job):
    """Make `job` the current job of this thread's context while the block runs."""
    token = _CURRENT.set(job)
    try:
        yield job
    finally:
        _CURRENT.reset(token)


def current() -> Job | None:
    return _CURRENT.get()


def tick(message: str = "") -> bool:
    """Report `message` (when given) to the current job; True when the job should stop now."""
    job = _CURRENT.get()
    if job is None:
        return False
    if message:
        job.message = message
        if job.report is not None:
            job.report(message)
    return job.should_stop()


def stopped() -> str:
    """Why the current job stopped ('' while it runs, and outside a job)."""
    job = _CURRENT.get()
    return job.reason if job is not None and job.should_stop() else ""


def check(message: str = "") -> None:
    """`tick`, raising `Stopped` when the job should stop (work with nothing to keep yet)."""
    if tick(message):
        raise Stopped(f"{stopped()}: nothing computed yet")
