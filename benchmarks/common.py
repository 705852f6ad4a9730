"""Shared by the benchmarks: configs, model FLOPs and the machine's matmul peak."""

import functools
import time

import ml_collections

CONFIGS = {"B/16": "configs/vit_base.py", "L/16": "configs/vit_large.py", "H/14": "configs/vit_huge.py"}


def model_flops_per_step(config: ml_collections.ConfigDict) -> float:
    """FLOPs of one train step as written (no rematerialisation), from XLA's cost analysis.

    Taken from the lowered step without scans (blocks unrolled, no gradient accumulation): XLA's figure
    counts a loop body once, and rematerialisation adds work that MFU does not count. Lowering is cheap (no compilation).
    """
    import jax
    import jax.numpy as jnp

    from mae_jax import models, train

    fields = dict(config.model, scan_blocks=False, remat="none")
    model = models.MaskedAutoencoderViT(**fields)
    schedule = train.learning_rate_schedule(config, 1000, 100_000)
    tx = train.make_optimizer(config, schedule)
    state = jax.eval_shape(functools.partial(train._init_state, model, tx), 0)
    images = jax.ShapeDtypeStruct((config.batch_size, *train.model_image_shape(model)), jnp.float32)
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                     grad_accum_steps=1, num_batch_shards=1))
    cost = step.lower(state, images).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


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
