"""Shared by the benchmarks: the step's pieces from a config, model FLOPs, the machine's matmul peak and CPU,
and the harness (worker processes alternating between frameworks, step timing, medians).

Only the standard library is imported at the top: a PyTorch worker imports this module too, and must not
load JAX, Flax or TensorFlow (their memory and threads would count against PyTorch).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence


def _config(name: str):
    import importlib

    return importlib.import_module(f"configs.{name}").get_config()


CONFIGS = {"B/16": lambda: _config("vit_base"), "L/16": lambda: _config("vit_large"),
           "H/14": lambda: _config("vit_huge")}


def build(config):
    """What `trainer.train_and_evaluate` builds before compiling, on this process's devices, for a run of 1,000
    steps an epoch (the schedule's length does not change the step): the `trainer.Setup`."""
    import jax

    from mae_jax import config_lib, trainer

    config_lib.resolve(config)
    cls = trainer.task_class(config)
    cls.validate(config, jax.device_count(), jax.process_count())
    task = cls(config, platform=jax.devices()[0].platform)
    return trainer.build(config, task, jax.devices(), num_examples=1000 * config.batch_size)


def lowered_flops(lowered) -> float:
    """FLOPs of a lowered (or compiled) computation, from XLA's cost analysis."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def model_flops_per_step(config, program: str = "train_step") -> float:
    """FLOPs of one step as written (no rematerialisation), from XLA's cost analysis.

    Taken from the lowered step without scans (blocks unrolled, no gradient accumulation): XLA's figure
    counts a loop body once, and rematerialisation adds work that MFU does not count. The lowered module
    is the global (unpartitioned) program, so the figure is for the whole batch on any mesh. Lowering is
    cheap (no compilation).
    """
    import copy

    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.update(scan_blocks=False, remat="none")
        config.grad_accum_steps = 1
    return lowered_flops(build(config).programs[program].lower())


def matmul_peak_flops() -> float:
    """float32 FLOP/s of a 2048 x 2048 x 2048 jnp.dot on the first device (best of 10)."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32), jax.devices()[0])
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cpu_info() -> dict:
    """The CPU model and its vector ISA flags (figures are only comparable on the same CPU)."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    return {"model": model, "isa": isa}


# -------------------------------------------------------------------------------------------------------
# The harness.
# -------------------------------------------------------------------------------------------------------


def time_calls(call: Callable[[], None], steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `call` (which must wait for its result), after `warmup` untimed."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def step_stats(times: Sequence[float], batch_size: int) -> dict:
    """images/s at the median step time and the step times' median, min and max."""
    median = statistics.median(times)
    return {"batch_size": batch_size, "images_per_sec": batch_size / median,
            "seconds_per_step": {"median": median, "min": min(times), "max": max(times)}}


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config_overrides(argv: Sequence[str]) -> list[str]:
    """The `--config.x=y` arguments of a command line, to hand on to a worker process."""
    return [a for a in argv[1:] if a.startswith("--config.")]


def run_worker(script: str, args: Sequence[str]) -> dict:
    """Runs `python script *args` in a fresh process and returns the JSON of its last stdout line."""
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"worker {' '.join(args[:1])} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def alternate(rounds: int, workers: dict[str, Callable[[], dict]]) -> dict[str, list[dict]]:
    """Each worker once per round, in turn, `rounds` times: {name: [result of each round]}. Alternating
    spreads the machine's drift over all of them, so their medians can be compared."""
    runs = {name: [] for name in workers}
    for _ in range(rounds):
        for name, run in workers.items():
            runs[name].append(run())
    return runs


def median_of(runs: Sequence[dict], key: str = "images_per_sec") -> float:
    return statistics.median(r[key] for r in runs)
