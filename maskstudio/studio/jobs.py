"""Fair use of the model on a shared server: one model job runs at a time, first come first
served, and a session holds at most one job (waiting or running), so N visitors each wait for at
most N - 1 jobs, each bounded by its time budget.

`run_job(session, what, work)` admits the job or refuses it in one line (a second job of the same
session, the queue full, the session's model time over the window spent), waits for its turn while
its status line says its place and an estimate, then runs `work` as the current `progress.Job`:
every `tick` in the library's loops reports a step ("token 7/16", "step 3/200, loss 2.31") and
answers Stop, a visitor who left (`alive`) or the job's time budget within one step, keeping what
was computed. Design work never comes here: it has its own workers (see app.py).

Budgets (knobs, MASKSTUDIO_* overrides, tight when SPACE_ID is set): MODEL_QUEUE_MAX jobs at once,
JOB_SECONDS per job, VISITOR_SECONDS of model time per session within VISITOR_WINDOW_S.
"""
from __future__ import annotations

import contextvars
import itertools
import re
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

from .. import knobs
from ..progress import Job, Stopped, current, running, tick

LOAD_POLL_S = 0.2    # a job waiting for its model's load looks at Stop this often
GUESS_S = 30.0       # a kind of job's duration before one has been timed (for the estimate)
HEARTBEAT_S = 1.0    # the status line's elapsed seconds tick this often while a step runs long (a model load)
SESSIONS_KEPT = 10_000  # sessions whose used model time is remembered (the oldest go first)


class Refused(ValueError):
    """A model job not admitted (one line, said where the job's error goes)."""


@dataclass
class Ticket:
    session: str
    what: str
    job: Job
    number: int
    running: bool = False
    started: float = 0.0
    line: str = ""
    extra: dict = field(default_factory=dict)


def _fraction(message: str) -> float | None:
    """7/16 in a step line -> 0.4375 (the progress bar), else None."""
    m = re.search(r"(\d+)\s*/\s*(\d+)", message)
    return min(int(m.group(1)) / int(m.group(2)), 1.0) if m and int(m.group(2)) else None


class Queue:
    """The one model queue of the process (thread-safe)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._tickets: dict[str, Ticket] = {}          # session -> its job, waiting or running
        self._numbers = itertools.count()
        self._used: dict[str, deque] = {}              # session -> (end time, seconds) of its jobs
        self._seconds: dict[str, float] = {}           # what -> typical duration (for the estimate)
        self._lines: dict[str, str] = {}               # session -> its last job's final status line

    # ------------------------------------------------------------ admission
    def used(self, session: str, now: float | None = None) -> float:
        """Model seconds `session` used within the window."""
        now = time.monotonic() if now is None else now
        spans = self._used.get(session, deque())
        while spans and spans[0][0] < now - knobs.VISITOR_WINDOW_S:
            spans.popleft()
        return sum(s for _, s in spans)

    def admit(self, session: str, what: str, job: Job) -> Ticket:
        """A ticket for `job`, or Refused with the reason and what to do."""
        with self._cond:
            mine = self._tickets.get(session)
            if mine is not None:
                state = "running" if mine.running else "waiting"
                raise Refused(f"you already have a model job {state} ({mine.what}); one at a time per visitor: "
                              f"wait for it or press Stop")
            used = self.used(session)
            if used >= knobs.VISITOR_SECONDS:
                oldest = self._used[session][0][0] + knobs.VISITOR_WINDOW_S - time.monotonic()
                raise Refused(f"this session used {used:.0f} s of model time in the last "
                              f"{knobs.VISITOR_WINDOW_S // 60} min (the limit here is {knobs.VISITOR_SECONDS} s); "
                              f"try again in {max(oldest, 0) / 60:.0f} min")
            if len(self._tickets) >= knobs.MODEL_QUEUE_MAX:
                raise Refused(f"the model queue is full ({knobs.MODEL_QUEUE_MAX} jobs); try again in a minute")
            ticket = Ticket(session, what, job, next(self._numbers))
            self._tickets[session] = ticket
            return ticket

    def _estimate(self, ahead: list[Ticket], now: float) -> float:
        left = 0.0
        for t in ahead:
            typical = self._seconds.get(t.what, GUESS_S)
            left += max(typical - (now - t.started), 1.0) if t.running else typical
        return left

    def wait_turn(self, ticket: Ticket, say: Callable[[str], None], poll: float = 0.25) -> None:
        """Block until `ticket` is first in line, saying its place and an estimate; a ticket whose
        job is stopped (Stop, the visitor left) leaves the line with Stopped."""
        with self._cond:
            while True:
                now = time.monotonic()
                ahead = sorted((t for t in self._tickets.values() if t.number < ticket.number),
                               key=lambda t: t.number)
                if not ahead:
                    ticket.running, ticket.started = True, now
                    ticket.job.started = now
                    ticket.job.deadline = now + knobs.JOB_SECONDS
                    ticket.job.budget_s = knobs.JOB_SECONDS
                    return
                if ticket.job.should_stop():
                    self._tickets.pop(ticket.session, None)
                    self._cond.notify_all()
                    raise Stopped(f"{ticket.job.reason} while waiting in the model queue")
                say(f"waiting for the model: {len(ahead)} job(s) ahead (place {len(ahead) + 1}), "
                    f"about {self._estimate(ahead, now):.0f} s")
                self._cond.wait(poll)

    def finish(self, ticket: Ticket, line: str) -> None:
        """The job ended: its seconds count against its session, the next in line goes."""
        with self._cond:
            if self._tickets.get(ticket.session) is ticket:
                del self._tickets[ticket.session]
            if ticket.running:
                spent = time.monotonic() - ticket.started
                self._used.setdefault(ticket.session, deque()).append((time.monotonic(), spent))
                old = self._seconds.get(ticket.what)
                self._seconds[ticket.what] = spent if old is None else 0.7 * old + 0.3 * spent
            self._lines[ticket.session] = line
            for book in (self._used, self._lines):
                while len(book) > SESSIONS_KEPT:
                    book.pop(next(iter(book)))
            self._cond.notify_all()

    # ------------------------------------------------------------ the visitor's buttons
    def stop(self, session: str, reason: str = "stopped by you") -> str:
        """Stop the session's job (waiting or running); the status line's answer."""
        with self._cond:
            ticket = self._tickets.get(session)
            if ticket is None:
                return "nothing to stop"
            ticket.job.stop(reason)
            self._cond.notify_all()
            return f"stopping {ticket.what}…"

    def line(self, session: str) -> str:
        """The session's status line now: its job's place or step, or its last job's final line."""
        ticket = self._tickets.get(session)
        if ticket is not None:
            return f"{ticket.what}: {ticket.job.message or 'starting'}"
        return self._lines.get(session, "")

    def busy(self) -> int:
        """Jobs waiting or running."""
        return len(self._tickets)


QUEUE = Queue()


def _heartbeat(job: Job, say: Callable[[str, float | None], None], done: threading.Event) -> None:
    """While a step runs long (a model load), the status line shows its seconds ticking."""
    while not done.wait(HEARTBEAT_S):
        if job.message:
            say(f"{job.message} · {time.monotonic() - job.started:.0f} s", _fraction(job.message))


def _sid(session) -> str:
    """Gradio's session hash, from a request or as given ('' outside a session: one shared visitor)."""
    return str(getattr(session, "session_hash", session) or "")


def run_job(session, what: str, work: Callable[[Callable], object], progress=None,
            alive: Callable[[], bool] | None = None, queue: Queue = QUEUE):
    """Run `work(say)` as `session`'s model job named `what` (say(fraction, desc) is the progress
    callback to hand to the studio's handler). `session`: a session hash or a request with one.
    Raises Refused when not admitted and Stopped when stopped before its turn; else returns work's
    answer. The job's final status line is then `job_line(session)`."""
    session = _sid(session)
    last = [0.0]  # Gradio hides a line given without a fraction: a step without one keeps the last

    def show(message: str, fraction: float | None = None) -> None:
        last[0] = last[0] if fraction is None else fraction
        if progress is not None:
            try:
                progress(last[0], desc=message)
            except Exception:  # noqa: BLE001 -- a closed page's progress: the job goes on
                pass

    def say(fraction, desc: str = "") -> None:  # what the studio's handlers call while loading
        job.message = desc or job.message
        show(desc, fraction)

    job = Job(report=lambda message: show(message, _fraction(message)), alive=alive)
    ticket = queue.admit(session, what, job)
    done = threading.Event()
    line = f"{what}: refused"
    try:
        queue.wait_turn(ticket, show)
        job.message = "starting"
        show(f"{what}: starting")
        beat = contextvars.copy_context()  # Gradio finds the event's progress through context variables
        threading.Thread(target=beat.run, args=(_heartbeat, job, show, done), daemon=True).start()
        with running(job):
            out = work(say)
        took = time.monotonic() - ticket.started
        line = (f"{what} {job.note}" if job.note else
                f"{what} stopped after {took:.1f} s ({job.reason}); what was computed is shown" if job.reason
                else f"{what} done in {took:.1f} s")
        return out
    except Stopped as err:
        line = f"{what} {job.note}" if job.note else f"{what}: {err}"
        raise
    except BaseException:
        line = f"{what} failed (the error is shown)"
        raise
    finally:
        done.set()
        queue.finish(ticket, line)


def stop_job(session, reason: str = "stopped by you") -> str:
    """The Stop button (and a closed page): the session's job ends at its next step."""
    return QUEUE.stop(_sid(session), reason)


def leave(session) -> None:
    """A closed page: its job (waiting or running) stops."""
    QUEUE.stop(_sid(session), "the visitor left")


def job_line(session) -> str:
    """The session's status line now (its job's place or step, else how its last job ended)."""
    return QUEUE.line(_sid(session))


# ---------------------------------------------------------------- model loads Stop does not wait for
@dataclass
class _Load:
    """One model load in flight: the loader thread's latest line and how many jobs wait on it."""
    future: Future
    message: str = "waiting for another model's load to finish"
    fraction: float | None = None
    waiting: int = 0


_LOADS: dict = {}              # model key -> its _Load while in flight
_LOADS_LOCK = threading.Lock()
_ONE_LOAD = threading.Lock()   # loads run one at a time


def _load_into(entry: _Load, key, name, load: Callable) -> None:
    """A loader thread (a daemon: a stalled download never holds the server's exit): `load`
    reporting to `entry`, read by whichever jobs wait on it; a load dropped while queued is skipped."""
    def say(fraction, message):
        entry.fraction, entry.message = fraction, message
    with _ONE_LOAD:
        try:
            if entry.future.set_running_or_notify_cancel():
                entry.future.set_result(load(name, progress=say))
        except BaseException as err:  # noqa: BLE001 -- handed to the jobs waiting on it
            entry.future.set_exception(err)
        finally:
            with _LOADS_LOCK:
                if _LOADS.get(key) is entry:
                    del _LOADS[key]


def load_model(name=None, progress: Callable | None = None, load: Callable | None = None):
    """`run.load_model(name)` for the current job, such that Stop answers at once: a model load
    cannot be interrupted (a GGUF dequantized in one call, ~20 s), so it runs on a loader thread
    and the job waits on it, looking at Stop, the visitor and its time budget every LOAD_POLL_S.
    A stopped job leaves at once and the load goes on into the model cache, so the next job starts
    sooner; jobs wanting a model already loading wait on that one load (never a second copy), and
    loads run one at a time (a load nobody waits for any more and not yet begun is dropped).
    `progress(fraction, message)` gets the load's lines. Outside a job: `load` called directly."""
    from ..run import models

    load = load or models.load_model
    if current() is None:
        return load(name, progress=progress)
    lm = models.cached_model(name)
    if lm is not None:
        return lm
    key = models.model_key(name)
    with _LOADS_LOCK:
        entry = _LOADS.get(key)
        if entry is None or entry.future.cancelled():
            entry = _LOADS[key] = _Load(Future())
            threading.Thread(target=contextvars.Context().run, args=(_load_into, entry, key, name, load),
                             name="maskstudio-load", daemon=True).start()
        entry.waiting += 1
    shown = None
    try:
        while True:
            try:
                return entry.future.result(timeout=LOAD_POLL_S)
            except FutureTimeout:
                pass
            if progress is not None and entry.message != shown:
                shown = entry.message
                progress(entry.fraction, shown)
            if tick():
                job = current()
                load = ("the load goes on in the background, so the next job starts sooner"
                        if entry.future.running() or entry.waiting > 1 else "its load, not begun yet, is dropped")
                job.note = f"stopped at once ({job.reason}) while the model was loading: nothing computed; {load}"
                raise Stopped(f"{job.reason} while the model was loading: nothing computed yet; {load}")
    finally:
        with _LOADS_LOCK:
            entry.waiting -= 1
            if entry.waiting == 0 and entry.future.cancel() and _LOADS.get(key) is entry:
                del _LOADS[key]


def capped(value, top: int, what: str) -> int:
    """A count from the page checked against this server's cap (knobs: tighter on a Space)."""
    try:
        n = int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise Refused(f"{what} must be a whole number, got {value!r}") from None
    if not 1 <= n <= top:
        raise Refused(f"{what} must be from 1 to {top} on this server, got {n}")
    return n


def require_model(name) -> None:
    """Refuse what this server may not load for a visitor (a server path on a Space, a model off
    its list: `run.models.model_refusal`), before anything is loaded."""
    from ..run.models import model_refusal

    why = model_refusal(name, knobs.ON_SPACE, knobs.MODELS_ALLOWED)
    if why:
        raise Refused(why)


def event_alive(gradio_queue, event_id) -> Callable[[], bool]:
    """A probe for a job's `alive`: False once Gradio's queue has given the event up: its client
    left (a closed page or a dropped API client: Gradio sets `alive = False`), or it was cancelled
    (Gradio's `cancels=` or an API client's cancel: the event leaves `active_jobs` while our thread
    still runs). An event never seen there (run outside the queue) stays alive."""
    seen = [False]

    def alive() -> bool:
        events = [e for job in (getattr(gradio_queue, "active_jobs", None) or []) if job for e in job
                  if getattr(e, "_id", None) == event_id]
        if events:
            seen[0] = True
            return all(getattr(e, "alive", True) for e in events)
        return not seen[0]
    return alive


def call_as_job(session, what: str, fn: Callable, args, kwargs: dict, progress_type: type,
                alive: Callable[[], bool] | None = None):
    """`fn(*args, **kwargs)` as `session`'s model job (`run_job`): the argument of `progress_type`
    (the page's progress bar, where Gradio puts it) is replaced by the job's reporter."""
    bar = next((a for a in args if isinstance(a, progress_type)), None)
    return run_job(session, what, lambda say: fn(*[say if a is bar else a for a in args], **kwargs), bar, alive)
