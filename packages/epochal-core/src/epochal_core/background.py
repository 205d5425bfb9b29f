"""Runs integrations off the training thread and isolates their failures.

Each integration resolved from ``report_to`` gets a :class:`Reporter`: its events
are copied into a bounded queue and run, in order and in batches, by one
background thread. A slow tracker therefore costs the loop only the copy of a
small dict, and a fast one costs no thread switch per event.

Queue policy: the queue holds :data:`QUEUE_CAPACITY` events. When it is full the
training thread *waits* for room (and warns once): logs are never dropped, and
memory stays bounded. Events that must have finished before training goes on
(``on_save``: the files may be rotated later; ``on_train_end``; ``on_exception``)
are queued behind the others and the training thread waits until they have run;
``on_init_end`` runs on the training thread itself (see :data:`TRAINING_THREAD_EVENTS`).

Bounded waits: every wait on an integration (the sync events above, a full
queue, :meth:`Reporter.drain` before a save or an evaluation's return,
:meth:`Reporter.close` at interpreter exit) ends at the latest when one call
of the integration has run for ``timeout`` seconds
(``TrainingArguments.integration_timeout``). Such an integration is declared
*stalled*: a warning names it, the call it is stuck in and for how long, and
how many events it had not delivered; an :class:`IntegrationFailure` holding
an :class:`IntegrationStalled` is recorded; it is detached (never called again,
its thread is left behind as a daemon, so the process still exits) and
training, the save and shutdown go on. A slow tracker that keeps delivering is
never declared stalled: only one call running past the bound is. Integrations
with ``run_inline = True`` run on the training thread and cannot be bounded:
they must never block.

Failures: an exception raised by an integration is reported once with its
traceback, the integration receives ``on_exception`` (so it can close its run as
failed) and is disabled, and training continues. In strict mode
(``TrainingArguments.strict_integrations``) the exception (or the
:class:`IntegrationStalled` of a stall) is re-raised on the training thread
instead, at the next event or drain.
"""

from __future__ import annotations

import atexit
import copy
import logging
import threading
import traceback
import weakref
from collections import deque
from time import monotonic
from time import time as _now
from typing import Any

from .handler import overridden_events
from .integrations import IntegrationCallback

__all__ = [
    "BATCH_INTERVAL", "DEFAULT_TIMEOUT", "QUEUE_CAPACITY", "IntegrationFailure", "IntegrationStalled", "Reporter",
]

logger = logging.getLogger(__name__)

QUEUE_CAPACITY = 10_000
#: Seconds a queued event waits at most before the worker runs it (the batching interval).
BATCH_INTERVAL = 0.2
#: A backlog this long wakes the worker before its interval is up.
WAKE_BACKLOG = 512
#: The worker publishes its progress (for drains and a full queue) every this many events.
PROGRESS_EVERY = 64
#: Seconds one integration call may run before a wait on it declares it stalled.
DEFAULT_TIMEOUT = 60.0
#: Events the training thread waits for (after everything queued before them).
SYNC_EVENTS = frozenset({"on_init_end", "on_save", "on_train_end", "on_exception", "on_push_begin"})
#: Sync events that run on the training thread itself: an integration reads thread-local context
#: there (MLflow's active run belongs to the thread that started it). Once, in ``Trainer.__init__``.
TRAINING_THREAD_EVENTS = frozenset({"on_init_end"})
_STOP = object()
_live: weakref.WeakSet[Reporter] = weakref.WeakSet()


def _shallow_copy(obj: Any) -> Any:
    # A fifth of copy.copy's cost for plain dataclasses (it runs for every queued event):
    # assigning a copied __dict__ is twice as fast as updating the new instance's own.
    try:
        new = object.__new__(type(obj))
        new.__dict__ = obj.__dict__.copy()
    except (AttributeError, TypeError):
        return copy.copy(obj)
    return new


@atexit.register
def _drain_all() -> None:
    # Interpreter exit: give every integration its pending logs before the daemon threads die.
    # Bounded like every other wait: a stalled SDK cannot hold the exit.
    for reporter in list(_live):
        try:
            reporter.close()
        except Exception as err:  # strict mode re-raises a stall; at exit it can only be reported
            logger.warning("Integration %r did not close cleanly at exit: %s", reporter.name, err)


class IntegrationStalled(RuntimeError):
    """An integration call ran longer than ``TrainingArguments.integration_timeout``; it was detached."""


class IntegrationFailure:
    """One integration that failed during a run.

    Args:
        name: The integration's ``report_to`` name.
        event: Event that raised.
        error: The exception.
        traceback: Formatted traceback.
    """

    def __init__(self, name: str, event: str, error: BaseException, traceback: str) -> None:
        self.name = name
        self.event = event
        self.error = error
        self.traceback = traceback

    def __repr__(self) -> str:
        return f"IntegrationFailure({self.name!r}, {self.event!r}, {self.error!r})"


class Reporter:
    """Dispatch target that runs one integration callback in a background thread.

    The hand-off is batched: the training thread appends events to a deque (no
    lock, no thread wake-up per event) and the worker wakes every
    :data:`BATCH_INTERVAL` seconds, or as soon as the backlog reaches
    :data:`WAKE_BACKLOG` events or a drain is requested, and runs everything
    pending in order. A per-event wake-up (``queue.Queue``) cost more CPU than a
    small tracker's own work, and on a 2-core machine every thread switch is paid
    by the training loop.

    Args:
        callback: The integration callback.
        name: Its ``report_to`` name (for messages).
        strict: Re-raise its errors on the training thread instead of disabling it.
        failures: List that collects an :class:`IntegrationFailure` when it fails.
        capacity: Most events waiting at once; when reached, training waits for room.
        timeout: Seconds one of its calls may run while training waits on it before
            it is declared stalled and detached.
    """

    def __init__(
        self,
        callback: Any,
        name: str,
        *,
        strict: bool = False,
        failures: list[IntegrationFailure] | None = None,
        capacity: int = QUEUE_CAPACITY,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"Reporter(capacity={capacity!r}): the queue must hold at least 1 event.")
        if not timeout > 0:
            raise ValueError(f"Reporter(timeout={timeout!r}): use a number of seconds > 0.")
        self.timeout = float(timeout)
        self.callback = callback
        self.name = name
        self.strict = strict
        self.failures = failures if failures is not None else []
        self.capacity = capacity
        self.inline = bool(getattr(callback, "run_inline", False))
        # Not called when it is IntegrationCallback's no-op (one call fewer per inline event).
        end_batch = getattr(type(callback), "end_batch", None)
        self._has_end_batch = callable(end_batch) and end_batch is not IntegrationCallback.end_batch
        # Integrations that take it get the time each queued event was emitted (see IntegrationCallback).
        self._stamps = hasattr(callback, "event_time")
        # An IntegrationCallback's on_log body, called with the keywords as one dict (see its docs).
        get_handler = getattr(callback, "queued_log_handler", None)
        self._log_handler = get_handler() if callable(get_handler) else None
        self.__epochal_events__ = overridden_events(callback)
        self._pending: deque[Any] = deque()
        # Wakes the worker early (backlog, drain, close); it also wakes on its own every BATCH_INTERVAL.
        self._wake = threading.Event()
        # One call into the integration at a time: the worker's end_batch on a quiet wake-up must not
        # overlap an event the training thread runs itself (on_save, on_train_end -> finish).
        self._call_lock = threading.RLock()
        # Guards the counters below; notified when the worker finished a batch.
        self._progress = threading.Condition(threading.Lock())
        self._submitted = 0  # written by the training thread only
        self._done = 0  # written by the worker only
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failure: IntegrationFailure | None = None
        self._reported = False
        self._warned_full = False
        # (event, monotonic start) of the call the worker is in, else None: what a stall reports.
        self._running: tuple[str, float] | None = None
        self.stalled = False
        self.disabled = False
        for event in self.__epochal_events__:
            setattr(self, event, self._make_dispatcher(event))

    def _make_dispatcher(self, event: str) -> Any:
        if self.inline and event not in SYNC_EVENTS:
            return self._make_inline_dispatcher(event)
        sync = self.inline or event in SYNC_EVENTS
        on_training_thread = self.inline or event in TRAINING_THREAD_EVENTS
        # An integration's on_log body never sees the control object: no snapshot of it then.
        copy_control = not (event == "on_log" and self._log_handler is not None)

        # Positional-only: CPython matches each of the seven keywords the handler passes against
        # every named parameter (a string comparison each) unless the parameters cannot take them.
        def dispatch(args: Any, state: Any, control: Any, /, **kwargs: Any) -> None:
            if self.disabled:
                self._check()
                return None
            if on_training_thread:
                if not self.inline:
                    self.drain()  # bounded, like every wait on the worker
                    if self.disabled:
                        self._check()
                        return None
                if self._stamps:
                    self.callback.event_time = None  # runs now: its own clock is right
                self._run(event, args, state, control, kwargs)
                if not self.disabled:
                    self._end_batch(args, state, control)
                self._check()
                return None
            if sync:
                # On the worker, after what is queued, so a stalled call can be waited for with a bound.
                self._enqueue_sync(event, args, state, control, kwargs)
                self._wait_for(self._submitted, event)
                self._check()
                return None
            self._enqueue(event, args, state, _shallow_copy(control) if copy_control else control, kwargs)
            return None

        return dispatch

    def _make_inline_dispatcher(self, event: str) -> Any:
        # An inline integration's everyday events (its logs): nothing is ever queued for it, so
        # there is nothing to drain; it runs now, so event_time stays None.
        run, has_end_batch = self._call, self._has_end_batch

        def dispatch(args: Any, state: Any, control: Any, /, **kwargs: Any) -> None:
            if not self.disabled:
                run(event, args, state, control, kwargs)
                if has_end_batch and not self.disabled:
                    run("end_batch", args, state, control, {})
            if self._failure is not None:
                self._check()
            return None

        return dispatch

    @property
    def backlog(self) -> int:
        """Events queued and not yet run."""
        return self._submitted - self._done

    def _enqueue(self, event: str, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> None:
        # ``control`` is already a snapshot (or unused by the event's handler).
        if self._failure is not None:
            self._check()
        # Snapshot what the loop mutates, so the worker sees the values of this event.
        # (kwargs is this call's own dict: replacing its entries touches no caller's.)
        state = _shallow_copy(state)
        logs = kwargs.get("logs")
        if logs is not None:
            kwargs["logs"] = dict(logs)
        metrics = kwargs.get("metrics")
        if metrics is not None:
            kwargs["metrics"] = dict(metrics)
        if self._thread is None:
            self._start()
        if self._submitted - self._done >= self.capacity:
            self._wait_for_room()
            if self.disabled:  # declared stalled while training waited for room
                return
        # deque.append is atomic: the worker pops from the other end without a lock.
        self._pending.append((event, args, state, control, kwargs, _now()))
        self._submitted += 1
        if self._submitted - self._done >= WAKE_BACKLOG:
            self._wake.set()

    def _enqueue_sync(self, event: str, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> None:
        # The training thread waits for it: the live objects are passed (no snapshot), and the
        # missing emission time marks it for the worker.
        if self._failure is not None:
            self._check()
        if self._thread is None:
            self._start()
        self._pending.append((event, args, state, control, kwargs, None))
        self._submitted += 1
        self._wake.set()

    def _start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=f"epochal-{self.name}", daemon=True)
        self._thread.start()
        _live.add(self)

    def _wait_for_room(self) -> None:
        if not self._warned_full:
            self._warned_full = True
            logger.warning(
                "Integration %r is slower than training: its queue of %d events is full, "
                "so training waits for it (no logs are dropped).",
                self.name, self.capacity,
            )
        self._wait_for(self._submitted - self.capacity + 1, "a full queue")

    def _wait_for(self, target: int, waiting_for: str) -> None:
        """Wait until ``target`` events have run, or declare the integration stalled (then return)."""
        thread = self._thread
        if thread is None:
            return
        stuck: tuple[str, float] | None = None
        self._wake.set()
        with self._progress:
            while self._done < target and not self.stalled and thread.is_alive():
                running = self._running
                if running is not None and monotonic() - running[1] >= self.timeout:
                    stuck = running
                    break
                left = self.timeout - (monotonic() - running[1]) if running is not None else BATCH_INTERVAL
                self._progress.wait(min(BATCH_INTERVAL, max(left, 0.001)))
                self._wake.set()
        if stuck is not None:
            self._declare_stalled(stuck, waiting_for)

    def _declare_stalled(self, stuck: tuple[str, float], waiting_for: str) -> None:
        # Detach: never called again (every dispatcher and the worker check ``disabled``); the
        # worker thread is a daemon left behind, so the process still exits if it never returns.
        event, started = stuck
        self.disabled = True
        self.stalled = True
        self._stopping = True  # should the call ever return, the worker ends
        self._thread = None
        _live.discard(self)
        undelivered = self._submitted - self._done
        error = IntegrationStalled(
            f"Integration {self.name!r} stalled: its {event} call has not returned after "
            f"{monotonic() - started:.1f} s (TrainingArguments.integration_timeout={self.timeout:g}) while "
            f"training waited for {waiting_for}; {undelivered} event(s) were not delivered to it. It was "
            "detached (never called again); training, checkpoints and shutdown go on without it."
        )
        self._failure = IntegrationFailure(self.name, event, error, "")
        self._reported = False
        self._check()

    def _work(self) -> None:
        pending = self._pending
        callback, stamps = self.callback, self._stamps
        last = None
        while True:
            self._wake.wait(BATCH_INTERVAL)
            self._wake.clear()
            ran = 0
            while pending:
                event, args, state, control, kwargs, emitted = pending.popleft()
                if emitted is None:
                    # A sync event: what was logged before it is written out first, and the
                    # training thread learns at once that it ran.
                    if last is not None and not self.disabled:
                        self._end_batch(*last)
                    if not self.disabled:
                        if stamps:
                            callback.event_time = None
                        self._run(event, args, state, control, kwargs)
                        if not self.disabled:
                            self._end_batch(args, state, control)
                    last = None
                    self._advance(ran + 1)
                    ran = 0
                    continue
                if not self.disabled:
                    if stamps:
                        callback.event_time = emitted
                    self._run(event, args, state, control, kwargs)
                last = (args, state, control)
                ran += 1
                if ran >= PROGRESS_EVERY:
                    self._advance(ran)
                    ran = 0
            # Also on wake-ups with nothing new: what an integration still holds back gets written
            # even when no further log comes (end_batch is cheap when there is nothing to do).
            if last is not None and not self.disabled:
                self._end_batch(*last)
            self._advance(ran)
            if self._stopping and not pending:
                return

    def _end_batch(self, args: Any, state: Any, control: Any) -> None:
        # One write-out per batch instead of one per event: each blocking call releases
        # the GIL, and every release costs the training thread a switch.
        if self._has_end_batch:
            self._run("end_batch", args, state, control, {})

    def _advance(self, ran: int) -> None:
        with self._progress:
            self._done += ran
            self._progress.notify_all()

    def _run(self, event: str, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> None:
        with self._call_lock:
            self._call(event, args, state, control, kwargs)

    def _call(self, event: str, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> None:
        # Unlocked: only an inline integration's everyday events call it directly (its worker never
        # runs anything, so there is nothing to exclude and its logs skip the lock).
        if not self.inline:  # an inline call runs on the training thread: nothing waits on it
            self._running = (event, monotonic())
        try:
            if event == "on_log" and self._log_handler is not None:
                self._log_handler(args, state, kwargs.get("logs"), kwargs)
            elif event == "end_batch":
                self.callback.end_batch()
            else:
                getattr(self.callback, event)(args, state, control, **kwargs)
        except Exception as err:
            self._fail(event, err, args, state, control, kwargs)
        finally:
            self._running = None

    def _fail(self, event: str, err: Exception, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> None:
        # The integration raised ``err`` in ``event``: disable it, record the failure, let it close its run.
        if self.stalled:  # a detached call that returned late: it was already reported
            return
        self.disabled = True
        self._failure = IntegrationFailure(self.name, event, err, traceback.format_exc())
        # A disabled integration gets no more events, so give it its crash event now:
        # it closes its run as failed instead of leaving it open until exit.
        if event != "on_exception" and "on_exception" in self.__epochal_events__:
            try:
                self.callback.on_exception(args, state, control, **{**kwargs, "exception": err})
            except Exception:
                logger.debug("Integration %r also failed to close after its error.", self.name, exc_info=True)

    def _check(self) -> None:
        failure = self._failure
        if failure is None or self._reported:
            return
        self._reported = True
        self.failures.append(failure)
        if self.strict:
            raise failure.error
        if isinstance(failure.error, IntegrationStalled):
            logger.warning("%s", failure.error)
            return
        logger.warning(
            "Integration %r failed in %s and was disabled; training continues.\n%s",
            failure.name, failure.event, failure.traceback,
        )

    def drain(self) -> None:
        """Wait until every queued event has run, or the integration is declared stalled.

        Raises:
            Exception: In strict mode, the integration's error or :class:`IntegrationStalled`.
        """
        if self._submitted != self._done:
            self._wait_for(self._submitted, "its queue to drain")
        self._check()

    def close(self) -> None:
        """Drain the queue and stop the worker thread (both bounded by ``timeout``).

        Raises:
            Exception: In strict mode, the integration's error or :class:`IntegrationStalled`.
        """
        self.drain()
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(self.timeout)
            running = self._running
            if thread.is_alive() and running is not None:
                self._declare_stalled(running, "its worker to stop")
            self._thread = None
        _live.discard(self)
