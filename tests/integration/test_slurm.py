"""``reproduce --launcher slurm`` on a real single-node SLURM cluster that this module starts and stops.

The cluster is Debian's ``slurmctld``/``slurmd`` with ``munge`` (``apt-get install slurmctld slurmd
slurm-client munge``), run as root from a temporary folder: its own munge socket and key, its own
ports, state and logs, reached through ``SLURM_CONF``. Without those programs, or not as root
(slurmd starts jobs as their users), the test is skipped and says why.

The olmo-core-tiny preset is submitted on the CPU with two ranks per training; the baseline
training gets SLURM's time-limit warning (SIGUSR1 to its batch script, as ``--signal=B:USR1``
sends it) after its first steps, stops after a checkpoint, requeues itself and resumes; the
finishing job starts after both trainings (``afterok``) and writes the report. The interrupted
training's final model and optimizer state must equal an uninterrupted two-rank run's.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_state import assert_same_state, checkpoint_state

from olmoe_gatepro.cli import main
from olmoe_gatepro.jsonl import read_records

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
# 8 steps of 4 x 32 tokens, two sequences a rank, a cancel check every step
OVERRIDES = ["--train.max_tokens=1024", "--train.micro_batch_sequences=2", "--train.cancel_check_interval_steps=1"]

pytestmark = [
    pytest.mark.skipif(any(shutil.which(name) is None for name in PROGRAMS),
                       reason="SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd must run as root to start jobs"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_conf(folder: Path, host: str) -> str:
    return f"""ClusterName=olmoegatepro
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MinJobAge=3600
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node cluster; yields its folder. Stops every daemon it started, by pid."""
    folder = tmp_path_factory.mktemp("slurm")
    for name in ("state", "spool"):
        (folder / name).mkdir()
    host = socket.gethostname().split(".")[0]
    (folder / "slurm.conf").write_text(_slurm_conf(folder, host))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    subprocess.run(["mungekey", "--create", f"--keyfile={folder}/munge.key"], check=True)
    started = []
    try:
        subprocess.run(["munged", "--force", f"--socket={folder}/munge.socket", f"--key-file={folder}/munge.key",
                        f"--log-file={folder}/munged.log", f"--pid-file={folder}/munged.pid",
                        f"--seed-file={folder}/munged.seed"], check=True)
        started.append(folder / "munged.pid")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(folder / "slurm.conf")], check=True)
            started.append(folder / f"{daemon}.pid")
        _until(lambda: _out(["sinfo", "-h", "-o", "%T"]) == "idle", "the node to be idle", 60,
               lambda: (folder / "slurmctld.log").read_text()[-2000:])
        yield folder
    finally:
        subprocess.run(["scancel", "--user=root"], capture_output=True)
        for pid_file in reversed(started):
            if (pid := _pid(pid_file)) is not None:
                os.kill(pid, signal.SIGTERM)
        if previous is None:
            del os.environ["SLURM_CONF"]
        else:
            os.environ["SLURM_CONF"] = previous


def _out(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True).stdout.strip()


def _until(condition, what: str, seconds: float, details=lambda: "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}\n{details()}"
        time.sleep(1)


def _job(job: str) -> dict[str, str]:
    """``scontrol show job`` as a mapping (ended jobs stay listed for MinJobAge: an hour here, not the default 5 min,
    since the test waits for all three to end)."""
    return dict(re.findall(r"(\w+)=(\S*)", _out(["scontrol", "show", "job", job])))


def test_olmo_core_tiny_on_slurm_stops_requeues_resumes_and_finishes(slurm, tmp_path, capsys):
    out = tmp_path / "run"
    started = time.monotonic()
    assert main(["reproduce", "--preset", "olmo-core-tiny", "--out", str(out), "--launcher", "slurm", "--nodes", "1",
                 "--gpus-per-node", "0", "--procs-per-node", "2", "--time", "0:30:00", "--stop-before", "120",
                 *OVERRIDES]) == 0
    baseline, gatepro, finish = re.findall(r"submitted job (\d+)", capsys.readouterr().out)
    log = out / "launch/logs"
    metrics = out / "baseline/gatepro_metrics.jsonl"
    _until(lambda: len(read_records(str(metrics))) >= 1, "the baseline's first step", 600,
           lambda: "\n".join(path.read_text()[-3000:] for path in log.glob("*")))
    assert subprocess.run(["scancel", "--batch", "--signal=USR1", baseline]).returncode == 0  # the time-limit warning
    _until(lambda: _job(baseline).get("Restarts") == "1" and _job(baseline).get("JobState") == "PENDING",
           "the baseline to requeue itself", 600)
    subprocess.run(["scontrol", "update", f"JobId={baseline}", "StartTime=now"], check=True)  # skip the requeue delay
    _until(lambda: all(_job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") for job in
                       (baseline, gatepro, finish)), "all jobs to end", 1500,
           lambda: "\n".join(path.read_text()[-3000:] for path in log.glob("*")))
    minutes = (time.monotonic() - started) / 60
    for job in (baseline, gatepro, finish):
        assert (_job(job)["JobState"], _job(job)["ExitCode"]) == ("COMPLETED", "0:0"), _job(job)
    baseline_log = next(log.glob(f"og-baseline-*-{baseline}.out")).read_text()
    assert "restart 0" in baseline_log and "restart 1" in baseline_log and "time limit near (SIGUSR1)" in baseline_log
    stopped_at = re.search(r"Loading checkpoint from '.*/baseline/step(\d+)'", baseline_log)
    assert stopped_at and 0 < int(stopped_at[1]) < 8, baseline_log[-3000:]
    assert (out / "report/table.md").stat().st_size > 0 and (out / "report/olmo-in-loop/table.md").exists()
    assert [record["step"] for record in read_records(str(metrics))] == list(range(1, 9))  # once each
    reference = tmp_path / "uninterrupted"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "olmoe_gatepro.cli", "train", str(ROOT / "configs/tiny-cpu/baseline.yaml"),
               f"--data.paths=[{out}/tokens/*.npy]", *OVERRIDES, f"--train.save_folder={reference}"]
    assert subprocess.run(command, capture_output=True, timeout=900).returncode == 0
    assert_same_state(checkpoint_state(reference / "step8"), checkpoint_state(out / "baseline/step8"))
    print(f"SLURM pipeline: {minutes:.1f} minutes")
