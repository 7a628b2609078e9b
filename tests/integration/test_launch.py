"""The launch kit against stand-ins for sbatch, srun and scontrol: the rendered scripts are run, not only read.

The stand-ins are small shell scripts put first on PATH: ``sbatch`` records its arguments and
answers job ids; ``scontrol`` expands a node list and records requeues; ``srun`` records its
arguments and environment and then plays a training that finishes, fails, or stops once the
STOP file appears (as ``olmo_core.stop`` makes OLMo-core do). A real single-node SLURM run is
in ``test_slurm.py``.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from olmoe_gatepro.cli import main

ROOT = Path(__file__).resolve().parents[2]
DATA = "--data.paths=[/data/mix/*.npy]"

STAND_INS = {
    "sbatch": """#!/bin/bash
echo "$*" >> "$STAND_IN_LOG/sbatch"
[ -n "${SBATCH_FAILS:-}" ] && { echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1; }
count=$(wc -l < "$STAND_IN_LOG/sbatch")
echo "$((100 + count));cluster"
""",
    "scontrol": """#!/bin/bash
echo "$*" >> "$STAND_IN_LOG/scontrol"
if [ "$1 $2" = "show hostnames" ]; then
    [ "$3" = "node[001-002]" ] || { echo "unexpected node list $3" >&2; exit 1; }
    printf 'node001\\nnode002\\n'
fi
""",
    "srun": """#!/bin/bash
printf '%s\\n' "$@" > "$STAND_IN_LOG/srun"
echo "$WANDB_RUN_ID $WANDB_RESUME" > "$STAND_IN_LOG/srun-env"
for argument in "$@"; do
    case $argument in --train.save_folder=*) save_folder=${argument#--train.save_folder=} ;; esac
done
case $SRUN_PLAYS in
    finish) mkdir -p "$save_folder" && echo '{"step": 4}' > "$save_folder/train.done" ;;
    fail) exit 3 ;;
    stop) until [ -e "$save_folder/STOP" ]; do sleep 0.05; done ;;  # saves a checkpoint, ends well
esac
""",
}


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """A folder of stand-ins first on PATH; returns the folder their records go to."""
    bin_dir, log = tmp_path / "bin", tmp_path / "stand-in-log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    return log


def _reproduce(out: Path, *args: str) -> int:
    return main(["reproduce", "--preset", "olmoe-1b-7b-400b", "--out", str(out), "--launcher", "slurm", "--nodes", "2",
                 DATA, *args])


def test_dry_run_prints_the_scripts_and_submits_nothing(tmp_path, stand_ins, capsys):
    out = tmp_path / "run"
    assert _reproduce(out, "--dry-run", "--partition", "gpu", "--setup", "module load cuda") == 0
    printed = capsys.readouterr().out
    sections = dict(part.split("\n", 1) for part in printed.split("# ---- ")[1:])
    assert list(sections) == [f"{out}/launch/train-baseline.sbatch", f"{out}/launch/train-gatepro.sbatch",
                              f"{out}/launch/finish.sbatch", "submitted with: sbatch --parsable <train script> (each), "
                              "then sbatch --parsable --dependency=singleton,afterok:<their job ids> "
                              "--kill-on-invalid-dep=yes finish.sbatch"]
    baseline = sections[f"{out}/launch/train-baseline.sbatch"]
    options = [line.removeprefix("#SBATCH ") for line in baseline.splitlines() if line.startswith("#SBATCH ")]
    assert options == ["--job-name=" + options[0].removeprefix("--job-name="), "--nodes=2", "--ntasks-per-node=1",
                       "--exclusive", "--time=48:00:00", "--requeue", "--signal=B:USR1@900", "--dependency=singleton",
                       "--open-mode=append", f"--output={out}/launch/logs/%x-%j.out", "--partition=gpu",
                       "--gpus-per-node=8"]
    assert options[0].startswith("--job-name=og-baseline-")
    assert "\nmodule load cuda\n" in baseline
    assert "# cost olmoe-1b-7b-baseline-400b" in printed  # on 2 x 8 GPUs
    assert not out.exists() and not os.listdir(stand_ins)  # nothing written, nothing submitted


def _render(out: Path, stand_ins: Path, *args: str) -> dict[str, Path]:
    """Write the scripts (with the stand-in sbatch) and forget the submissions."""
    assert _reproduce(out, *args) == 0
    (stand_ins / "sbatch").unlink()
    return {name: out / "launch" / f"{name}.sbatch" for name in ("train-baseline", "train-gatepro", "finish")}


def _start(script: Path, plays: str) -> subprocess.Popen:
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_NNODES": "2",
           "SLURM_CPUS_ON_NODE": "16", "SRUN_PLAYS": plays}
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_training_script_runs_one_torchrun_per_node_with_a_c10d_rendezvous(tmp_path, stand_ins):
    out = tmp_path / "run"
    scripts = _render(out, stand_ins)
    job = _start(scripts["train-gatepro"], "finish")
    log, _ = job.communicate(timeout=60)
    assert job.returncode == 0, log
    assert "gatepro: training complete" in log
    config = ROOT / "olmoe_gatepro/configs/olmoe-1b-7b/gatepro.yaml"
    assert _lines(stand_ins / "srun") == [
        "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1",
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node001:29500", "--rdzv-id=77", "--max-restarts=0",
        "-m", "olmoe_gatepro.cli", "train", str(config.resolve()), DATA, f"--train.save_folder={out}/gatepro",
    ]
    run_id, resume = (stand_ins / "srun-env").read_text().split()
    assert run_id.startswith("olmoe-1b-7b-gatepro-400b-") and resume == "allow"
    assert _lines(stand_ins / "scontrol") == ["show hostnames node[001-002]"]  # no requeue


def _until(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("sent, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_a_stop_signal_makes_the_training_stop_and_the_time_limit_warning_requeues(tmp_path, stand_ins, sent, requeued):
    out = tmp_path / "run"
    scripts = _render(out, stand_ins)
    job = _start(scripts["train-baseline"], "stop")
    _until(lambda: (stand_ins / "srun").exists(), "srun")
    os.kill(job.pid, sent)  # SLURM's --signal=B:USR1 before the time limit; or a pre-emption's SIGTERM
    log, _ = job.communicate(timeout=60)
    assert not (out / "baseline/STOP").exists()  # removed, so the next start trains
    assert ("requeue 77" in _lines(stand_ins / "scontrol")) == requeued, log
    if requeued:
        assert job.returncode == 0 and "requeued, it resumes from the latest checkpoint" in log
    else:  # pre-empted: SLURM requeues it itself (PreemptMode=REQUEUE) or it was cancelled on purpose
        assert job.returncode == 1 and "not requeued" in log and "SIGTERM" in log


def test_a_failed_training_is_not_requeued(tmp_path, stand_ins):
    out = tmp_path / "run"
    scripts = _render(out, stand_ins)
    job = _start(scripts["train-baseline"], "fail")
    log, _ = job.communicate(timeout=60)
    assert job.returncode == 3 and "not requeued" in log and f"sbatch {scripts['train-baseline']}" in log
    assert _lines(stand_ins / "scontrol") == ["show hostnames node[001-002]"]


def test_finish_job_waits_for_both_trainings_and_runs_the_pipeline_again(tmp_path, stand_ins):
    out = tmp_path / "run"
    scripts = _render(out, stand_ins, "--shipped-eval-data")
    text = scripts["finish"].read_text()
    command = shlex.split(text.strip().splitlines()[-1])
    assert command == ["exec", sys.executable, "-m", "olmoe_gatepro.cli", "reproduce", "--preset", "olmoe-1b-7b-400b",
                       "--out", str(out), "--shipped-eval-data", DATA]
    job = subprocess.run(["bash", str(scripts["finish"])], env={**os.environ, "SLURM_JOB_ID": "9"},
                         capture_output=True, text=True, timeout=60)
    assert job.returncode == 1 and f"{out}/baseline has not finished training" in job.stdout


def test_submission_chain_and_resubmission(tmp_path, stand_ins, capsys):
    out = tmp_path / "run"
    assert _reproduce(out) == 0
    launch = out / "launch"
    assert _lines(stand_ins / "sbatch") == [
        f"--parsable {launch}/train-baseline.sbatch", f"--parsable {launch}/train-gatepro.sbatch",
        f"--parsable --dependency=singleton,afterok:101:102 --kill-on-invalid-dep=yes {launch}/finish.sbatch"]
    assert all(os.access(launch / name, os.X_OK) for name in ("train-baseline.sbatch", "finish.sbatch"))
    assert (launch / "logs").is_dir()  # SLURM does not create the log folder
    records = [json.loads(line) for line in _lines(launch / "jobs.jsonl")]
    assert [(record["job"], record["what"]) for record in records] == [
        ("101", "train baseline"), ("102", "train gatepro"), ("103", "convert, evaluate, compare")]
    assert "watch: squeue -j 101,102,103" in capsys.readouterr().out
    (out / "baseline").mkdir()
    (out / "baseline/train.done").write_text("{}\n")
    (stand_ins / "sbatch").unlink()
    assert _reproduce(out) == 0  # the baseline is trained: only the GatePro training and the finish
    assert _lines(stand_ins / "sbatch") == [
        f"--parsable {launch}/train-gatepro.sbatch",
        f"--parsable --dependency=singleton,afterok:101 --kill-on-invalid-dep=yes {launch}/finish.sbatch"]
    assert "train baseline: done, not submitted" in capsys.readouterr().out


def test_refused_before_anything_is_queued(tmp_path, stand_ins, capsys, monkeypatch):
    out = tmp_path / "run"
    for args, message in (
        (["--nodes", "32"], "must be a multiple of train.micro_batch_sequences (8) x 256 ranks"),
        (["--data.paths=[data/tokens/*.npy]"], "data path 'data/tokens/*.npy' is relative"),
        (["--callbacks.wandb.enabled=true"], "WANDB_API_KEY is not set"),
        (["--launcher", "srun torchrun", "--partition", "gpu"], "--partition is for --launcher slurm"),
        (["--time", "0:10:00"], "stop_before (900 s) must be shorter than the time limit 0:10:00"),
    ):
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        with pytest.raises(SystemExit) as error:
            _reproduce(out, *args)
        assert error.value.code == 2 and message in capsys.readouterr().err, args
    monkeypatch.setenv("SBATCH_FAILS", "1")
    assert _reproduce(out) == 1
    assert "Invalid account" in capsys.readouterr().err
    assert _lines(stand_ins / "sbatch") == [f"--parsable {out}/launch/train-baseline.sbatch"]


def test_torchrun_node_scripts_for_clusters_without_slurm(tmp_path, stand_ins, monkeypatch, capsys):
    fake_python = tmp_path / "bin/python"
    fake_python.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STAND_IN_LOG/python"\n')
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))  # the interpreter the scripts start
    out = tmp_path / "run"
    assert main(["reproduce", "--preset", "olmoe-1b-7b-400b", "--out", str(out), "--launcher", "torchrun-nodes",
                 "--nodes", "4", DATA]) == 0
    assert f"HEAD=<first node> bash {out}/launch/train-gatepro-node.sh" in capsys.readouterr().out
    script = out / "launch/train-gatepro-node.sh"
    unset = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**os.environ, "HEAD": ""})
    assert unset.returncode != 0 and "set HEAD" in unset.stderr
    started = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**os.environ, "HEAD": "n7"})
    assert started.returncode == 0, started.stderr
    arguments = _lines(stand_ins / "python")
    assert arguments[:9] == ["-m", "torch.distributed.run", "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                             "--rdzv-endpoint=n7:29500", arguments[6], "--max-restarts=0", "-m"]
    assert arguments[6].startswith("--rdzv-id=olmoe-1b-7b-gatepro-400b-")
    assert arguments[-1] == f"--train.save_folder={out}/gatepro"
    (out / "gatepro/STOP").parent.mkdir(parents=True)
    (out / "gatepro/STOP").touch()
    stopped = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**os.environ, "HEAD": "n7"})
    assert stopped.returncode == 2 and "remove it to train" in stopped.stderr
