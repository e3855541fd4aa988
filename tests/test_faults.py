"""The run loop's faults: each ends in one line naming what is wrong, with nothing lost.

In-process cases call ``train_and_evaluate`` (``RunError`` / ``FloatingPointError``, one
line); the signal, ``kill -9`` and command-line cases run the real entry point in a
subprocess and read its exit status, stderr and what stayed on disk.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import tiny_config

from dgr_jax import parallel
from experiments.loop import RunError, train_and_evaluate

pytestmark = pytest.mark.usefixtures("private_cache")

QUIET = dict(progress=False, log=lambda _: None)
TINY_FLAGS = [
    "--synthetic",
    "--synthetic_size",
    "24x32",
    "--synthetic_counts",
    "6,3",
    "--backbone",
    "18",
    "--base_width",
    "4",
    "--stage_sizes",
    "1,2,1,1",
    "--head_width",
    "8",
    "--num_dummy",
    "1",
    "--batch_size",
    "2",
    "--no_progress",
]


def one_line(error) -> str:
    text = str(error)
    assert "\n" not in text and text, text
    return text


def cli(args, cache, *, timeout=600, **popen):
    env = {
        **os.environ,
        "DGR_JAX_CACHE": str(cache),
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.nyuv2", *TINY_FLAGS, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def assert_clean_failure(process, message, code=1):
    out, err = process.communicate(timeout=600)
    assert process.returncode == code, (process.returncode, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("experiments.nyuv2:")]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    return out, err


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# ---------------------------------------------------------------------------
# The work directory


def test_workdir_that_is_a_file_under_a_file_or_unwritable(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    config = tiny_config(train={"steps": 1})
    with pytest.raises(RunError) as info:
        train_and_evaluate(config, afile, **QUIET)
    assert one_line(info.value) == f"--workdir {afile}: exists and is not a folder"
    with pytest.raises(RunError) as info:
        train_and_evaluate(config, afile / "run", **QUIET)
    assert one_line(info.value) == f"--workdir {afile / 'run'}: cannot create it, {afile} is a file"
    with pytest.raises(RunError) as info:
        train_and_evaluate(config, "/sys/dgr_jax_run", **QUIET)
    assert one_line(info.value).startswith("--workdir /sys/dgr_jax_run: not writable")


def test_resume_without_a_checkpoint_and_a_used_workdir_without_resume(tmp_path):
    config = tiny_config(train={"steps": 1})
    with pytest.raises(RunError) as info:
        train_and_evaluate(config, tmp_path / "empty", resume=True, **QUIET)
    assert one_line(info.value).startswith(
        f"--resume: no checkpoint in {tmp_path / 'empty' / 'checkpoints'}"
    )
    train_and_evaluate(config, tmp_path / "used", **QUIET)
    with pytest.raises(RunError) as info:
        train_and_evaluate(config, tmp_path / "used", **QUIET)
    assert "holds a run (checkpoints, best, train.jsonl" in one_line(info.value)
    removed = []
    train_and_evaluate(
        config, tmp_path / "used", overwrite=True, progress=False, log=removed.append
    )
    assert removed[0].startswith("--overwrite: removed checkpoints, best, train.jsonl")
    assert [
        json.loads(r)["step"] for r in (tmp_path / "used" / "train.jsonl").read_text().splitlines()
    ] == [1]


# ---------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_every_dividing_the_last_step_saves_once(tmp_path):
    config = tiny_config(train={"steps": 4, "checkpoint_every": 2})  # 3 steps per epoch
    summary = train_and_evaluate(config, tmp_path, **QUIET)
    assert summary["steps"] == 4
    assert checkpoint_steps(tmp_path) == [
        3,
        4,
    ]  # max_to_keep 2: 2, 3 (epoch end), 4 (periodic and final)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    config = tiny_config(train={"epochs": 2})
    train_and_evaluate(config, tmp_path, **QUIET)
    assert checkpoint_steps(tmp_path) == [3, 6]
    arrays = sorted(
        (p for p in (tmp_path / "checkpoints" / "6" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    biggest = arrays[-1]
    biggest.write_bytes(
        biggest.read_bytes()[: biggest.stat().st_size // 3]
    )  # truncated, as by a crash
    said = []
    summary = train_and_evaluate(
        config.replace(train={"epochs": 3}), tmp_path, resume=True, progress=False, log=said.append
    )
    assert any(
        line.startswith(f"checkpoint {tmp_path / 'checkpoints' / '6'} is unreadable")
        and "\n" not in line
        for line in said
    ), said
    assert any(line.startswith("resumed from step 3") for line in said), said
    assert (tmp_path / "checkpoints" / "6.unreadable").is_dir()  # kept, out of the way
    assert summary["steps"] == 9 and checkpoint_steps(tmp_path) == [6, 9]
    steps = [json.loads(r)["step"] for r in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert steps == list(
        range(1, 10)
    )  # the rows after step 3 were dropped, then written again, once


def test_resume_with_another_configuration_names_the_flags(tmp_path):
    config = tiny_config(train={"steps": 1})
    train_and_evaluate(config, tmp_path, **QUIET)
    changed = config.replace(model={"network": "mtan"}, train={"batch_size": 3})
    with pytest.raises(RunError) as info:
        train_and_evaluate(changed, tmp_path, resume=True, **QUIET)
    text = one_line(info.value)
    assert text.startswith(
        f"--resume: the checkpoint in {tmp_path / 'checkpoints'} was trained with "
    )
    assert "--network 'split'" in text and "--batch_size 2" in text
    assert text.endswith("this run has --network 'mtan', --batch_size 3")
    # More steps are a change a resumed run may make.
    assert (
        train_and_evaluate(config.replace(train={"steps": 2}), tmp_path, resume=True, **QUIET)[
            "steps"
        ]
        == 2
    )


def test_non_finite_loss_stops_at_that_step_and_keeps_the_good_checkpoint(tmp_path):
    config = tiny_config(train={"epochs": 3, "lr": 1e8, "checkpoint_every": 1})
    with pytest.raises(FloatingPointError) as info:
        train_and_evaluate(config, tmp_path, **QUIET)
    text = one_line(info.value)
    assert "non-finite" in text and "lower --lr or --dgr_weight" in text
    failed_at = int(text.split(":")[0].removeprefix("step "))
    saved = checkpoint_steps(tmp_path)
    assert all(step < failed_at for step in saved)
    assert not any("tmp" in p.name for p in tmp_path.rglob("*")), (
        "a half-written checkpoint was left"
    )
    assert not (tmp_path / "best").exists() or not any((tmp_path / "best").iterdir())
    if saved:
        assert f"the last good checkpoint is step {saved[-1]}" in text


# ---------------------------------------------------------------------------
# Multi-host start-up


def test_distributed_start_up_initialises_before_any_jax_call(monkeypatch):
    calls = []
    monkeypatch.setattr(
        parallel.jax.distributed, "initialize", lambda *a, **k: calls.append("initialize")
    )

    def no_jax_before(*args, **kwargs):
        raise AssertionError("jax.process_count() was called before jax.distributed.initialize()")

    monkeypatch.setattr(parallel.jax, "process_count", no_jax_before)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:12345")
    assert parallel.initialize_distributed() and calls == ["initialize"]
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert not parallel.initialize_distributed() and calls == ["initialize"]
    assert parallel.multi_process_launch({"SLURM_NTASKS": "4"})
    assert not parallel.multi_process_launch(
        {"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "one-host"}
    )


def test_sum_over_processes_is_the_identity_on_one_process():
    tree = {"a": np.arange(3), "b": {"c": np.float32(2.5)}}
    merged = parallel.sum_over_processes(tree)
    np.testing.assert_array_equal(merged["a"], tree["a"]) and np.testing.assert_array_equal(
        merged["b"]["c"], 2.5
    )


# ---------------------------------------------------------------------------
# The entry point in a subprocess: signals, kill -9, one-line errors


def wait_for_step(workdir, process, deadline=400):
    start = time.time()
    while time.time() - start < deadline:
        path = workdir / "train.jsonl"
        if path.exists() and path.read_text().strip():
            return
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1][-3000:])
        time.sleep(0.5)
    raise AssertionError("no training step was logged in time")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_the_current_step_and_exits(tmp_path, private_cache, signum, code):
    workdir = tmp_path / "run"
    process = cli(["--steps", "200", "--workdir", str(workdir)], private_cache)
    wait_for_step(workdir, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    name = signal.Signals(signum).name
    lines = [line for line in err.splitlines() if line.startswith("experiments.nyuv2:")]
    assert process.returncode == code and "Traceback" not in err, err[-3000:]
    assert (
        len(lines) == 1
        and f"stopped by {name} at step " in lines[0]
        and "rerun with --resume" in lines[0]
    )
    stopped_at = int(lines[0].split(" at step ")[1].split(";")[0])
    assert checkpoint_steps(workdir)[-1] == stopped_at


def test_kill_during_checkpointing_then_resume_restarts_from_a_complete_checkpoint(
    tmp_path, private_cache
):
    workdir = tmp_path / "run"
    process = cli(
        ["--steps", "200", "--checkpoint_every", "1", "--workdir", str(workdir)], private_cache
    )
    wait_for_step(workdir, process)
    time.sleep(3.0)  # saves every step: the kill lands in or near one
    process.kill()
    process.communicate()
    steps = checkpoint_steps(workdir)
    assert steps, "no checkpoint finished before the kill"
    resumed = cli(
        ["--steps", str(steps[-1] + 1), "--workdir", str(workdir), "--resume"], private_cache
    )
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from step {steps[-1]}" in out + err


def test_entry_point_one_line_errors_for_the_workdir_and_resume(tmp_path, private_cache):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_clean_failure(
        cli(["--steps", "1", "--workdir", str(afile)], private_cache),
        f"--workdir {afile}: exists and is not a folder",
    )
    assert_clean_failure(
        cli(["--steps", "1", "--workdir", str(tmp_path / "none"), "--resume"], private_cache),
        "--resume: no checkpoint in",
    )
    assert_clean_failure(
        cli(["--steps", "3", "--lr", "1e8", "--workdir", str(tmp_path / "nan")], private_cache),
        "non-finite",
    )
