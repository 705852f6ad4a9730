"""The reference side of the block-masking tests: BEiT's `MaskingGenerator` (microsoft/unilm,
beit/masking_generator.py), transcribed twice. Nothing here imports mae_jax or JAX.

`MaskingGenerator` is BEiT's class as written, drawing from Python's `random` (only `np.int`, gone from NumPy,
is `int`; one attempt's draws are in `_rectangle`, so that the table version can replace them); `_mask` also
records the size of each rectangle it applies. `TableMaskingGenerator` is the same code
with its four random calls per attempt read from a pre-drawn table of uniforms [rounds, 10, 4] (target
area, aspect ratio, top, left), in float32 like the JAX generator, so both can be fed the same draws.
"""

from __future__ import annotations

import math
import random

import numpy as np


class MaskingGenerator:
    def __init__(
            self, input_size, num_masking_patches, min_num_patches=4, max_num_patches=None,
            min_aspect=0.3, max_aspect=None):
        if not isinstance(input_size, tuple):
            input_size = (input_size, ) * 2
        self.height, self.width = input_size

        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches

        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches

        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rectangles = []  # added for the tests: new patches of each applied rectangle

    def get_shape(self):
        return self.height, self.width

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for attempt in range(10):
            rectangle = self._rectangle(attempt, max_mask_patches)
            if rectangle is not None:
                h, w, top, left = rectangle

                num_masked = mask[top: top + h, left: left + w].sum()
                # Overlap
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1

                if delta > 0:
                    break
        if delta > 0:
            self.rectangles[-1].append(delta)
        return delta

    def _rectangle(self, attempt, max_mask_patches):
        """BEiT's draws of one attempt, in its order: (h, w, top, left), or None where it does not fit (its
        `if w < self.width and h < self.height`, which then draws no position)."""
        target_area = random.uniform(self.min_num_patches, max_mask_patches)
        aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < self.width and h < self.height:
            return h, w, random.randint(0, self.height - h), random.randint(0, self.width - w)
        return None

    def __call__(self):
        self.rectangles.append([])
        mask = np.zeros(shape=self.get_shape(), dtype=int)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)

            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta

        return mask


class TableMaskingGenerator(MaskingGenerator):
    """`MaskingGenerator` with `random.uniform(a, b)` = a + (b - a) * u and `random.randint(0, n)` =
    floor(u * (n + 1)), u read from `table[round, attempt]` [rounds, 10, 4], in float32."""

    def __call__(self, table: np.ndarray) -> np.ndarray:
        self.table, self.round = np.asarray(table, np.float32), 0
        return super().__call__()

    def _mask(self, mask, max_mask_patches):
        self.u = self.table[self.round]
        self.round += 1
        return super()._mask(mask, max_mask_patches)

    def _rectangle(self, attempt, max_mask_patches):
        f32, u = np.float32, self.u
        lo, hi = self.log_aspect_ratio
        target_area = f32(self.min_num_patches) + f32(max_mask_patches - self.min_num_patches) * u[attempt, 0]
        aspect_ratio = np.exp(f32(lo) + f32(hi - lo) * u[attempt, 1])
        h = int(np.round(np.sqrt(target_area * aspect_ratio)))
        w = int(np.round(np.sqrt(target_area / aspect_ratio)))
        if w < self.width and h < self.height:
            return (h, w, min(int(np.floor(u[attempt, 2] * f32(self.height - h + 1))), self.height - h),
                    min(int(np.floor(u[attempt, 3] * f32(self.width - w + 1))), self.width - w))
        return None
