r"""Reconstructions to look at: the four panels of the paper's figure, for any checkpoint, and how far the
model is from a trivial guess.

  python -m mae_jax.visualize --checkpoint PATH --image a.jpg --image b.png --output out.png \
      [--mask_ratio 0.75] [--seed 0] [--image_size 224] [--mask_sampling block:0.5 --mask_sampling grid ...]

PATH is one of ours (a workdir, its checkpoints directory, a step or an export), an official `.pth` or a
Hugging Face directory. Per image, one row: original | masked input (removed patches grey) | reconstruction
(the decoder's output for every patch; the loss trains only the removed ones, so on visible patches it is
whatever the model happens to produce) | reconstruction with the visible patches pasted back. The masks are the
model's `mask_sampling` (random, BEiT's blocks, the grid); each `--mask_sampling KIND[:RATIO]` instead adds a
row per image with that kind of mask, labelled. Models trained with the norm-pix loss predict per-patch
normalised pixels; they are shown de-normalised with each patch's own mean and variance taken from the original
image (the figure says so), as users of the official code ended up doing.

Each row also gets its masked-patch loss (`masked_patch_losses`: the training objective on its removed
patches) next to that of a trivial prediction that learnt nothing: every removed patch a flat patch of the mean
colour of the image's visible patches. The figure's note and the command's output give both.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageDraw, ImageFont

from mae_jax import masking, models, pixels, runtime

PANEL_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
NORM_PIX_NOTE = "norm-pix model: predictions de-normalised with each patch's true mean and variance"
MASK_GRAY = 0.5  # pixel value of removed patches in the "masked" panel
# How the logs name the trivial prediction's loss, by norm_pix_loss.
TRIVIAL_NAME = {False: "with the mean colour of the visible patches:", True: "with flat patches (norm-pix):"}
MIN_PANEL = 128  # small images are upscaled to at least this many pixels
_TITLE_HEIGHT = 18
_LINE_HEIGHT = 14
_GAP = 4
_LABEL_WIDTH = 76  # the column of row labels, when there are any


def masked_patch_losses(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: int,
                        norm_pix_loss: bool) -> jax.Array:
    """[N, 2]: per image, the loss of `pred` on its removed patches and the loss of the trivial prediction.

    The loss is the training objective (`models.mae_loss` per image): the mean squared error over the removed
    patches (`mask` [N, L] == 1) of `pred` [N, L, p*p*C] against the targets of the normalised `images`
    [N, H, W, C] (per-patch normalised with `norm_pix_loss`). The trivial prediction fills every removed patch
    with the mean colour of the image's visible pixels; after per-patch normalisation (`norm_pix_loss`) any flat
    patch is 0. An image with no removed patch is scored on all of them, as `models.mae_loss` does.
    """
    target = models.patch_targets(images, patch_size, norm_pix_loss)  # [N, L, p*p*C]
    mask = mask.astype(jnp.float32)
    if norm_pix_loss:
        trivial = jnp.zeros_like(target)
    else:
        n, length, dim = target.shape
        values = target.reshape(n, length, patch_size * patch_size, -1)  # [N, L, p*p, C]: (p, q, c) order
        visible = jnp.where(mask.sum(-1, keepdims=True) < length, 1.0 - mask, 1.0)  # [N, L]
        colour = (values * visible[:, :, None, None]).sum((1, 2)) / (visible.sum(-1)[:, None] * patch_size ** 2)
        trivial = jnp.broadcast_to(colour[:, None, None, :], values.shape).reshape(n, length, dim)

    def per_image(prediction):
        error = ((prediction.astype(jnp.float32) - target) ** 2).mean(-1)  # [N, L]
        removed = mask.sum(-1)
        return jnp.where(removed > 0, (error * mask).sum(-1) / jnp.maximum(removed, 1.0), error.mean(-1))

    return jnp.stack([per_image(pred), per_image(trivial)], axis=-1)


def reconstruct(model: models.MaskedAutoencoderViT, variables, images: jax.Array,
                noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The four panels, [N, 4, H, W, C] float pixels in [0, 1], for normalised `images` [N, H, W, C], and the
    masked-patch losses [N, 2] of the model and of the trivial prediction (`masked_patch_losses`).

    `noise` [N, L] fixes the masks (see `models.random_masking`, `models.masking_noise`). Jit-compatible.
    """
    out = model.apply(variables, images, noise=noise)
    p = model.patch_size
    size = images.shape[1:3]
    losses = masked_patch_losses(images, out.pred, out.mask, p, model.norm_pix_loss)
    pred = out.pred
    if model.norm_pix_loss:
        mean, std = models.patch_mean_std(models.patchify(images.astype(jnp.float32), p))
        pred = pred * std + mean
    c = model.num_channels
    mask = jnp.repeat(out.mask[:, :, None], p * p * c, axis=-1)  # [N, L, p*p*C], 1 = removed
    mask = models.unpatchify(mask, p, size)
    original = jnp.clip(pixels.denormalise(images, c), 0.0, 1.0)
    reconstruction = jnp.clip(pixels.denormalise(models.unpatchify(pred, p, size), c), 0.0, 1.0)
    masked = original * (1 - mask) + MASK_GRAY * mask
    pasted = original * (1 - mask) + reconstruction * mask
    return jnp.stack([original, masked, reconstruction, pasted], axis=1), losses


def losses_note(losses: np.ndarray, norm_pix_loss: bool) -> str:
    """The figure's note on the masked-patch losses [N, 2] (`masked_patch_losses`), row by row."""
    trivial = "a flat patch (0 once normalised per patch)" if norm_pix_loss else \
        "a flat patch of the mean colour of the visible patches"
    rows = "; ".join(f"row {i + 1}: {model:.3f} vs {flat:.3f}" for i, (model, flat) in enumerate(np.asarray(losses)))
    return f"Loss on the removed patches, the model vs {trivial}: {rows}."


def figure_note(model: models.MaskedAutoencoderViT, losses: np.ndarray) -> str:
    note = losses_note(losses, model.norm_pix_loss)
    return f"{note} {NORM_PIX_NOTE}." if model.norm_pix_loss else note


def to_uint8(panels: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(panels, np.float32) * 255.0).astype(np.uint8)


def panel_scale(image_size: tuple[int, int]) -> int:
    """Integer upscaling (nearest neighbour) that makes small images at least MIN_PANEL pixels high."""
    return max(1, -(-MIN_PANEL // min(image_size)))


def panel_box(row: int, column: int, image_size: tuple[int, int],
              labelled: bool = False) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of panel `column` of image `row` in a `render` figure, in pixels
    (`labelled`: a figure with row labels, which take a column on the left)."""
    scale = panel_scale(image_size)
    h, w = image_size[0] * scale, image_size[1] * scale
    top, left = _TITLE_HEIGHT + row * (h + _GAP), column * (w + _GAP) + (_LABEL_WIDTH if labelled else 0)
    return top, left, top + h, left + w


def render(panels: np.ndarray, note: str | None = None, titles: Sequence[str] = PANEL_TITLES,
           row_labels: Sequence[str] | None = None) -> Image.Image:
    """A figure: one row per image, one column per panel, titles on top, an optional note at the bottom, and
    optional row labels in a column on the left.

    `panels` [N, 4, H, W, C] in [0, 1]; each panel is upscaled by `panel_scale` and placed at `panel_box`.
    """
    n, k, h, w, c = panels.shape
    scale = panel_scale((h, w))
    tiles = to_uint8(panels).repeat(scale, axis=2).repeat(scale, axis=3)
    if c == 1:
        tiles = np.repeat(tiles, 3, axis=-1)
    font = ImageFont.load_default()
    labelled = row_labels is not None
    width = k * w * scale + (k - 1) * _GAP + (_LABEL_WIDTH if labelled else 0)
    lines = _wrap(note, font, width) if note else []
    height = _TITLE_HEIGHT + n * h * scale + (n - 1) * _GAP + len(lines) * _LINE_HEIGHT + (4 if lines else 0)
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    for j, title in enumerate(titles):
        draw.text((panel_box(0, j, (h, w), labelled)[1] + 2, 3), title, fill="black", font=font)
    for i in range(n):
        for j in range(k):
            top, left, _, _ = panel_box(i, j, (h, w), labelled)
            figure.paste(Image.fromarray(tiles[i, j]), (left, top))
        if labelled:
            top, _, bottom, _ = panel_box(i, 0, (h, w), labelled)
            draw.text((2, (top + bottom) // 2 - _LINE_HEIGHT // 2), row_labels[i], fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((2, height - (len(lines) - i) * _LINE_HEIGHT - 2), line, fill="black", font=font)
    return figure


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width - 4:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line]


def reconstructions(model: models.MaskedAutoencoderViT, variables, images: np.ndarray, seed: int = 0,
                    masks: Sequence[tuple[str, float]] = ()) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """`reconstruct` of `images` (normalised, [N, H, W, C]) with masks drawn from `seed` (the model's
    `mask_sampling`, see `models.masking_noise`): (panels, losses, row labels or None).

    `masks`: (mask_sampling, mask_ratio) pairs, e.g. [("block", 0.5), ("grid", 0.75)]; each image then gets one
    row per pair, labelled, with that kind of mask (all from the same `seed`), every mask of an image together.
    """
    variants = [model.clone(mask_sampling=kind, mask_ratio=ratio) for kind, ratio in masks] or [model]
    reconstruct_jit = jax.jit(reconstruct, static_argnums=0)
    panels, losses = [], []
    for variant in variants:
        noise = models.masking_noise(jax.random.key(seed), images.shape[0], variant)
        p, l = reconstruct_jit(variant, variables, images, noise)
        panels.append(np.asarray(p))
        losses.append(np.asarray(l))
    image_major = lambda rows: np.stack(rows, axis=1).reshape(-1, *rows[0].shape[1:])
    labels = [mask_label(v) for v in variants] * images.shape[0] if masks else None
    return image_major(panels), image_major(losses), labels


def figure(model: models.MaskedAutoencoderViT, variables, images: np.ndarray, seed: int = 0,
           masks: Sequence[tuple[str, float]] = ()) -> tuple[Image.Image, np.ndarray, list[str]]:
    """`reconstructions` rendered, with the masked-patch losses in the note: (the figure, and the losses and row
    labels of `reconstructions`)."""
    panels, losses, labels = reconstructions(model, variables, images, seed, masks)
    return render(panels, figure_note(model, losses), row_labels=labels), losses, labels


def mask_label(model: models.MaskedAutoencoderViT) -> str:
    """E.g. "block 75%": the model's mask sampling and ratio."""
    return f"{model.mask_sampling} {model.mask_ratio:.0%}"


def parse_masks(specs: Sequence[str], mask_ratio: float) -> list[tuple[str, float]]:
    """`--mask_sampling` values "KIND" or "KIND:RATIO" -> (kind, ratio) pairs; `mask_ratio` where none is given.
    A one-line ValueError for a malformed value (the model checks the kind and ratio themselves)."""
    masks = []
    for spec in specs:
        kind, _, ratio = spec.partition(":")
        try:
            masks.append((kind, float(ratio) if ratio else mask_ratio))
        except ValueError:
            raise ValueError(f"--mask_sampling {spec!r}: expected KIND or KIND:RATIO, e.g. block:0.5, with KIND one "
                             f"of {', '.join(masking.MASK_SAMPLING)}") from None
    return masks


class TrainingReconstructions:
    """Reconstructs the same held-out images with the same masks whenever called during training.

    Writes `directory/step_{N}.png` (process 0) and returns the figure as [H, W, 3] uint8 for TensorBoard.
    Every process must call it (the parameters may be sharded over all of them).
    """

    def __init__(self, model: models.MaskedAutoencoderViT, images: np.ndarray, mesh: jax.sharding.Mesh,
                 directory, seed: int = 0, compiled: jax.stages.Compiled | None = None):
        """`compiled`: `reconstruct` for this model, compiled ahead of time for the run's variables and these
        images (the trainer's "reconstructions" program); else it is compiled at its first use."""
        self.model = model
        self.directory = directory
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        images = np.asarray(images, np.float32)
        noise = np.asarray(models.masking_noise(jax.random.key(seed), len(images), model))
        self.inputs = tuple(jax.make_array_from_callback(x.shape, replicated, lambda index, x=x: x[index])
                            for x in (images, noise))
        self.reconstruct = compiled or jax.jit(functools.partial(reconstruct, model), out_shardings=replicated)

    def __call__(self, step: int, variables) -> np.ndarray:
        panels, losses = (np.asarray(x) for x in self.reconstruct(variables, *self.inputs))
        fig = render(panels, figure_note(self.model, losses))
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            fig.save(os.path.join(self.directory, f"step_{step}.png"))
            logging.info("Reconstructions at step %d: loss on the removed patches of %d held-out images %.3f; %s "
                         "%.3f", step, len(losses), losses[:, 0].mean(), TRIVIAL_NAME[self.model.norm_pix_loss],
                         losses[:, 1].mean())
        return np.asarray(fig)


def read_image(path: str) -> Image.Image:
    """The fully decoded image in `path`; a one-line ValueError naming the file when it is missing, not an
    image, or truncated (found before any model is loaded)."""
    expected = "expected an image file (JPEG, PNG, ...)"
    if not os.path.isfile(path):
        found = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"--image {path} {found}: {expected}")
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not halfway through the figure
            return image.copy()
    except Image.UnidentifiedImageError:
        raise ValueError(f"--image {path} is not an image ({os.path.getsize(path)} bytes in no format PIL "
                         f"reads): {expected}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"--image {path} is truncated or damaged ({e}): {expected}") from None


def load_image(image: str | Image.Image, image_size: tuple[int, int], num_channels: int = 3) -> np.ndarray:
    """An image (file or PIL image) -> [H, W, C] normalised: shorter side resized (bicubic) to fit, then
    center crop."""
    image = read_image(image) if isinstance(image, str) else image
    image = image.convert("RGB" if num_channels == 3 else "L")
    h, w = image_size
    scale = max(h / image.height, w / image.width)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                           Image.Resampling.BICUBIC)
    top, left = (resized.height - h) // 2, (resized.width - w) // 2
    values = np.asarray(resized.crop((left, top, left + w, top + h)), np.float32) / 255.0
    return pixels.normalise(values.reshape(h, w, num_channels), num_channels)


def load_model(path: str, image_size: int | None = None, mask_ratio: float | None = None,
               variant: str | None = None) -> tuple[models.MaskedAutoencoderViT, dict]:
    """(model, variables) from any checkpoint `convert` reads, optionally at another image size; `variant`
    (e.g. "B/16") where the checkpoint's architecture cannot be inferred."""
    from mae_jax import convert

    overrides = {}
    if image_size:
        overrides["image_size"] = image_size
    if mask_ratio is not None:
        overrides["mask_ratio"] = mask_ratio
    return convert.load_model(path, variant, **overrides)


FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string("checkpoint", None, "Our checkpoint or export, an official .pth, or a HF directory.")
    flags.DEFINE_multi_string("image", None, "Image file(s) to reconstruct.")
    flags.DEFINE_string("output", "reconstructions.png", "Where to write the figure (PNG).")
    flags.DEFINE_float("mask_ratio", None, "Fraction of patches removed (default: the checkpoint's).")
    flags.DEFINE_integer("seed", 0, "Seed of the masks.")
    flags.DEFINE_integer("image_size", None, "Square image size (default: the checkpoint's).")
    flags.DEFINE_string("variant", None, "Architecture, e.g. B/16, for checkpoints whose shapes cannot tell it.")
    flags.DEFINE_multi_string("mask_sampling", None, "A row per image with this kind of mask: random, block or "
                              "grid, optionally with its ratio (block:0.5); repeat for several (default: one row "
                              "with the checkpoint's).")
    flags.mark_flags_as_required(["checkpoint", "image"])


def main(argv):
    """Errors are one line (-v 1 also shows third-party logs and an error's traceback)."""
    del argv
    with runtime.one_line_errors("python -m mae_jax.visualize"):  # bad input or output
        originals = [read_image(p) for p in FLAGS.image]
        model, variables = load_model(FLAGS.checkpoint, FLAGS.image_size, FLAGS.mask_ratio, FLAGS.variant)
        size = model.image_shape[:2]
        images = np.stack([load_image(image, size, model.num_channels) for image in originals])
        masks = parse_masks(FLAGS.mask_sampling or [], model.mask_ratio)
        fig, losses, labels = figure(model, variables, images, FLAGS.seed, masks)
        output = os.path.abspath(FLAGS.output)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        root, extension = os.path.splitext(output)
        tmp = f"{root}.tmp-{os.getpid()}{extension}"  # the same extension: PIL picks the format from it
        try:
            fig.save(tmp)
            os.replace(tmp, output)
        except (OSError, ValueError) as e:
            raise ValueError(f"--output {FLAGS.output}: cannot write the figure ({e})") from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    shown = ", ".join(f"{kind} {ratio:.0%}" for kind, ratio in masks) if masks else \
        f"{model.mask_sampling} masks, mask ratio {model.mask_ratio:.2f}"
    logging.info("Wrote %s: %d image(s) at %dx%d, %s%s.", FLAGS.output, len(images), *size, shown,
                 " (norm-pix: de-normalised with true patch statistics)" if model.norm_pix_loss else "")
    rows = [(path, label) for path in FLAGS.image for label in (labels and labels[:len(masks)] or [None])]
    for (path, label), (loss, trivial) in zip(rows, losses):
        logging.info("%s%s: loss on the removed patches %.3f; %s %.3f", path, f" ({label})" if label else "", loss,
                     TRIVIAL_NAME[model.norm_pix_loss], trivial)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
