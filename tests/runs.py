"""Helpers of the end-to-end tests: `python main.py` in a fresh process, and its metrics."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests compile far more than they run (tiny models, a few steps): LLVM's -O0 halves XLA:CPU's compile times
# (tiny train step 7.8 -> 4.1 s, init 5.3 -> 2.0 s) and changes no value (no fast-math either way). Every
# process of the suite uses it; users' runs keep XLA's default (-O3).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test subprocess with `devices` CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


FIVE_STEPS = ("--config.total_steps=5", "--config.log_every_steps=1", "--config.checkpoint_every_steps=0")


def run_main(workdir, *overrides, devices=1, env=None, wait=True, config="configs/tiny.py"):
    """Runs `python main.py --config CONFIG` (configs/tiny.py) in a fresh process with `devices` CPU devices."""
    env = dict(os.environ, **(env or {}))
    env["XLA_FLAGS"] = xla_flags(devices)
    cmd = [sys.executable, "main.py", "--config", config, "--workdir", str(workdir), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


# --------------------------------------------------------------------------------------------------------
# End to end.
# --------------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def tiny_setup(config, devices: int = 8, num_examples: int | None = None):
    """`trainer.build` of `config`'s task on the first `devices` CPU devices, without data (the schedule over
    `num_examples`, default the synthetic dataset's): what a run compiles, for tests that step it themselves."""
    import jax

    from mae_jax import config_lib, trainer

    config_lib.resolve(config)
    cls = trainer.task_class(config)
    cls.validate(config, devices, 1)
    task = cls(config, platform="cpu")
    return trainer.build(config, task, jax.devices()[:devices], num_examples or config.input.synthetic_num_examples)


def count_cpu_only_barriers(hlo_text: str) -> int:
    """How many `exponential(multiply(x, 0))` (xla_cpu._keep's `x * exp(0 * x)`) a StableHLO module holds."""
    count = 0
    for function in hlo_text.split("func.func")[1:]:  # SSA names are local to a function
        zeros, times_zero = set(), set()
        for line in function.splitlines():
            match = re.match(r"\s*(%[\w#]+) = (\S+) (.*)", line)
            if not match:
                continue
            name, op, rest = match.groups()
            operands = set(re.findall(r"%[\w#]+", rest.split(":")[0]))
            if op == "stablehlo.constant" and re.match(r"dense<-?0\.0+e[+-]00>", rest):
                zeros.add(name)
            elif op == "stablehlo.broadcast_in_dim" and operands & zeros:
                zeros.add(name)
            elif op == "stablehlo.multiply" and operands & zeros:
                times_zero.add(name)
            elif op == "stablehlo.exponential" and operands & times_zero:
                count += 1
    return count


# --------------------------------------------------------------------------------------------------------
# Disks that fill up or turn read-only: a private mount namespace (its mounts vanish with it; as root).
# --------------------------------------------------------------------------------------------------------


def in_mount_namespace(script: str, timeout: float = 300, devices: int = 1) -> subprocess.CompletedProcess:
    """Runs the shell `script` in a private mount namespace (`unshare -m`), from the repository root with
    `devices` CPU devices; skips the calling test, with the reason, where mounting is not allowed."""
    import pytest

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private mount namespace")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a private namespace here: {probe.stderr.decode().strip()}")
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(devices))
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


STEP_LINE = re.compile(r"\] step \d+/\d+ \|")  # a logged step of the training loop


def after_last_step(output: str) -> tuple[int, list[str]]:
    """(the last logged step, the lines after its line) of a run's output."""
    lines = output.splitlines()
    last = max(i for i, line in enumerate(lines) if STEP_LINE.search(line))
    return int(re.search(r"\] step (\d+)/", lines[last]).group(1)), lines[last + 1:]
