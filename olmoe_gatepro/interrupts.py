"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives; inside a
weakref callback or a ``__del__`` (torch and the Trainer run many) the exception is only
printed and the program goes on. Inside ``remembered_interrupts()`` a SIGINT raises as usual
and is also remembered (a swallowed one is not printed), and long loops call
``raise_if_interrupted()`` at their safe points (a training step, a finished run), so a
swallowed Ctrl-C is raised again there.

In a process pool's worker (``initializer=quiet_idle_worker``, jobs run as
``interruptible_job(function, ...)``) a Ctrl-C to the process group stops the job under way, and
one that finds the worker idle, waiting for a job, is kept for the next job instead of ending the
worker with a traceback; once interrupted, a worker starts no further job.
"""

import contextlib
import signal
import sys
import threading

__all__ = ["remembered_interrupts", "raise_if_interrupted", "quiet_idle_worker", "interruptible_job"]

_interrupted = threading.Event()


def _remember(signum, frame) -> None:
    _interrupted.set()
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt


@contextlib.contextmanager
def remembered_interrupts():
    """Inside: SIGINT raises ``KeyboardInterrupt`` and is remembered for ``raise_if_interrupted``.

    A no-op outside the main thread (signals reach only the main thread). The handler in place
    before is restored on leaving; handlers installed inside (OLMo-core's trainer, ``continue``)
    take over while they are in place.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()
    previous, previous_hook = signal.signal(signal.SIGINT, _remember), sys.unraisablehook

    def unraisable(report) -> None:
        if not (report.exc_type is KeyboardInterrupt and _interrupted.is_set()):  # else raised again later
            previous_hook(report)

    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        _interrupted.clear()


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived inside ``remembered_interrupts()``."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


_worker_interrupted = False  # in a pool worker: a Ctrl-C arrived, so no further job starts


def _keep_for_the_next_job(signum, frame) -> None:
    global _worker_interrupted
    _worker_interrupted = True


def quiet_idle_worker() -> None:
    """A process pool's ``initializer``: a SIGINT while the worker waits for a job is kept, not raised."""
    signal.signal(signal.SIGINT, _keep_for_the_next_job)


def interruptible_job(function, *args):
    """``function(*args)`` in a pool worker: a Ctrl-C raises ``KeyboardInterrupt`` in it (never swallowed),
    and one that came before, while the worker was idle or in an earlier job, raises before it starts."""
    global _worker_interrupted
    try:
        with remembered_interrupts():
            if _worker_interrupted:  # checked inside: a SIGINT from here on raises
                raise KeyboardInterrupt
            result = function(*args)
            _worker_interrupted = _interrupted.is_set()  # one the job swallowed: no further job starts
            return result
    except KeyboardInterrupt:
        _worker_interrupted = True
        raise
