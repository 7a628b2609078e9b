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


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet_idle_worker", "python's own handler"])
def test_a_ctrl_c_to_idle_pool_workers_is_kept_for_their_next_job(capfd, quiet):
    """Ctrl-C goes to the whole process group, idle workers too. With ``quiet_idle_worker`` an idle worker stays
    up, prints nothing and raises the interrupt in its next job; with Python's handler it dies with a traceback
    (what a reproduce run printed when one worker had finished its last job while the other still trained)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from olmoe_gatepro.interrupts import interruptible_job, quiet_idle_worker

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                             initializer=quiet_idle_worker if quiet else None) as pool:
        for started in [pool.submit(interruptible_job, time.sleep, 0.5) for _ in range(2)]:
            started.result()  # two processes (the second job found the first one busy), both idle now
        workers = list(pool._processes)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        try:
            jobs = [pool.submit(interruptible_job, os.getpid) for _ in range(2)]
            outcomes = [type(job.exception(timeout=60)) for job in jobs]
        except BrokenProcessPool:  # the dead workers were noticed before the jobs were taken
            outcomes = [BrokenProcessPool]
    printed = capfd.readouterr().err
    if quiet:
        assert outcomes == [KeyboardInterrupt, KeyboardInterrupt] and "Traceback" not in printed, printed
    else:
        assert BrokenProcessPool in outcomes and "KeyboardInterrupt" in printed


def test_ctrl_c_stops_a_parallel_prepare_data_and_the_rerun_writes_the_clean_files(tmp_path):
    """A real SIGINT to prepare-data's process group (two workers) once a unit is named: exit 130, one line, no
    traceback and no partial shard; only units the manifest records stay, and the rerun ends with the files of
    an uninterrupted run byte for byte."""
    import json

    from interrupting import CLI, interrupt_once, run

    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(12):  # 12 units of about 6 MB: seconds of work, so that the signal finds it busy
        (inputs / f"{index}.jsonl").write_text("".join(json.dumps({"text": f"file {index} doc {j} " * 2000}) + "\n"
                                                       for j in range(150)))
    files = sorted(str(path) for path in inputs.iterdir())

    def prepare(out):
        return [*CLI, "prepare-data", *files, "--out", str(out), "--workers", "2", "--tokens-per-file", "1000000"]

    assert run(prepare(tmp_path / "clean")).returncode == 0
    cut = tmp_path / "cut"
    code, output, seconds = interrupt_once(prepare(cut), (cut / "manifest.json").exists, tmp_path / "cut.log")
    assert code == 130 and "olmoe-gatepro prepare-data: interrupted" in output and "Traceback" not in output, output
    manifest = json.loads((cut / "manifest.json").read_text())
    assert not manifest["complete"], "the run ended before the signal: the test says nothing"
    assert sorted(path.name for path in cut.glob("part-*.npy")) == sorted(shard["path"] for shard in manifest["shards"])
    assert not list(cut.glob("*.partial"))
    assert run(prepare(cut)).returncode == 0
    assert {path.name: path.read_bytes() for path in cut.glob("part-*.npy")} == \
        {path.name: path.read_bytes() for path in (tmp_path / "clean").glob("part-*.npy")}
