"""What a newcomer meets: the README-style command starts visibly, prints only our lines, ends promptly with a
summary, and a second run of a finished workdir says so without compiling."""

import datetime
import os
import re
import subprocess
import sys
import time

from runs import ROOT

NOISE = (
    "All log messages before absl::InitializeLog()",  # absl C++ logging used before it is initialised
    "did not fully read the dataset being cached",  # tf.data
    "Downloading and preparing dataset",  # tfds, although nothing is downloaded
    "Unable to initialize backend",  # jax looking for accelerators
    "Metadata file does not exist",  # Orbax
    "Variant folder",  # tfds
    "\x1b[",  # terminal escape codes (tqdm)
    "Traceback",
)
# Measured on the 2-core test machine, alone: first step line after 45-49 s (10 s of it preparing the demo data),
# exit 0.9-1.5 s after the last step line. The suite runs two tests at once, which can double both (exit 5.4 s
# seen), hence the margins.
FIRST_STEP_BOUND = 120  # seconds from the command to the first step line
EXIT_BOUND = 10  # seconds from the last step line to the end of the process


def _line_time(line: str) -> float:
    """The wall time an absl log line was written ("I1123 18:55:30.518342 ...")."""
    match = re.match(r"[IWE](\d\d)(\d\d) (\d\d):(\d\d):(\d\d\.\d+)", line)
    month, day, hour, minute, second = match.groups()
    now = datetime.datetime.now()
    stamp = now.replace(month=int(month), day=int(day), hour=int(hour), minute=int(minute), second=0, microsecond=0)
    return stamp.timestamp() + float(second)


def test_demo_like_run_is_quick_quiet_and_ends_with_a_summary(tmp_path):
    workdir, data_dir = tmp_path / "work", tmp_path / "tfds"
    cmd = [sys.executable, "main.py", "--config", "configs/demo.py", "--workdir", str(workdir),
           f"--config.input.data_dir={data_dir}", "--config.total_steps=20", "--config.log_every_steps=10",
           "--config.visualize_every_steps=20", "--config.checkpoint_every_steps=10"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    end = time.time()
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in output, (noise, output[-3000:])
    lines = result.stdout.splitlines()
    steps = [line for line in lines if re.search(r"\] step \d+/20 \|", line)]
    assert len(steps) == 2, result.stdout[-3000:]
    first_step, last_step = _line_time(steps[0]) - start, end - _line_time(steps[-1])
    print(f"first step line after {first_step:.1f} s; exit {last_step:.1f} s after the last step line; "
          f"{len(output.splitlines())} lines of output")
    assert first_step < FIRST_STEP_BOUND
    assert last_step < EXIT_BOUND
    # Start-up is staged, the end is a summary naming where everything is and what to run next.
    for stage in ("Opening the input (demo)", "Preparing mae_demo as TFRecords in", "Initialising",
                  "Compiling the train step", "Training from step 0 of 20"):
        assert stage in result.stdout, stage
    assert "Done: step 20/20, loss" in result.stdout
    for where in ("checkpoints", "metrics.jsonl", "reconstructions", "tensorboard --logdir",
                  "python -m mae_jax.visualize --checkpoint"):
        assert where in result.stdout, where

    # Again on the finished workdir: one line saying so, no compilation, exit 0.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Already complete: the checkpoint in" in again.stdout and "Compiling" not in again.stdout
