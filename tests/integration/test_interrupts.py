"""Ctrl-C is never lost: a SIGINT that Python swallowed in a weakref callback is raised again."""

import gc
import os
import signal
import sys
import time
import weakref

import pytest

from olmoe_gatepro.interrupts import raise_if_interrupted, remembered_interrupts


class _Object:
    pass


def _swallowed_sigint():
    """Deliver a SIGINT while a weakref callback runs: Python only reports the KeyboardInterrupt."""

    def callback(_reference):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs here, inside the callback

    thing = _Object()
    reference = weakref.ref(thing, callback)
    del thing
    gc.collect()
    return reference


def test_a_sigint_swallowed_in_a_weakref_callback_is_raised_again_and_not_printed(capsys):
    unraisable = []
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with remembered_interrupts():
            _swallowed_sigint()  # no KeyboardInterrupt comes out of here
            with pytest.raises(KeyboardInterrupt):
                raise_if_interrupted()
        raise_if_interrupted()  # outside, nothing is pending
    finally:
        sys.unraisablehook = previous_hook
    assert unraisable == []  # hidden: it is raised again instead
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_the_guard_the_sigint_is_lost():
    """What ``remembered_interrupts`` is for: with Python's own handler the Ctrl-C just vanishes."""
    unraisable = []
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        _swallowed_sigint()
        raise_if_interrupted()
    finally:
        sys.unraisablehook = previous_hook
    assert [report.exc_type for report in unraisable] == [KeyboardInterrupt]


def test_ctrl_c_ends_smoke_with_130_and_nothing_written(tmp_path):
    from interrupting import CLI, interrupt_once

    log = tmp_path / "smoke.log"
    command = [*CLI, "smoke", "--steps", "400", "--metrics-interval-steps", "1", "--global-batch-sequences", "2", "--sequence-length", "32",
               "--n-layers", "1", "--num-experts", "4", "--top-k", "2", "--d-model", "32", "--n-heads", "2",
               "--expert-hidden-size", "16", "--out", str(tmp_path / "out")]
    code, output, seconds = interrupt_once(command, lambda: log.exists() and "[baseline] step 2/" in log.read_text(),
                                           log)
    assert code == 130 and "olmoe-gatepro smoke: interrupted" in output and "Traceback" not in output, output[-3000:]
    assert "[gatepro]" not in output and not (tmp_path / "out").exists()
