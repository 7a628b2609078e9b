"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives; inside a
weakref callback or a ``__del__`` (torch and the Trainer run many) the exception is only
printed and the program goes on. Inside ``remembered_interrupts()`` a SIGINT raises as usual
and is also remembered (a swallowed one is not printed), and long loops call
``raise_if_interrupted()`` at their safe points (a training step, a finished run), so a
swallowed Ctrl-C is raised again there.
"""

import contextlib
import signal
import sys
import threading

__all__ = ["remembered_interrupts", "raise_if_interrupted"]

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
