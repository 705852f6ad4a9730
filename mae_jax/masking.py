"""Mask sampling for MAE pretraining, as argsort noise: random, BEiT's block-wise and the paper's grid-wise.

The MAE keeps the `len_keep` patches with the smallest noise (`models.random_masking`), so every kind of mask
is expressed as noise [L] in [0, 1): `mask_to_noise` puts the patches a mask removes after the ones it keeps
(removed patches get noise in [0.5, 1), kept ones in [0, 0.5)), in random order inside each group. A mask
that removes exactly `L - len_keep` patches is then reproduced exactly; one that removes fewer (or more) is
completed with uniformly random patches (or has uniformly random removed patches put back).

Every function here samples one example from one key; `models.masking_noise` vmaps them over the batch,
example i from `fold_in(step_key, i)`, so masks do not depend on the devices or the batch split.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

MASK_SAMPLING = ("random", "block", "grid")
# BEiT's MaskingGenerator as BEiT pretrains with it (and MAE's "block" rows use it): rectangles of at least
# 16 patches, aspect ratio log-uniform in [0.3, 1 / 0.3], up to 10 attempts per rectangle.
BLOCK_MIN_NUM_PATCHES = 16
BLOCK_MIN_ASPECT = 0.3
BLOCK_ATTEMPTS = 10


def mask_to_noise(mask: Array, rng: Array | None = None) -> Array:
    """Masking noise [..., L] in [0, 1) that removes the patches where `mask` [..., L] is True (or 1).

    Pass it as `noise=` to `MaskedAutoencoderViT`: the model keeps the `len_keep` patches with the smallest
    noise, so a mask that removes exactly `L - len_keep` patches is reproduced exactly. Otherwise the mask is
    completed: with fewer removed patches, random visible ones (by `rng`; without it, the last ones in patch
    order) are removed too; with more, random removed ones (the first in patch order) are kept.
    """
    mask = jnp.asarray(mask)
    if rng is None:  # ties broken by patch index: deterministic, documented above
        order = jnp.broadcast_to(jnp.arange(mask.shape[-1], dtype=jnp.float32) / mask.shape[-1], mask.shape)
    else:
        order = jax.random.uniform(rng, mask.shape)
    return (mask.astype(jnp.float32) + order) * 0.5


def block_round_uniforms(key: Array, round_index: Array | int) -> Array:
    """The uniforms round `round_index` of `block_mask` reads, [BLOCK_ATTEMPTS, 4]: per attempt the target
    area, the aspect ratio, the top and the left of BEiT's `_mask` (in that order)."""
    return jax.random.uniform(jax.random.fold_in(key, round_index), (BLOCK_ATTEMPTS, 4))


def block_mask(key: Array, grid_size: Sequence[int], num_masking_patches: int,
               min_num_patches: int = BLOCK_MIN_NUM_PATCHES, min_aspect: float = BLOCK_MIN_ASPECT) -> Array:
    """BEiT's block-wise mask (microsoft/unilm beit/masking_generator.py, `MaskingGenerator`), [h, w] bool.

    BEiT's algorithm with static shapes: rounds (a `lax.while_loop`, at most `num_masking_patches` of them,
    since each adds at least one patch) of up to BLOCK_ATTEMPTS attempts; an attempt draws a target area
    uniform in [min_num_patches, remaining], an aspect ratio log-uniform in [min_aspect, 1 / min_aspect],
    h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)) (rounding half to even, as Python's
    `round`) and, if h < grid height and w < grid width, a uniform top-left; the rectangle is applied if it
    adds between 1 and `remaining` new patches, which ends the round. The mask stops growing at
    `num_masking_patches` or after a round that adds nothing, so it may hold fewer (never more).

    Python's `random.uniform(a, b)` is `a + (b - a) * u` and `random.randint(0, n)` is `floor(u * (n + 1))`
    here, with round r's uniforms `block_round_uniforms(key, r)` (one row per attempt, read whether or not the
    attempt gets as far as its top-left). The attempts of a round all see the round's starting mask (an
    attempt that is not applied changes nothing), so they are evaluated together and the first that applies
    wins.
    """
    height, width = int(grid_size[0]), int(grid_size[1])
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    rows = jnp.arange(height)[None, :, None]  # [1, h, 1]: broadcast against the attempts
    cols = jnp.arange(width)[None, None, :]

    def one_round(state):
        r, mask, count, _ = state
        u = block_round_uniforms(key, r)
        remaining = num_masking_patches - count  # BEiT's max_mask_patches (its max_num_patches is the target)
        target_area = min_num_patches + (remaining - min_num_patches).astype(jnp.float32) * u[:, 0]
        aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        h = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
        fits = (h < height) & (w < width)
        top = jnp.clip(jnp.floor(u[:, 2] * (height - h + 1)).astype(jnp.int32), 0, jnp.maximum(height - h, 0))
        left = jnp.clip(jnp.floor(u[:, 3] * (width - w + 1)).astype(jnp.int32), 0, jnp.maximum(width - w, 0))
        top, left, h, w = (v[:, None, None] for v in (top, left, h, w))
        rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # [attempts, h, w]
        new = (rect & ~mask).sum(axis=(1, 2))
        applies = fits & (new > 0) & (new <= remaining)
        first = jnp.argmax(applies)
        delta = jnp.where(applies.any(), new[first], 0)
        mask = jnp.where(delta > 0, mask | rect[first], mask)
        return r + 1, mask, count + delta, delta

    def more(state):
        r, _, count, delta = state
        return (count < num_masking_patches) & (delta > 0) & (r < num_masking_patches)

    state = (jnp.int32(0), jnp.zeros((height, width), bool), jnp.int32(0), jnp.int32(1))
    return jax.lax.while_loop(more, one_round, state)[1]


def block_noise(key: Array, grid_size: Sequence[int], num_masking_patches: int) -> Array:
    """Noise [h * w] of a BEiT block mask of `num_masking_patches` (`block_mask`), completed with uniformly
    random patches where the blocks fall short (`mask_to_noise`)."""
    mask_key, order_key = jax.random.split(key)
    mask = block_mask(mask_key, grid_size, num_masking_patches)
    return mask_to_noise(mask.reshape(-1), order_key)


def grid_cell(mask_ratio: float) -> int | None:
    """The side s of the cells of grid-wise sampling, which keeps one patch of every s x s and so removes
    1 - 1 / s**2 of them (s = 2: 0.75); None if `mask_ratio` is no such fraction."""
    if not 0.0 <= mask_ratio < 1.0:
        return None
    s = round((1.0 - mask_ratio) ** -0.5)
    return s if abs(1.0 - 1.0 / s**2 - mask_ratio) < 1e-6 else None


def grid_noise(key: Array, grid_size: Sequence[int], cell: int) -> Array:
    """Noise [h * w] of the paper's grid-wise sampling: one patch of every `cell` x `cell` cell stays visible,
    at the same offset in every cell, the offset uniform over the cell. The grid's sides must be multiples
    of `cell` (then exactly h * w / cell**2 patches are visible)."""
    height, width = int(grid_size[0]), int(grid_size[1])
    offset_key, order_key = jax.random.split(key)
    offset = jax.random.randint(offset_key, (), 0, cell * cell)
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    visible = (rows % cell == offset // cell) & (cols % cell == offset % cell)
    return mask_to_noise(~visible.reshape(-1), order_key)
