"""Shared by the benchmarks: the step's pieces from a config, model FLOPs, the machine's matmul peak and CPU."""

import platform
import time

import jax
import jax.numpy as jnp
import ml_collections

from configs import vit_base, vit_huge, vit_large
from mae_jax import config_lib, models, parallel, train

CONFIGS = {"B/16": vit_base.get_config, "L/16": vit_large.get_config, "H/14": vit_huge.get_config}


def setup(config: ml_collections.ConfigDict):
    """What `train.train_and_evaluate` builds before compiling: (model, mesh, schedule, optimizer)."""
    config_lib.resolve(config)
    data, fsdp = train.validate_config(config, jax.device_count(), jax.process_count())
    schedule = train.learning_rate_schedule(config, 1000, 100_000)
    return (models.MaskedAutoencoderViT(**config.model), parallel.create_mesh(data, fsdp), schedule,
            train.make_optimizer(config, schedule))


def model_flops_per_step(config: ml_collections.ConfigDict, tx, schedule, mesh) -> float:
    """FLOPs of one train step as written (no rematerialisation), from XLA's cost analysis.

    Taken from the lowered step without scans (blocks unrolled, no gradient accumulation): XLA's figure
    counts a loop body once, and rematerialisation adds work that MFU does not count. The lowered module
    is the global (unpartitioned) program, so the figure is for the whole batch on any mesh. Lowering is
    cheap (no compilation).
    """
    model = models.MaskedAutoencoderViT(**dict(config.model, scan_blocks=False, remat="none"))
    shardings = train.state_shardings(train.abstract_train_state(model, tx), tx, mesh)
    cost = train.lower_train_step(model, tx, schedule, mesh, shardings, batch_size=config.batch_size).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def matmul_peak_flops() -> float:
    """float32 FLOP/s of a 2048 x 2048 x 2048 jnp.dot on the first device (best of 10)."""
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
