"""Tests of models.ViTClassifier (fine-tuning) and its stochastic depth, and of loading checkpoints into it
with mae_jax.convert: mechanics only, no PyTorch (tests/test_classifier_parity.py compares with the official
models_vit)."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import checkpoints, convert, models

pytestmark = pytest.mark.slow  # many compilations: not in the quick subset

TINY = models.variant("test/8", image_size=32)
_init = jax.jit(models.init_variables, static_argnums=0)


def _classifier(**overrides):
    return models.ViTClassifier(**models.classifier_fields(TINY, **{"num_classes": 10, **overrides}))


def _images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Stochastic depth.
# ---------------------------------------------------------------------------------------------------------


def test_drop_path_keeps_the_expected_value_per_example():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3, 5)).astype(np.float32))
    rate, draws = 0.3, 4000
    out = jax.jit(jax.vmap(lambda key: models.drop_path(x, rate, key)))(jax.random.split(jax.random.key(1), draws))
    out = np.asarray(out)
    # Each example as a whole is either dropped (0) or kept and scaled by 1 / (1 - rate).
    kept = np.all(out != 0, axis=(2, 3))
    np.testing.assert_array_equal(out[~kept], 0.0)
    np.testing.assert_allclose(out[kept], np.broadcast_to(x / (1 - rate), out.shape)[kept], rtol=1e-6)
    # Masks are per example: within one draw some examples are kept and others dropped.
    assert np.mean(kept.all(axis=1) | (~kept).all(axis=1)) < 0.01
    frac = 1 - kept.mean()  # 64000 Bernoulli draws: standard error 0.0018
    assert abs(frac - rate) < 0.01, frac
    np.testing.assert_allclose(out.mean(axis=0), x, atol=0.05 * float(np.abs(x).max()))
    # bfloat16 activations keep their dtype; the scale 1 / (1 - rate) is applied in float32.
    low = models.drop_path(x.astype(jnp.bfloat16), 0.1, jax.random.key(3))
    kept = np.asarray(low.astype(jnp.float32)).any(axis=(1, 2))
    assert low.dtype == jnp.bfloat16 and kept.any()
    np.testing.assert_array_equal(low[kept], (x.astype(jnp.bfloat16).astype(jnp.float32) / np.float32(0.9))
                                  .astype(jnp.bfloat16)[kept])


def test_block_draws_a_mask_per_example_and_per_branch():
    """Identical examples through one Block: each branch is dropped or kept per example, independently, giving
    exactly four outcomes; with both branches dropped the block is the identity."""
    block = models.Block(num_heads=2, ops="generic")
    x = jnp.broadcast_to(jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 16)), jnp.float32), (512, 5, 16))
    variables = block.init(jax.random.key(0), x)
    eval_out = block.apply(variables, x, 0.5, False)
    np.testing.assert_array_equal(eval_out, block.apply(variables, x))  # train=False: no drop path, no rng
    out = np.asarray(block.apply(variables, x, 0.5, True, rngs={"drop_path": jax.random.key(2)}))
    patterns, counts = np.unique(out.reshape(512, -1).round(4), axis=0, return_counts=True)
    assert len(patterns) == 4 and counts.min() > 80, counts  # each outcome has probability 1/4
    identity = np.all(out == np.asarray(x), axis=(1, 2))
    assert 80 < identity.sum() < 180


@pytest.mark.parametrize("scan", [False, True])
def test_block_rates_are_linspace(scan):
    """Block i is called with linspace(0, drop_path_rate, depth)[i] (timm's decay rule), train or not."""
    encoder_fields = dict(depth=5, num_heads=2, ops="generic", scan=scan, drop_path_rate=0.2)
    rates = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, models.Block) and context.method_name == "__call__":
            jax.debug.callback(lambda r: rates.append(float(r)), jnp.asarray(args[1]))
        return next_fun(*args, **kwargs)

    class Wrapper(nn.Module):  # the Encoder puts its blocks in its parent's scope
        @nn.compact
        def __call__(self, x, train):
            return models.Encoder(**encoder_fields)(x, train)

    x = jnp.ones((4, 3, 8), jnp.float32)
    variables = Wrapper().init(jax.random.key(0), x, False)
    with nn.intercept_methods(record):
        Wrapper().apply(variables, x, True, rngs={"drop_path": jax.random.key(1)})
    jax.effects_barrier()
    np.testing.assert_array_equal(models.drop_path_rates(0.2, 5), np.linspace(0, 0.2, 5, dtype=np.float32))
    np.testing.assert_allclose(rates, np.linspace(0, 0.2, 5), rtol=1e-6, atol=0)


def test_classifier_drop_path_only_when_training():
    classifier = _classifier(drop_path_rate=0.5)
    variables = _init(classifier, jax.random.key(0))
    images = _images(8)
    eval_logits = jax.jit(classifier.apply)(variables, images)
    without = _classifier(drop_path_rate=0.0)
    np.testing.assert_array_equal(eval_logits, jax.jit(without.apply)(variables, images))
    # With rate 0 training is deterministic and needs no rng.
    np.testing.assert_array_equal(jax.jit(lambda v, x: without.apply(v, x, train=True))(variables, images),
                                  eval_logits)
    train = jax.jit(lambda v, x, key: classifier.apply(v, x, train=True, rngs={"drop_path": key}))
    a, b, again = train(variables, images, jax.random.key(1)), train(variables, images, jax.random.key(2)), \
        train(variables, images, jax.random.key(1))
    np.testing.assert_array_equal(a, again)
    assert not np.allclose(a, eval_logits) and not np.allclose(a, b)
    with pytest.raises(Exception, match="drop_path"):  # flax names the missing rng stream
        classifier.apply(variables, images, train=True)


# ---------------------------------------------------------------------------------------------------------
# The classifier.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_pool", [True, False])
def test_parameters_follow_the_official_names(global_pool):
    classifier = _classifier(global_pool=global_pool)
    variables = _init(classifier, jax.random.key(0))
    assert list(variables) == ["params"]
    params = variables["params"]
    final = "fc_norm" if global_pool else "norm"
    assert set(params) == {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1", final, "head"}
    # pos_embed: a trainable parameter initialised to the official sin-cos table.
    np.testing.assert_array_equal(params["pos_embed"][0], models.get_2d_sincos_pos_embed(32, (4, 4), True))
    np.testing.assert_array_equal(params[final]["scale"], 1.0)
    np.testing.assert_array_equal(params["head"]["bias"], 0.0)
    assert params["head"]["kernel"].shape == (32, 10)
    # The encoder's initialisers are the MAE's: the same seed gives the same patch embedding and blocks.
    mae_params = _init(models.MaskedAutoencoderViT(**TINY), jax.random.key(0))["params"]
    for name in ("patch_embed", "cls_token", "blocks_0", "blocks_1"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], mae_params[name])


def test_head_init_is_trunc_normal_2e5():
    head = _classifier(num_classes=4000)
    kernel = np.asarray(_init(head, jax.random.key(1))["params"]["head"]["kernel"])
    assert abs(kernel.std() / 2e-5 - 1) < 0.02 and abs(kernel.mean()) < 2e-7  # 128000 draws
    assert np.abs(kernel).max() < 6 * 2e-5  # torch's absolute bounds +-2 never bind


def test_global_pool_and_cls_token_heads():
    """Logits are head(fc_norm(mean of the patch tokens)) or head(norm(x)[:, 0]) of the same block output."""
    images = _images(3)
    for global_pool in (True, False):
        classifier = _classifier(global_pool=global_pool)
        variables = _init(classifier, jax.random.key(3))
        variables = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(4), x.shape),
                                           variables)  # a fresh head is ~0
        features = classifier.apply(variables, images, method=classifier.features)
        assert features.shape == (3, 32)
        head = variables["params"]["head"]
        np.testing.assert_allclose(classifier.apply(variables, images), features @ head["kernel"] + head["bias"],
                                   atol=1e-5, rtol=1e-5)


def test_scan_and_remat_compute_the_same_function():
    classifier = _classifier(drop_path_rate=0.1)
    variables = _init(classifier, jax.random.key(0))
    scanned = _classifier(drop_path_rate=0.1, scan_blocks=True, remat="full")
    scanned_vars = {"params": convert.torch_layout.scan(dict(variables["params"]), scanned)}
    images = _images(2)
    np.testing.assert_allclose(jax.jit(scanned.apply)(scanned_vars, images),
                               jax.jit(classifier.apply)(variables, images), atol=1e-5, rtol=0)
    grads = jax.jit(jax.grad(lambda p: scanned.apply({"params": p}, images, train=True,
                                                     rngs={"drop_path": jax.random.key(1)}).sum()))(
        scanned_vars["params"])
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("overrides, message", [
    (dict(num_classes=0), r"num_classes 0 must be a positive integer"),
    (dict(drop_path_rate=1.0), r"drop_path_rate 1.0 must be in \[0, 1\)"),
    (dict(global_pool="yes"), r"global_pool 'yes' must be True"),
    (dict(image_size=30), r"image_size \(30, 30\) is not divisible by patch_size 8"),
    (dict(decoder_depth=2), r"\['decoder_depth'\] are not fields of ViTClassifier"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        _classifier(**overrides)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Loading checkpoints into it.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretrained MAE (every tensor random) saved as our export: (model, variables, path)."""
    mae = models.MaskedAutoencoderViT(**TINY)
    variables = _init(mae, jax.random.key(5))
    rng = np.random.default_rng(6)
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32), variables)
    path = tmp_path_factory.mktemp("pretrained") / "export"
    checkpoints.save_variables(path, variables, models.constructor_fields(mae))
    return mae, variables, path


@pytest.mark.parametrize("global_pool", [True, False])
def test_pretrained_mae_into_classifier(pretrained, global_pool, caplog):
    _, mae_variables, path = pretrained
    classifier = _classifier(global_pool=global_pool)
    base = _init(classifier, jax.random.key(7))
    with caplog.at_level(logging.INFO):
        variables = convert.load_variables(path, classifier, base_variables=base)
    params, mae_params = variables["params"], mae_variables["params"]
    assert list(variables) == ["params"]
    encoder = ["patch_embed", "cls_token", "blocks_0", "blocks_1"] + ([] if global_pool else ["norm"])
    for name in encoder:
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], mae_params[name])
    np.testing.assert_array_equal(params["pos_embed"], mae_variables["constants"]["pos_embed"])
    new = ["head"] + (["fc_norm"] if global_pool else [])
    for name in new:  # from the base variables (the caller's init)
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], base["params"][name])
    assert set(params) == set(encoder) | set(new) | {"pos_embed"}  # decoder (and norm with global pool) dropped
    new_keys = "fc_norm.weight, fc_norm.bias, head.weight, head.bias" if global_pool else "head.weight, head.bias"
    assert f"New keys of the classifier, not in {path} (mae_jax checkpoint): {new_keys}; taken from the base " \
           "variables" in caplog.text
    assert "not loading" in caplog.text and "decoder_embed.weight" in caplog.text
    assert ("norm.weight" in caplog.text.split("not loading")[1]) == global_pool
    # Without base variables, the head is a fresh init (seed 0).
    fresh = convert.load_variables(path, classifier)["params"]["head"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, fresh, _init(classifier, jax.random.key(0))["params"]["head"])


def test_classifier_round_trip_and_misfits(tmp_path):
    classifier = _classifier(scan_blocks=True)
    variables = jax.tree_util.tree_map(np.asarray, _init(classifier, jax.random.key(8)))
    checkpoints.save_variables(tmp_path / "vit", variables, models.constructor_fields(classifier))
    loaded = convert.load_variables(tmp_path / "vit", classifier)  # strict: a fine-tuned classifier
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    sd = convert.to_torch(variables, classifier)
    assert list(sd)[:3] == ["cls_token", "pos_embed", "patch_embed.proj.weight"] and "norm.weight" not in sd
    with pytest.raises(ValueError, match="a ViTClassifier exports to 'official'"):
        convert.to_torch(variables, classifier, format="hf")
    with pytest.raises(ValueError, match="fine-tuned classifier checkpoint .* MaskedAutoencoderViT cannot load"):
        convert.from_torch(sd, models.MaskedAutoencoderViT(**TINY))
    with pytest.raises(ValueError, match=r"head.weight \[10, 32\] vs the model's \[3, 32\].*strict=False"):
        convert.from_torch(sd, _classifier(num_classes=3))
    head = convert.from_torch(sd, _classifier(num_classes=3), strict=False)["head"]
    assert head["kernel"].shape == (32, 3)
    # A global-pool classifier does not fit a cls-token one: fc_norm unexpected, norm missing.
    with pytest.raises(ValueError, match=r"unexpected keys \(not in the model\): fc_norm.weight.*missing keys "
                                         r"\(model shape\): norm.weight"):
        convert.from_torch(sd, _classifier(global_pool=False))
