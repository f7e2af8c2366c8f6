"""Long runs on clusters: progress lines in a log file, metrics on disk as the run goes, signals that save a
checkpoint which resumes exactly, launch scripts that print the right commands, a process that exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ENV, LORA, ROOT, TINY, TWO_PROCESSES, losses, processes_mentioning, run_cli, small_overrides

from vlmtrain.train.layout import latest_checkpoint

pytestmark = pytest.mark.slow


def start(overrides: list[str], stdout) -> subprocess.Popen:
    command = [sys.executable, "-m", "vlmtrain.cli", "fit", str(TINY), *overrides]
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)


def wait_for(condition, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_saves_a_checkpoint_that_resumes_with_the_losses_of_an_uninterrupted_run(demo_dir, tmp_path, signum):
    common = (*LORA, "data.num_workers=2", "data.val=null", "trainer.checkpoint_every=1000", "optim.schedule=constant")
    run_cli(small_overrides(demo_dir, tmp_path / "whole", *common, "trainer.max_steps=12"))
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        process = start(small_overrides(demo_dir, tmp_path / "cut", *common, "trainer.max_steps=1000"), out)
        wait_for(lambda: log.read_text().count("\n") >= 4)  # a progress line per step: step 4 is done
        os.killpg(process.pid, signum)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    stopped = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    at = int(stopped.name[5:])
    assert 4 <= at < 12 and (tmp_path / "cut" / "summary.json").is_file()
    cut_short = " (between steps: the wait for data or the validation round cut short)"  # when no step was running
    assert stderr.strip().splitlines()[-1] in [
        f"stopped: {signal.Signals(signum).name} at step {at}{cut}; checkpoint {stopped}; "
        f"continue with: vlmtrain fit {tmp_path / 'cut' / 'recipe.yaml'} resume=auto"
        for cut in ("", cut_short)
    ]
    run_cli(small_overrides(demo_dir, tmp_path / "cut", *common, "trainer.max_steps=12", "resume=auto"))
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert [resumed[step] for step in range(12)] == [whole[step] for step in range(12)]


def test_a_run_in_a_log_file_prints_progress_lines_and_writes_metrics_as_it_goes(demo_dir, tmp_path):
    log = tmp_path / "log.txt"
    metrics = tmp_path / "run" / "metrics" / "version_0" / "metrics.csv"
    overrides = small_overrides(demo_dir, tmp_path / "run", "data.val=null", "trainer.max_steps=1000", "trainer.log_every=2",
                                "trainer.checkpoint_every=1000")
    with log.open("w") as out:
        process = start(overrides, out)
        wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3)  # rows on disk mid-run
        wait_for(lambda: log.read_text().count("\n") >= 2)
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=120)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("step 2/1000 | budget ") and lines[1].startswith("step 4/1000 | budget ")
    for line in lines[:2]:
        fields = [field.split(" ", 1)[0] for field in line.split(" | ")]
        assert fields == ["step", "budget", "loss", "tokens/s", "images/s", "data", "skipped", "elapsed", "eta"], line


def test_the_process_exits_soon_after_the_run_finishes(demo_dir, tmp_path):
    began = time.monotonic()
    with (tmp_path / "log.txt").open("w") as out:
        process = start(
            small_overrides(demo_dir, tmp_path / "run", "logger=wandb", "trainer.max_steps=2", "data.num_workers=2"), out
        )
        process.communicate(timeout=300)
    total = time.monotonic() - began
    assert process.returncode == 0
    finished = (tmp_path / "run" / "summary.json").stat().st_mtime
    assert time.time() - finished < 20, (
        f"the process lived {time.time() - finished:.0f} s after the summary ({total:.0f} s in all)"
    )


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", f"scripts/{script}", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DRY_RUN": "1", "GPUS": "8", **env},
    )


def test_launch_scripts_print_the_commands_for_one_and_for_four_nodes():
    one = dry_run("launch.sh", "recipes/tiny.yaml", "trainer.max_steps=5")
    assert one.returncode == 0 and one.stdout.split() == [
        ".venv/bin/torchrun",
        "--nnodes=1",
        "--node-rank=0",
        "--nproc-per-node=8",
        "--master-addr=127.0.0.1",
        "--master-port=29500",
        "-m",
        "vlmtrain.cli",
        "fit",
        "recipes/tiny.yaml",
        "trainer.max_steps=5",
        "resume=auto",
    ]
    four = dry_run("launch.sh", "recipes/tiny.yaml", "overwrite=true", NNODES="4", NODE_RANK="3", MASTER_ADDR="node0")
    assert four.stdout.split()[1:6] == [
        "--nnodes=4",
        "--node-rank=3",
        "--nproc-per-node=8",
        "--master-addr=node0",
        "--master-port=29500",
    ]
    assert four.stdout.split()[-1] == "overwrite=true"  # no resume=auto beside overwrite
    missing = dry_run("launch.sh", "recipes/tiny.yaml", NNODES="4")
    assert missing.returncode == 2 and "needs MASTER_ADDR" in missing.stderr
    slurm = dry_run(
        "slurm.sbatch",
        "recipes/tiny.yaml",
        "resume=runs/x/checkpoints/step-000000100",
        SLURM_NNODES="4",
        SLURM_NTASKS_PER_NODE="8",
    )
    assert slurm.returncode == 0 and slurm.stdout.splitlines() == [
        "nodes 4, tasks per node 8",
        "srun --kill-on-bad-exit=1 .venv/bin/vlmtrain fit recipes/tiny.yaml resume=runs/x/checkpoints/step-000000100 ",
    ]
    header = (ROOT / "scripts" / "slurm.sbatch").read_text()
    assert "#SBATCH --output=%x-%j.out" in header and "#SBATCH --signal=USR1@90" in header  # no folder SLURM would need


def sigterm_once_stalled(overrides: list[str], log: Path, group: bool = False) -> tuple[subprocess.Popen, str, int, float]:
    """Start a run, wait until it trained and then no step came for 3 s (it waits for data), send SIGTERM (to its
    process group with ``group``); (the process, its stderr, the progress lines it wrote, seconds to its end)."""
    with log.open("w") as out:
        process = start(overrides, out)
        wait_for(lambda: log.read_text().count("\n") >= 2)  # steps trained
        lines = -1
        while lines != log.read_text().count("\n"):  # until no step has come for 3 s: waiting for data
            lines = log.read_text().count("\n")
            time.sleep(3)
        signalled = time.monotonic()
        if group:  # every process of the run, as SLURM and Kubernetes signal them
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    return process, stderr, lines, time.monotonic() - signalled


def test_sigterm_while_the_loader_waits_for_data_stops_at_once_with_the_last_steps_checkpoint(demo_dir, tmp_path):
    # a shard whose command stalls after its samples (a pipe: that never ends): the run trains what came, then
    # waits for data; SIGTERM must end it within a grace period, with its work saved, leaving nothing behind
    stall = f"pipe:cat {demo_dir}/train-000000.tar; sleep 613"
    overrides = small_overrides(
        demo_dir, tmp_path / "run", f"data.train={stall}", "data.val=null", "data.num_workers=1", "data.batching.lookahead=2",
        "data.batching.max_batch_size=1", "trainer.max_steps=1000", "trainer.checkpoint_every=1000",
    )
    process, stderr, lines, seconds = sigterm_once_stalled(overrides, tmp_path / "log.txt")
    assert process.returncode == 128 + signal.SIGTERM and seconds < 30, stderr[-2000:]
    stopped = latest_checkpoint(tmp_path / "run" / "checkpoints")
    at = int(stopped.name[5:])
    assert at == lines and (tmp_path / "run" / "summary.json").is_file()  # every step trained, none lost
    assert stderr.strip().splitlines()[-1] == (
        f"stopped: SIGTERM at step {at} (between steps: the wait for data or the validation round cut short); "
        f"checkpoint {stopped}; continue with: vlmtrain fit {tmp_path / 'run' / 'recipe.yaml'} resume=auto"
    )
    assert processes_mentioning("sleep 613") == [] and processes_mentioning(str(tmp_path / "run")) == []


def test_sigterm_while_one_rank_of_two_waits_for_data_exits_in_time_leaving_nothing_behind(demo_dir, tmp_path):
    # one rank waiting for data holds the other inside its step: no step can end, so no checkpoint can be
    # taken; the run must still exit within the grace period, saying where it can continue from
    stall = f"pipe:cat {demo_dir}/train-000000.tar; sleep 617"
    overrides = small_overrides(
        demo_dir, tmp_path / "run", f"data.train={stall}", *TWO_PROCESSES, "data.resampled=true", "data.num_workers=1",
        "data.batching.lookahead=2", "data.batching.max_batch_size=1", "trainer.max_steps=1000", "trainer.checkpoint_every=2",
        "trainer.stop_within=5",
    )
    process, stderr, _, seconds = sigterm_once_stalled(overrides, tmp_path / "log.txt", group=True)
    assert process.returncode == 128 + signal.SIGTERM and seconds < 15, stderr[-2000:]
    latest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest is not None and stderr.strip().splitlines()[-1] == (
        "stopped: SIGTERM: no step could end within trainer.stop_within=5 s (a rank waiting for data?); "
        f"checkpoint {latest}; continue with: vlmtrain fit {tmp_path / 'run' / 'recipe.yaml'} resume=auto"
    )
    wait_for(lambda: processes_mentioning("sleep 617") == [] and processes_mentioning(str(tmp_path / "run")) == [], 10)


def test_a_signal_that_comes_while_the_metrics_file_is_written_is_handled_once_it_is_written(tmp_path):
    """The stop signals are held while metrics.csv is written (a handler raising between steps would cut a rewrite
    short and lose the rows before it): the handler runs, and raises, once the file holds every row."""
    from vlmtrain.train.interrupts import CSVMetrics

    class Stopped(Exception):
        pass

    def handle(signum, frame):
        raise Stopped

    logger = CSVMetrics(save_dir=tmp_path, name="metrics")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    logger.log_metrics({"train/loss": 0.5, "train/loss@140": 0.5}, step=1)  # a new column: the file is rewritten
    experiment, save = logger.experiment, logger.experiment.save

    def save_signalled() -> None:  # the signal arrives in the middle of the write
        os.kill(os.getpid(), signal.SIGUSR1)
        save()

    experiment.save = save_signalled
    previous = signal.signal(signal.SIGUSR1, handle)
    try:
        with pytest.raises(Stopped):
            logger.save()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert losses(tmp_path) == {0: 1.0, 1: 0.5}
