"""Pretraining against PyTorch: one step equals HF's backward and torch.optim.AdamW; init_from official weights."""

import functools
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch parity tests need torch (pip install -e '.[torch]')")
pytest.importorskip("transformers", reason="the PyTorch parity tests need transformers (pip install -e '.[torch]')")

import torch_reference  # noqa: E402
from configs import tiny  # noqa: E402
from mae_jax import models, train, train_state  # noqa: E402
from runs import FIVE_STEPS, ROOT, losses, run_main  # noqa: E402
from test_train import official_lr  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs or PyTorch comparisons: not in the quick subset


def _hf_and_state(fields, config, steps_per_epoch, total_steps):
    hf = torch_reference.random_hf_model(fields, seed=3)
    variables = torch_reference.hf_to_flax(hf)
    schedule = train_state.learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = train.make_optimizer(config, schedule)
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params, constants=variables["constants"],
                                   batch_stats={}, opt_state=tx.init(params),
                                   rng=jax.random.key_data(jax.random.key(config.seed)),
                                   nonfinite_step=jnp.full((), -1, jnp.int32))
    return hf, state, tx, schedule


def test_one_step_matches_pytorch():
    """Gradients equal HF's backward; three AdamW steps equal torch.optim.AdamW with the official groups."""
    torch.set_num_threads(2)
    config = tiny.get_config()
    config.base_lr, config.min_lr, config.warmup_epochs, config.batch_size = 0.064, 1e-4, 1, 4  # peak lr 1e-3
    fields = dict(config.model)
    steps_per_epoch, total_steps = 2, 10
    hf, state, tx, schedule = _hf_and_state(fields, config, steps_per_epoch, total_steps)
    model = models.MaskedAutoencoderViT(**fields)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)

    def noise_at(step):  # the train step's documented masking noise
        rng = train_state.rng_stream(jax.random.key(config.seed), "masking", step)
        return np.asarray(models.per_example_uniform(rng, 4, model.num_patches))

    # Gradients of the loss.
    loss, grads = jax.value_and_grad(train.loss_fn)(state.params, state.constants, model, images, noise_at(0))
    out = hf(pixels, noise=torch.from_numpy(noise_at(0)))
    out.loss.backward()
    np.testing.assert_allclose(float(loss), float(out.loss), atol=1e-6)
    ref_grads = torch_reference.hf_grads_to_flax(hf)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=0)
    biggest = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads))
    assert biggest > 1e-2  # the comparison is not between zeros

    # Three optimizer steps (lr 0, then warmup, then cosine), official parameter groups.
    decay = [p for n, p in hf.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in hf.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=0.0, betas=(0.9, 0.95))
    step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
    for step in range(3):
        state, metrics = step_fn(state, {"images": images})
        lr = official_lr(step, steps_per_epoch, 1e-3, 1e-4, 1, total_steps / steps_per_epoch)
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        hf(pixels, noise=torch.from_numpy(noise_at(step))).loss.backward()
        optimizer.step()
    ref = torch_reference.hf_to_flax(hf)["params"]
    chex.assert_trees_all_close(state.params, ref, atol=1e-6, rtol=0)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                                            jax.tree_util.tree_leaves(_hf_and_state(
                                                                fields, config, 2, 10)[1].params)))
    assert moved > 1e-3  # parameters did move by more than the tolerance


def test_init_from_converted_official_checkpoint(tmp_path):
    """An official .pth -> our checkpoint (the convert CLI) -> main.py --config.init_from=... starts there."""
    from mae_jax import checkpoints

    config = tiny.get_config()
    hf = torch_reference.random_hf_model(dict(config.model), seed=5)
    official = torch_reference.hf_to_official(hf)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}, "epoch": 3}, tmp_path / "mae.pth")
    converted = subprocess.run([sys.executable, "-m", "mae_jax.convert", str(tmp_path / "mae.pth"),
                                str(tmp_path / "converted")], cwd=ROOT, capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr[-2000:]
    # Step 0 has lr 0 (warmup), so after one step the parameters are still exactly the loaded ones.
    result = run_main(tmp_path / "run", f"--config.init_from={tmp_path / 'converted'}", *FIVE_STEPS[:2],
                      "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initialised the MaskedAutoencoderViT from" in result.stdout
    _, trained = checkpoints.load_variables(tmp_path / "run" / "checkpoints" / "1")
    expected = torch_reference.hf_to_flax(hf)
    chex.assert_trees_all_equal(trained, expected)
    # The first loss is the loss of the loaded weights.
    model = models.MaskedAutoencoderViT(**config.model)
    from mae_jax import input_pipeline, pixels
    images = next(input_pipeline.create_train_iterator(
        config.input, image_shape=model.image_shape, seed=config.seed, global_batch_size=config.batch_size,
        process_index=0, process_count=1))["images"]
    noise = models.per_example_uniform(train_state.rng_stream(jax.random.key(config.seed), "masking", 0),
                                       config.batch_size, model.num_patches)
    loss = model.apply(expected, pixels.model_input(images), noise=noise).loss
    np.testing.assert_allclose(losses(tmp_path / "run")[1], float(loss), rtol=1e-5)
