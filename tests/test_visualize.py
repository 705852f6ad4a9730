"""Tests of mae_jax.visualize: the four panels from a trained tiny model, norm-pix de-normalisation, the
command line on our checkpoints and Hugging Face directories, and reconstructions written during training."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from mae_jax import checkpoints, models, pixels, trainer, visualize

pytestmark = pytest.mark.slow  # trains a model for its figures: not in the quick subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 12 steps, with reconstructions every 6 steps."""
    workdir = tmp_path_factory.mktemp("tiny")
    config = tiny.get_config()
    config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 12, 6, 0
    config.visualize_every_steps, config.visualize_num_images = 6, 3
    trainer.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.jpg", quality=95)
    return [folder / "astronaut.png", folder / "chelsea.jpg"]


def _mask(seed, n, model):
    """The masks the figure must show: the documented noise, argsort, the first len_keep kept."""
    noise = np.asarray(models.per_example_uniform(jax.random.key(seed), n, model.num_patches))
    mask = np.ones_like(noise)
    for i in range(n):
        mask[i, np.argsort(noise[i], kind="stable")[:model.len_keep]] = 0
    return mask  # [N, L], 1 = removed


def _panel(figure, row, column, size):
    top, left, bottom, right = visualize.panel_box(row, column, size)
    scale = visualize.panel_scale(size)
    return figure[top:bottom:scale, left:right:scale]  # back to the model's resolution


def test_figure_from_trained_model_shows_the_right_panels(trained, photos, tmp_path):
    output = tmp_path / "figure.png"
    result = subprocess.run([sys.executable, "-m", "mae_jax.visualize", "--checkpoint", str(trained),
                             "--image", str(photos[0]), "--image", str(photos[1]), "--output", str(output),
                             "--seed", "3", "--mask_ratio", "0.5"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    figure = np.asarray(Image.open(output).convert("RGB"))
    fields, variables = checkpoints.load_variables(trained)
    model = models.MaskedAutoencoderViT(**dict(fields, mask_ratio=0.5))
    size, p = (32, 32), model.patch_size
    scale = visualize.panel_scale(size)
    assert scale == 4
    # Layout: 4 panels of 128 px with 4 px gaps; 2 rows; a title band; a note band (norm-pix model).
    assert figure.shape[1] == 4 * 128 + 3 * 4
    assert figure.shape[0] > visualize.panel_box(1, 0, size)[2]
    mask = _mask(3, 2, model)
    pixel_mask = np.asarray(models.unpatchify(np.repeat(mask[:, :, None], p * p * 3, -1), p, size)) > 0.5
    images = np.stack([visualize.load_image(str(f), size) for f in photos])
    for i in range(2):
        original, masked, recon, pasted = (_panel(figure, i, j, size).astype(int) for j in range(4))
        expected = np.round(np.clip(images[i] * pixels.IMAGENET_STD + pixels.IMAGENET_MEAN, 0, 1) * 255)
        assert np.abs(original - expected).max() <= 1
        visible, removed = ~pixel_mask[i], pixel_mask[i]
        np.testing.assert_array_equal(pasted[visible], original[visible])  # visible patches pasted exactly
        np.testing.assert_array_equal(masked[visible], original[visible])
        assert np.all(masked[removed] == 128)  # removed patches are blanked
        np.testing.assert_array_equal(pasted[removed], recon[removed])
        assert removed.mean() == 0.5
    # Norm-pix: the reconstruction is the prediction de-normalised with each patch's true mean and variance.
    out = model.apply(variables, images, noise=np.asarray(models.per_example_uniform(jax.random.key(3), 2, 16)))
    target = np.asarray(models.patchify(images, p))
    mean, std = target.mean(-1, keepdims=True), np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    values = np.asarray(models.unpatchify(np.asarray(out.pred) * std + mean, p, size))
    expected = np.round(np.clip(values * pixels.IMAGENET_STD + pixels.IMAGENET_MEAN, 0, 1) * 255)
    for i in range(2):
        assert np.abs(_panel(figure, i, 2, size).astype(int) - expected[i]).max() <= 1
    # The output names each image's masked-patch loss next to the trivial prediction's (flat patches: norm-pix).
    losses = np.asarray(visualize.masked_patch_losses(images, out.pred, out.mask, p, True))
    for photo, expected_losses in zip(photos, losses):
        match = re.search(rf"{re.escape(str(photo))}: loss on the removed patches ([\d.]+); with flat patches "
                          r"\(norm-pix\): ([\d.]+)$", result.stderr, re.MULTILINE)
        assert match, result.stderr[-2000:]
        np.testing.assert_allclose([float(v) for v in match.groups()], expected_losses, atol=6e-4)


def test_note_only_for_norm_pix_models():
    panels = np.random.default_rng(0).uniform(size=(2, 4, 32, 48, 3))
    plain = visualize.render(panels)
    noted = visualize.render(panels, visualize.NORM_PIX_NOTE)
    assert visualize.panel_scale((32, 48)) == 4  # upscaled to at least 128 px
    assert plain.size[0] == noted.size[0] == 4 * 48 * 4 + 3 * 4 == visualize.panel_box(0, 3, (32, 48))[3]
    assert noted.size[1] > plain.size[1] == visualize.panel_box(1, 0, (32, 48))[2]
    np.testing.assert_array_equal(_panel(np.asarray(plain), 1, 3, (32, 48)), visualize.to_uint8(panels[1, 3]))


def test_hf_directory_and_other_image_size(tmp_path, photos):
    pytest.importorskip("transformers", reason="writing a Hugging Face directory needs torch and transformers")
    import torch_reference

    hf = torch_reference.random_hf_model(models.variant("test/8", image_size=32, norm_pix_loss=False), seed=1)
    hf.save_pretrained(tmp_path / "hf")
    model, variables = visualize.load_model(str(tmp_path / "hf"), image_size=48, mask_ratio=0.25)
    assert model.grid_size == (6, 6) and model.mask_ratio == 0.25 and not model.norm_pix_loss
    assert variables["constants"]["pos_embed"].shape == (1, 37, 32)  # interpolated from 4 x 4
    images = np.stack([visualize.load_image(str(f), (48, 48)) for f in photos])
    figure, _, _ = visualize.figure(model, variables, images, seed=0)
    assert figure.size[0] == 4 * 144 + 12
    assert figure.size[1] > visualize.panel_box(1, 0, (48, 48))[2]  # the losses' note (raw pixels: nothing else)


def test_training_writes_reconstructions(trained):
    files = sorted(os.listdir(trained / "reconstructions"))
    assert files == ["step_12.png", "step_6.png"]
    first = np.asarray(Image.open(trained / "reconstructions" / "step_6.png"))
    last = np.asarray(Image.open(trained / "reconstructions" / "step_12.png"))
    assert first.shape == last.shape and first.shape[1] == 4 * 128 + 12
    assert first.shape[0] > visualize.panel_box(2, 0, (32, 32))[2]  # 3 images and the norm-pix note
    # Same images and masks, different weights: originals and masked inputs equal, reconstructions differ.
    for column in (0, 1):
        np.testing.assert_array_equal(_panel(first[..., :3], 0, column, (32, 32)),
                                      _panel(last[..., :3], 0, column, (32, 32)))
    assert not np.array_equal(_panel(first, 0, 2, (32, 32)), _panel(last, 0, 2, (32, 32)))
    # And to TensorBoard, as images.
    import tensorflow as tf

    tags = set()
    for event_file in os.listdir(trained / "tensorboard"):
        for event in tf.compat.v1.train.summary_iterator(str(trained / "tensorboard" / event_file)):
            for value in event.summary.value:
                tags.add(value.tag)
    assert "reconstructions" in tags and "loss" in tags


# --------------------------------------------------------------------------------------------------------
# The masked-patch losses: the model's next to the trivial prediction's.
# --------------------------------------------------------------------------------------------------------


def _flat_patches(values, patch=2, channels=3):
    """A [1, 2p, 2p, C] image whose four patches (row-major) are flat at `values`."""
    grid = np.asarray(values, np.float32).reshape(2, 2)
    return np.repeat(np.repeat(grid, patch, 0), patch, 1)[None, :, :, None].repeat(channels, -1)


def test_masked_patch_losses_by_hand():
    """Patches flat at 1, 3 (visible) and 0, 2 (removed): the visible mean colour is 2, so the trivial
    prediction's loss is ((2 - 0)^2 + (2 - 2)^2) / 2 = 2; a prediction of 1 and 2 scores (1 + 0) / 2 = 0.5,
    whatever it predicts for the visible patches. With norm-pix targets a flat prediction is 0: on a
    removed patch alternating 0, 1 over its 12 values it scores (11/12) * var / (var + 1e-6)."""
    image = _flat_patches([1.0, 3.0, 0.0, 2.0])
    mask = np.array([[0.0, 0.0, 1.0, 1.0]])
    pred = np.stack([np.full(12, 100.0), np.full(12, -7.0), np.full(12, 1.0), np.full(12, 2.0)])[None]
    losses = np.asarray(visualize.masked_patch_losses(image, pred, mask, 2, False))
    np.testing.assert_allclose(losses, [[0.5, 2.0]], rtol=1e-6)
    checker = np.tile(np.array([0.0, 1.0], np.float32), 24).reshape(1, 4, 4, 3)  # every patch alternates
    var = np.var(np.tile([0.0, 1.0], 6), ddof=1)
    losses = np.asarray(visualize.masked_patch_losses(checker, np.zeros((1, 4, 12)), mask, 2, True))
    np.testing.assert_allclose(losses, [[11 / 12 * var / (var + 1e-6)] * 2], rtol=1e-5)
    # No removed patch (mask ratio 0): every patch is scored, the mean colour of all of them (1.5) the guess.
    losses = np.asarray(visualize.masked_patch_losses(image, pred, np.zeros((1, 4)), 2, False))
    np.testing.assert_allclose(losses[0, 1], (0.25 + 2.25 + 2.25 + 0.25) / 4, rtol=1e-6)


def test_a_model_that_predicts_the_trivial_guess_scores_the_same():
    """Real photographs, random masks: a prediction that is the visible patches' mean colour (computed here
    independently) scores exactly the trivial loss; the losses' mean over images is the model's own loss."""
    import skimage.data

    model = models.MaskedAutoencoderViT(**models.variant("test/8", image_size=32, norm_pix_loss=False))
    images = np.stack([visualize.load_image(Image.fromarray(photo), (32, 32)) for photo in
                       (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee())])
    noise = np.asarray(models.per_example_uniform(jax.random.key(4), 3, model.num_patches))
    variables = models.init_variables(model, jax.random.key(0))
    out = model.apply(variables, images, noise=noise)
    mask = np.asarray(out.mask)
    patches = np.asarray(models.patchify(images, 8)).reshape(3, 16, 64, 3)
    colour = np.stack([patches[i][mask[i] == 0].mean((0, 1)) for i in range(3)])  # [N, C]
    copy = np.broadcast_to(colour[:, None, None, :], patches.shape).reshape(3, 16, 192)
    losses = np.asarray(visualize.masked_patch_losses(images, copy, mask, 8, False))
    np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=1e-6)
    assert np.all(losses[:, 1] > 0.05)
    ours = np.asarray(visualize.masked_patch_losses(images, out.pred, mask, 8, False))
    np.testing.assert_allclose(ours[:, 0].mean(), float(out.loss), rtol=1e-5)
    np.testing.assert_array_equal(ours[:, 1], losses[:, 1])
    note = visualize.figure_note(model, ours)
    assert note.startswith("Loss on the removed patches, the model vs a flat patch of the mean colour of the "
                           f"visible patches: row 1: {ours[0, 0]:.3f} vs {ours[0, 1]:.3f}; row 2: ")


def test_figure_rows_show_each_variant_mask(trained, photos, tmp_path):
    """`--mask_sampling KIND[:RATIO]` (repeated): a labelled row per image and kind, each showing the masks of
    that kind (`models.masking_noise` of the model with that sampling): BEiT blocks, the grid, random."""
    output = tmp_path / "kinds.png"
    specs = ["block:0.5", "grid", "random:0.25"]
    result = subprocess.run([sys.executable, "-m", "mae_jax.visualize", "--checkpoint", str(trained),
                             "--image", str(photos[0]), "--image", str(photos[1]), "--output", str(output),
                             "--seed", "2", *[f"--mask_sampling={s}" for s in specs]],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "block 50%, grid 75%, random 25%" in result.stdout + result.stderr
    figure = np.asarray(Image.open(output).convert("RGB"))
    fields, _ = checkpoints.load_variables(trained)
    size, p = (32, 32), fields["patch_size"]
    assert figure.shape[1] == visualize.panel_box(0, 3, size, labelled=True)[3]
    for j, (kind, ratio) in enumerate([("block", 0.5), ("grid", 0.75), ("random", 0.25)]):
        model = models.MaskedAutoencoderViT(**dict(fields, mask_sampling=kind, mask_ratio=ratio))
        noise = np.asarray(models.masking_noise(jax.random.key(2), 2, model))
        for i in range(2):
            removed = np.ones(16, bool)
            removed[np.argsort(noise[i], kind="stable")[:model.len_keep]] = False
            pixel_mask = np.repeat(np.repeat(removed.reshape(4, 4), p, 0), p, 1)
            top, left, bottom, right = visualize.panel_box(i * 3 + j, 1, size, labelled=True)
            masked = figure[top:bottom:4, left:right:4]  # the "masked" panel at the model's resolution
            assert (masked[pixel_mask] == 128).all() and (masked[~pixel_mask] != 128).any(axis=-1).mean() > 0.9
            if kind == "grid":  # one visible patch per 2 x 2 cell
                assert removed.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4).sum(1).tolist() == [3] * 4
    bad = subprocess.run([sys.executable, "-m", "mae_jax.visualize", "--checkpoint", str(trained), "--image",
                          str(photos[0]), "--output", str(tmp_path / "x.png"), "--mask_sampling=grid:0.5"],
                         cwd=ROOT, capture_output=True, text=True)
    last = bad.stderr.strip().splitlines()[-1]  # after the log lines of loading the checkpoint
    assert bad.returncode != 0 and last.startswith("python -m mae_jax.visualize: error: mask_ratio 0.5 cannot be "
                                                   "sampled by mask_sampling 'grid'"), bad.stderr[-2000:]
    assert not (tmp_path / "x.png").exists()
