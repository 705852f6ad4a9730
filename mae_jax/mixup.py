"""Mixup / CutMix in batch mode, as timm 0.3.2 `timm.data.mixup.Mixup` (the official fine-tuning recipe), in JAX;
and RandomErasing's fill (`fill_erased`): the batch augmentations of fine-tuning that run on the device.

One draw per global batch from a JAX key: with probability `prob` the batch is mixed at all; with both
alphas > 0, CutMix with probability `switch_prob`, else Mixup; lam ~ Beta(alpha, alpha). The batch is mixed
with its own reverse (timm's `x.flip(0)`), and so are the label-smoothed one-hot targets. Everything is a
function of the key and the global batch, so the result does not depend on devices or sharding; call it
inside the jitted train step.

Images are [N, H, W, C] (timm's are [N, C, H, W]). Not supported: per-element / pair modes, `cutmix_minmax`,
`correct_lam=False`. Numerics vs timm, which holds lam in float64: CutMix's paste is bit-exact and its box
side int(size * sqrt(1 - lam)) agrees unless that product lies within float32 rounding of an integer; the
Mixup blend may differ by ~1 float32 ulp (XLA fuses lam * x + (1 - lam) * x_reversed into a multiply-add).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Box = tuple[Array, Array, Array, Array]  # (yl, yh, xl, xh), int32 [], rows yl:yh and columns xl:xh


def smooth_one_hot(labels: Array, num_classes: int, smoothing: float) -> Array:
    """timm `one_hot` with off = smoothing / C, on = 1 - smoothing + off: [N] int -> [N, C] float32."""
    # on / off computed in Python floats, as timm does, so the targets equal timm's bit for bit.
    off_value = smoothing / num_classes
    on_value = 1. - smoothing + off_value
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on_value, off_value).astype(jnp.float32)


def bbox_from_center(center_y: Array, center_x: Array, lam: Array, image_hw: tuple[int, int]) -> Box:
    """timm `rand_bbox` for a given centre: side int(size * sqrt(1 - lam)), half of it each way, clipped."""
    img_h, img_w = image_hw
    ratio = jnp.sqrt(1. - lam)
    cut_h = jnp.floor(img_h * ratio).astype(jnp.int32)
    cut_w = jnp.floor(img_w * ratio).astype(jnp.int32)
    yl = jnp.clip(center_y - cut_h // 2, 0, img_h)
    yh = jnp.clip(center_y + cut_h // 2, 0, img_h)
    xl = jnp.clip(center_x - cut_w // 2, 0, img_w)
    xh = jnp.clip(center_x + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


def cutmix_bbox_and_lam(key: Array, lam: Array, image_hw: tuple[int, int]) -> tuple[Box, Array]:
    """timm `cutmix_bbox_and_lam` (correct_lam=True): a box with a uniform integer centre, and
    lam = 1 - box area / image area (the box may be clipped by the border)."""
    key_y, key_x = jax.random.split(key)
    img_h, img_w = image_hw
    box = bbox_from_center(jax.random.randint(key_y, (), 0, img_h), jax.random.randint(key_x, (), 0, img_w),
                           lam, image_hw)
    return box, corrected_lam(box, image_hw)


def corrected_lam(box: Box, image_hw: tuple[int, int]) -> Array:
    """timm's `correct_lam`: 1 - box area / image area, the share of each image CutMix keeps."""
    yl, yh, xl, xh = box
    return 1. - ((yh - yl) * (xh - xl)).astype(jnp.float32) / float(image_hw[0] * image_hw[1])


def mix(images: Array, targets: Array, lam: Array, box: Box, use_cutmix: Array) -> tuple[Array, Array]:
    """timm `_mix_batch` and `mixup_target` for given parameters: [N, H, W, C], [N, K] -> the same.

    CutMix (`use_cutmix`) pastes `box` of the reversed batch; Mixup blends with it,
    lam * x + (1 - lam) * x_reversed. Targets always blend with weight lam, which for CutMix must be the
    area-corrected lam (`corrected_lam(box)`); lam = 1 leaves both unchanged.
    """
    reversed_images = jnp.flip(images, 0)
    rows = jnp.arange(images.shape[1])[:, None]
    cols = jnp.arange(images.shape[2])[None, :]
    yl, yh, xl, xh = box
    in_box = ((rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh))[None, :, :, None]
    cut = jnp.where(in_box, reversed_images, images)
    lam_x = jnp.asarray(lam, images.dtype)
    blended = images * lam_x + reversed_images * (1. - lam_x)
    lam_y = jnp.asarray(lam, targets.dtype)
    return (jnp.where(use_cutmix, cut, blended),
            targets * lam_y + jnp.flip(targets, 0) * (1. - lam_y))


@dataclasses.dataclass(frozen=True)
class Mixup:
    """timm `Mixup(mode="batch", correct_lam=True)`; defaults are the MAE fine-tuning recipe (FINETUNE.md)."""

    num_classes: int = 1000
    mixup_alpha: float = 0.8  # Mixup active if > 0
    cutmix_alpha: float = 1.0  # CutMix active if > 0
    prob: float = 1.0  # probability of mixing the batch at all
    switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are active
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            raise ValueError(f"mixup_alpha {self.mixup_alpha} or cutmix_alpha {self.cutmix_alpha} must be > 0")
        if not 0 <= self.prob <= 1 or not 0 <= self.switch_prob <= 1:
            raise ValueError(f"prob {self.prob} and switch_prob {self.switch_prob} must be in [0, 1]")

    def sample(self, key: Array, image_hw: tuple[int, int]) -> tuple[Array, Box, Array]:
        """timm `_params_per_batch` and the CutMix box: (lam, box, use_cutmix) for one batch."""
        key_apply, key_switch, key_lam, key_box = jax.random.split(key, 4)
        apply = jax.random.uniform(key_apply) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = jax.random.uniform(key_switch) < self.switch_prob
        else:
            use_cutmix = jnp.asarray(self.cutmix_alpha > 0)
        # One Beta draw with the chosen method's alpha (the draw is independent of the choice): each Beta is
        # two rejection-sampling loops, and two Betas doubled the compile time of the step's sampler.
        alpha = jnp.where(use_cutmix, self.cutmix_alpha, self.mixup_alpha)
        lam = jnp.where(apply, jax.random.beta(key_lam, alpha, alpha), 1.)
        use_cutmix = apply & use_cutmix
        box, lam_box = cutmix_bbox_and_lam(key_box, lam, image_hw)
        return jnp.where(use_cutmix, lam_box, lam), box, use_cutmix

    def __call__(self, key: Array, images: Array, labels: Array) -> tuple[Array, Array]:
        """Mixes [N, H, W, C] images and [N] int labels -> (images, soft targets [N, num_classes])."""
        if images.shape[0] % 2:
            raise ValueError(f"Mixup needs an even batch size, got {images.shape[0]}")
        lam, box, use_cutmix = self.sample(key, images.shape[1:3])
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return mix(images, targets, lam, box, use_cutmix)


def soft_target_cross_entropy(logits: Array, targets: Array) -> Array:
    """timm `SoftTargetCrossEntropy`: mean over the batch of sum(-targets * log_softmax(logits))."""
    return optax.softmax_cross_entropy(logits, targets).mean()


def fill_erased(images: Array, boxes: Array, key: Array) -> Array:
    """RandomErasing's 'pixel' mode on the device: each box's pixels of the normalised `images` [N, H, W, C]
    become N(0, 1) noise. `boxes` [N, K, 4] int32 are (top, left, height, width), zeros for none: the input
    pipeline's draws (`finetune_augment.random_erasing_boxes`, timm's sampling). Example i's noise comes from
    fold_in(key, i), box k's from fold_in of that with k: a function of the global batch, not of the devices."""
    _, height, width, _ = images.shape
    rows = jnp.arange(height)[:, None, None]
    columns = jnp.arange(width)[None, :, None]

    def erase(index, image, boxes):
        key_i = jax.random.fold_in(key, index)
        for k in range(boxes.shape[0]):
            top, left, h, w = boxes[k]
            inside = (rows >= top) & (rows < top + h) & (columns >= left) & (columns < left + w)
            noise = jax.random.normal(jax.random.fold_in(key_i, k), image.shape, jnp.float32).astype(image.dtype)
            image = jnp.where(inside, noise, image)
        return image

    return jax.vmap(erase)(jnp.arange(images.shape[0]), images, boxes)
