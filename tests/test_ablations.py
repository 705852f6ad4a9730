"""configs/ablations.py: every row of the paper's Table 1c / 1d / 1f builds a valid ViT-L model with the row's
switches (and a tiny one); rows train on the tiny model in-process, drawing the row's masks in the train step."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import ablations
from mae_jax import checkpoints, input_pipeline, models, pixels, train_state, trainer
from runs import ROOT, losses


@pytest.mark.parametrize("row", list(ablations.ROWS))
def test_every_row_builds_a_valid_model(row):
    large = ablations.get_config(row)
    model = models.MaskedAutoencoderViT(**large.model)  # validates the fields
    assert (model.embed_dim, model.depth, model.patch_size, model.decoder_embed_dim, model.decoder_depth) == \
        (1024, 24, 16, 512, 8)
    assert large.num_epochs == 800 and large.batch_size == 4096
    expected = {**ablations.BASELINE, **ablations.ROWS[row]}
    assert {k: large.model[k] for k in expected} == expected
    small = ablations.get_config(f"{row},tiny")
    models.MaskedAutoencoderViT(**small.model)
    assert small.model.depth == 2 and small.input.dataset == "synthetic"
    assert {k: small.model[k] for k in expected} == expected


def test_rows_differ_from_the_baseline_by_their_switch_only():
    assert ablations.get_config("baseline").model.to_dict() == ablations.get_config("random75").model.to_dict()
    base = ablations.get_config("baseline").model
    assert base.norm_pix_loss is False  # Table 1's default target: pixels without normalisation
    for row, switch in ablations.ROWS.items():
        changed = {k for k, v in ablations.get_config(row).model.items() if base[k] != v}
        assert changed == {k for k in switch if ablations.BASELINE[k] != switch[k]}, row


@pytest.mark.slow
def test_unknown_row_is_a_one_line_error():
    result = subprocess.run([sys.executable, "main.py", "--config", "configs/ablations.py:block60", "--show_config"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "main.py: error: configs/ablations.py:block60: expected ROW or ROW,tiny with ROW one of baseline, "
        "mask_tokens, pixel_norm, random75, block50, block75, grid75, loss_all"], result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("row", ["block75", "mask_tokens"])
def test_row_trains_on_the_tiny_model(row, tmp_path):
    """A few steps in-process: the first loss is the model's loss with the row's masks (`models.masking_noise`
    of the step's masking stream), the loss falls, checkpoints and reconstructions are written."""
    config = ablations.get_config(f"{row},tiny")
    config.total_steps, config.log_every_steps = 8, 1
    config.checkpoint_every_steps, config.keep_checkpoints = 1, 10
    config.visualize_every_steps, config.visualize_num_images = 8, 2
    trainer.train_and_evaluate(config, tmp_path)
    logged = losses(tmp_path)
    assert sorted(logged) == list(range(1, 9)) and all(np.isfinite(list(logged.values())))
    assert logged[8] < logged[1]
    assert (tmp_path / "reconstructions" / "step_8.png").exists()
    # Step 0 has lr 0 (warmup), so checkpoint 1 holds the initial weights: the first logged loss is theirs
    # on the first batch, with the row's masks.
    fields, initial = checkpoints.load_variables(tmp_path / "checkpoints" / "1")
    assert {k: fields[k] for k in ablations.ROWS[row]} == ablations.ROWS[row]
    assert ("encoder_mask_token" in initial["params"]) == (row == "mask_tokens")
    model = models.MaskedAutoencoderViT(**config.model)
    images = next(input_pipeline.create_train_iterator(
        config.input, image_shape=model.image_shape, seed=config.seed, global_batch_size=config.batch_size,
        process_index=0, process_count=1))["images"]
    rng = train_state.rng_stream(jax.random.key(config.seed), "masking", 0)
    noise = models.masking_noise(rng, config.batch_size, model)
    images = pixels.model_input(images)  # the pipeline's uint8, normalised as the step does
    np.testing.assert_allclose(logged[1], float(model.apply(initial, images, noise=noise).loss), rtol=1e-5)
    if row == "block75":  # block masks are not the uniform ones: the loss would differ with those
        uniform = models.per_example_uniform(rng, config.batch_size, model.num_patches)
        assert abs(logged[1] - float(model.apply(initial, images, noise=uniform).loss)) > 1e-4
