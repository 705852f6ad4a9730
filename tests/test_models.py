"""Tests of mae_jax.models and mae_jax.xla_cpu: helpers, parameter tree, init, ops, masking, errors.

No PyTorch here: parity with Hugging Face ViTMAE and the official code is in tests/test_models_parity.py.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import attention, models, xla_cpu
from runs import count_cpu_only_barriers

TINY = models.variant("test/8", image_size=32)


def _images(n, height, width, seed=0):
    return np.random.default_rng(seed).normal(size=(n, height, width, 3)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Pure helpers.
# --------------------------------------------------------------------------------------------------------


def test_sincos_layout_column_first():
    # Patch (row 2, col 5) of a 4 x 6 grid: first half encodes the column, second half the row.
    table = models.get_2d_sincos_pos_embed(8, (4, 6))
    row = table[2 * 6 + 5]
    np.testing.assert_allclose(row[:4], [np.sin(5.0), np.sin(5.0 / 100), np.cos(5.0), np.cos(5.0 / 100)], atol=1e-6)
    np.testing.assert_allclose(row[4:], [np.sin(2.0), np.sin(2.0 / 100), np.cos(2.0), np.cos(2.0 / 100)], atol=1e-6)


@pytest.mark.parametrize("height, width, patch", [(32, 32, 8), (224, 160, 16), (28, 42, 14)])
def test_patchify_roundtrip_and_order(height, width, patch):
    x = _images(2, height, width)
    patches = models.patchify(x, patch)
    h, w = height // patch, width // patch
    assert patches.shape == (2, h * w, patch * patch * 3)
    # Patch (r, c) holds pixels [r*p:(r+1)*p, c*p:(c+1)*p] in (p, q, c) order.
    r, c = h - 1, 1
    np.testing.assert_array_equal(patches[1, r * w + c],
                                  x[1, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].reshape(-1))
    np.testing.assert_array_equal(models.unpatchify(patches, patch, (height, width)), x)
    if height == width:
        np.testing.assert_array_equal(models.unpatchify(patches, patch, height), x)


@pytest.mark.slow
def test_features_equal_encoder_without_masking():
    model = models.MaskedAutoencoderViT(**TINY)
    variables = models.init_variables(model, jax.random.key(0))
    images = _images(2, 32, 32)
    feats = model.apply(variables, images, method=model.features)
    assert feats.shape == (2, 1 + model.num_patches, model.embed_dim)
    # Identity noise order (0, 1, ..., L-1) with mask ratio 0 keeps every patch in place.
    full = model.clone(mask_ratio=0.0)
    noise = np.tile(np.linspace(0, 0.99, model.num_patches, dtype=np.float32), (2, 1))
    out = full.apply(variables, images, noise=noise)
    np.testing.assert_allclose(feats, out.latent, atol=1e-6)
    assert float(out.mask.sum()) == 0.0
    # Loss with nothing removed is defined: the mean over all patches.
    target = models.patch_targets(images, 8, False)
    expected = ((out.pred - target) ** 2).mean()
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Sizes, init, masking.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, total, encoder", [
    ("B/16", 111_655_680, 85_647_360),
    ("L/16", 329_239_296, 303_099_904),
    ("H/14", 656_613_964, 630_435_840),
])
def test_parameter_counts(name, total, encoder):
    model = models.MaskedAutoencoderViT(**models.variant(name))
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    params = shapes["params"]
    assert models.count_params(params) == total
    enc = {k: v for k, v in params.items() if k.startswith("blocks_") or k in ("patch_embed", "cls_token", "norm")}
    assert models.count_params(enc) == encoder
    # The position tables are not parameters.
    assert set(shapes["constants"]) == {"pos_embed", "decoder_pos_embed"}
    assert models.variant(name)["decoder_embed_dim"] == 512


def test_scan_blocks_same_count_and_function():
    fields = dict(TINY)
    model = models.MaskedAutoencoderViT(**fields)
    scanned = models.MaskedAutoencoderViT(**dict(fields, scan_blocks=True, remat="full"))
    variables = models.init_variables(model, jax.random.key(0))
    stacked = dict(variables["params"])
    for prefix, depth in (("blocks", model.depth), ("decoder_blocks", model.decoder_depth)):
        layers = [stacked.pop(f"{prefix}_{i}") for i in range(depth)]
        stacked[prefix] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    shapes = jax.eval_shape(lambda: models.init_variables(scanned, jax.random.key(0)))
    assert jax.tree_util.tree_structure(shapes["params"]) == jax.tree_util.tree_structure(stacked)
    images = _images(2, 32, 32)
    key = {"masking": jax.random.key(3)}
    a = model.apply(variables, images, rngs=key)
    b = scanned.apply({"params": stacked, "constants": variables["constants"]}, images, rngs=key)
    np.testing.assert_allclose(a.pred, b.pred, atol=1e-5)


# The parameter tree of TINY (D 32, 2 blocks; decoder D 16, 1 block; p*p*C = 192), as checkpoints, the
# converter (torch_layout.official_layout) and the FSDP rules know it. Written out, not derived from the model.
_TINY_BLOCK = {  # sub-path -> shape for width 32
    "attn/proj/bias": (32,), "attn/proj/kernel": (32, 32), "attn/qkv/bias": (96,), "attn/qkv/kernel": (32, 96),
    "mlp/fc1/bias": (128,), "mlp/fc1/kernel": (32, 128), "mlp/fc2/bias": (32,), "mlp/fc2/kernel": (128, 32),
    "norm1/bias": (32,), "norm1/scale": (32,), "norm2/bias": (32,), "norm2/scale": (32,),
}
_TINY_DECODER_BLOCK = {  # width 16
    "attn/proj/bias": (16,), "attn/proj/kernel": (16, 16), "attn/qkv/bias": (48,), "attn/qkv/kernel": (16, 48),
    "mlp/fc1/bias": (64,), "mlp/fc1/kernel": (16, 64), "mlp/fc2/bias": (16,), "mlp/fc2/kernel": (64, 16),
    "norm1/bias": (16,), "norm1/scale": (16,), "norm2/bias": (16,), "norm2/scale": (16,),
}
_TINY_OTHERS = {
    "params/cls_token": (1, 1, 32), "params/patch_embed/kernel": (192, 32), "params/patch_embed/bias": (32,),
    "params/norm/scale": (32,), "params/norm/bias": (32,),
    "params/decoder_embed/kernel": (32, 16), "params/decoder_embed/bias": (16,), "params/mask_token": (1, 1, 16),
    "params/decoder_norm/scale": (16,), "params/decoder_norm/bias": (16,),
    "params/decoder_pred/kernel": (16, 192), "params/decoder_pred/bias": (192,),
    "constants/pos_embed": (1, 17, 32), "constants/decoder_pos_embed": (1, 17, 16),
}


def _flat_shapes(tree):
    return {"/".join(k.key for k in path): tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("scan, remat", [(False, "none"), (False, "dots"), (True, "none"), (True, "full")])
def test_parameter_paths_and_shapes(scan, remat):
    """Unrolled: `blocks_{i}` / `decoder_blocks_{i}` at the top; scanned: `blocks` / `decoder_blocks` with a
    leading [depth] axis. The Encoder module and remat add no level of their own."""
    expected = dict(_TINY_OTHERS)
    for prefix, depth, block in (("blocks", 2, _TINY_BLOCK), ("decoder_blocks", 1, _TINY_DECODER_BLOCK)):
        for sub, shape in block.items():
            if scan:
                expected[f"params/{prefix}/{sub}"] = (depth, *shape)
            else:
                expected.update({f"params/{prefix}_{i}/{sub}": shape for i in range(depth)})
    model = models.MaskedAutoencoderViT(**dict(TINY, scan_blocks=scan, remat=remat))
    shapes = _flat_shapes(jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0))))
    assert shapes == expected


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["xla_cpu", "lean"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])  # of the largest value
def test_softmax_attention_matches_autodiff_of_reference(implementation, dtype, tol):
    """The hand-written backwards (xla_cpu.softmax_attention for the CPU, attention.attention elsewhere) against
    jax.vjp of softmax(q k^T / sqrt d) v."""
    qkv = jax.random.normal(jax.random.key(0), (3, 19, 3, 4, 8)) * 2.0
    dout = jax.random.normal(jax.random.key(1), (3, 19, 4, 8))

    def reference(qkv):
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        weights = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(8.0), axis=-1)
        return jnp.einsum("nhqk,nkhd->nqhd", weights, v)

    out_ref, vjp_ref = jax.vjp(reference, qkv)
    function = xla_cpu.softmax_attention if implementation == "xla_cpu" else \
        lambda qkv: attention.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    out, vjp = jax.vjp(function, qkv.astype(dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(jnp.float32), out_ref, atol=tol * float(jnp.abs(out_ref).max()))
    (grad_ref,), (grad,) = vjp_ref(dout), vjp(dout.astype(dtype))
    np.testing.assert_allclose(grad.astype(jnp.float32), grad_ref, atol=tol * float(jnp.abs(grad_ref).max()))


@pytest.mark.slow
@pytest.mark.parametrize("overrides, tol", [
    (dict(attention="einsum"), 1e-5),
    (dict(attention="xla"), 1e-5),
    (dict(attention="lean"), 1e-5),
    (dict(remat="dots"), 1e-5),
    (dict(remat="dots_no_batch"), 1e-5),
    (dict(dtype="bfloat16"), 5e-2),
])
def test_performance_options_same_loss_and_gradients(overrides, tol):
    """Speed options change how, not what: loss and gradients of the default model (itself checked
    against Hugging Face) within float32 round-off, or bfloat16's precision."""
    _assert_same_loss_and_gradients(models.MaskedAutoencoderViT(**TINY),
                                    models.MaskedAutoencoderViT(**dict(TINY, **overrides)), tol)


def _loss_fn(model, constants, batch_size=4, seed=0):
    """params -> the loss of `model` on fixed random images and masking noise."""
    images = _images(batch_size, *(g * model.patch_size for g in model.grid_size), seed=seed)
    noise = jax.random.uniform(jax.random.key(seed + 1), (batch_size, model.num_patches))
    return lambda params: model.apply({"params": params, "constants": constants}, images, noise=noise).loss


def _assert_same_loss_and_gradients(model_a, model_b, tol):
    variables = models.init_variables(model_a, jax.random.key(0))
    (loss_a, grads_a), (loss_b, grads_b) = (
        jax.jit(jax.value_and_grad(_loss_fn(m, variables["constants"])))(variables["params"])
        for m in (model_a, model_b))
    np.testing.assert_allclose(loss_b, loss_a, rtol=tol)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads_a))
    for a, b in zip(jax.tree_util.tree_leaves(grads_a), jax.tree_util.tree_leaves(grads_b)):
        np.testing.assert_allclose(b, a, atol=tol * scale)


def test_xla_cpu_and_generic_ops_same_loss_and_gradients():
    """ops="xla_cpu" (erf GELU, materialize_grad, custom-VJP attention) and ops="generic" (jax.nn) compute the
    same function: loss and gradients within float32 round-off."""
    _assert_same_loss_and_gradients(models.MaskedAutoencoderViT(**dict(TINY, ops="xla_cpu")),
                                    models.MaskedAutoencoderViT(**dict(TINY, ops="generic")), 1e-5)


def test_generic_ops_lower_without_cpu_tricks():
    """The generic gradient program holds none of xla_cpu's exp(0 * x) fusion barriers; the xla_cpu one holds
    one per residual branch (materialize_grad) plus three per attention backward (dk, dv and a factor)."""
    counts = {}
    for ops in ("xla_cpu", "generic"):
        model = models.MaskedAutoencoderViT(**dict(TINY, ops=ops))
        variables = models.init_variables(model, jax.random.key(0))
        lowered = jax.jit(jax.grad(_loss_fn(model, variables["constants"]))).lower(variables["params"])
        counts[ops] = count_cpu_only_barriers(lowered.as_text())
    blocks = TINY["depth"] + TINY["decoder_depth"]
    assert counts == {"xla_cpu": blocks * (2 + 3), "generic": 0}


def _assert_std(value, expected, name, kurtosis):
    """std within 4 standard errors of its estimate (at least 3%): sqrt((kurtosis - 1) / 4n) relative."""
    tol = max(0.03, 4 * np.sqrt((kurtosis - 1) / (4 * value.size)))
    np.testing.assert_allclose(value.std(), expected, rtol=tol, err_msg=name)


def test_init_follows_reference():
    """Every initialised tensor against the official `initialize_weights` rules (models_mae.py)."""
    fields = models.variant("test/16", image_size=64, embed_dim=512, num_heads=4, decoder_embed_dim=512)
    model = models.MaskedAutoencoderViT(**fields)
    with jax.default_device(jax.devices("cpu")[0]):
        variables = models.init_variables(model, jax.random.key(0))
    flat = {"/".join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    patch_dim = 16 * 16 * 3
    assert flat["params/patch_embed/kernel"].shape == (patch_dim, 512)
    assert flat["params/blocks_0/attn/qkv/kernel"].shape == (512, 3 * 512)
    rules = {}
    for name, value in flat.items():
        if name.startswith("constants/"):  # fixed sin-cos tables with a zero cls row
            table = models.get_2d_sincos_pos_embed(512, (4, 4), cls_token=True)[None]
            np.testing.assert_array_equal(value, table, err_msg=name)
            rules[name] = "sincos"
        elif name.endswith("kernel"):
            # xavier-uniform of the torch weight [out, in] (symmetric in fan_in, fan_out): every Linear, the
            # fused qkv as one [3D, D] matrix, and the patch-embedding conv flattened to [D, p*p*C].
            fan_in, fan_out = value.shape
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            assert 0.99 * bound < np.abs(value).max() <= bound, name
            assert abs(value.mean()) < 0.01 * bound, name
            _assert_std(value, bound / np.sqrt(3), name, kurtosis=1.8)
            rules[name] = "xavier"
        elif name == "params/patch_embed/bias":  # not re-initialised: PyTorch's Conv2d default
            bound = 1 / np.sqrt(patch_dim)  # fan_in C*p*p
            assert 0.95 * bound < np.abs(value).max() <= bound, name
            _assert_std(value, bound / np.sqrt(3), name, kurtosis=1.8)
            rules[name] = "conv bias"
        elif name.endswith("bias"):  # Linear biases and LayerNorm offsets
            np.testing.assert_array_equal(value, 0.0, err_msg=name)
            rules[name] = "zero"
        elif name.endswith("scale"):  # LayerNorm weights
            np.testing.assert_array_equal(value, 1.0, err_msg=name)
            rules[name] = "one"
        elif name in ("params/cls_token", "params/mask_token"):  # torch.nn.init.normal_(std=.02)
            assert value.shape == (1, 1, 512), name
            assert abs(value.mean()) < 4 * 0.02 / np.sqrt(value.size), name
            _assert_std(value, 0.02, name, kurtosis=3.0)
            assert np.abs(value).max() > 2.5 * 0.02, name  # a normal, not one truncated at 2 sigma
            rules[name] = "token"
    assert set(rules) == set(flat), "tensors no rule covered: " + str(sorted(set(flat) - set(rules)))
    counts = {rule: list(rules.values()).count(rule) for rule in set(rules.values())}
    blocks = model.depth + model.decoder_depth
    # Per block: qkv, proj, fc1, fc2 kernels and biases, two LayerNorms. Besides: patch_embed, decoder_embed,
    # decoder_pred (kernels; the last two biases) and the norm, decoder_norm LayerNorms.
    assert counts == {"sincos": 2, "xavier": 4 * blocks + 3, "conv bias": 1, "token": 2,
                      "zero": 6 * blocks + 4, "one": 2 * blocks + 2}


def test_random_masking_semantics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16, 5)).astype(np.float32)
    noise = rng.uniform(size=(4, 16)).astype(np.float32)
    x_masked, mask, ids_restore = models.random_masking(x, noise, 0.75)
    assert x_masked.shape == (4, 4, 5)
    np.testing.assert_array_equal(mask.sum(1), 12.0)
    for i in range(4):
        keep = np.argsort(noise[i])[:4]
        np.testing.assert_array_equal(x_masked[i], x[i, keep])
        expected = np.ones(16)
        expected[keep] = 0
        np.testing.assert_array_equal(mask[i], expected)
        np.testing.assert_array_equal(ids_restore[i], np.argsort(np.argsort(noise[i])))


@pytest.mark.slow
def test_masking_from_rng():
    model = models.MaskedAutoencoderViT(**dict(TINY, image_size=64))  # L = 64, len_keep = 16
    variables = models.init_variables(model, jax.random.key(0))
    images = _images(6, 64, 64)
    apply = jax.jit(lambda v, x, k: model.apply(v, x, rngs={"masking": k}))
    key = jax.random.key(42)
    out = apply(variables, images, key)
    mask = np.asarray(out.mask)
    np.testing.assert_array_equal(mask.sum(1), model.num_patches - model.len_keep)
    assert len({m.tobytes() for m in mask}) == 6, "examples must get different masks"
    np.testing.assert_array_equal(apply(variables, images, key).mask, mask)
    assert not np.array_equal(apply(variables, images, jax.random.key(43)).mask, mask)
    # An example's mask depends on its index and the key, not on the batch size.
    np.testing.assert_array_equal(apply(variables, images[:2], key).mask, mask[:2])
    # The per-example noise stream used by training: example i of a batch at `offset` is example
    # offset + i of the whole batch.
    noise = models.per_example_uniform(key, 6, model.num_patches)
    np.testing.assert_array_equal(models.per_example_uniform(key, 2, model.num_patches, offset=4), noise[4:])
    assert len({n.tobytes() for n in np.asarray(noise)}) == 6


# --------------------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, words", [
    (dict(image_size=30), ["image_size", "30", "patch_size 8"]),
    (dict(image_size=(32, 20)), ["image_size", "(32, 20)", "patch_size 8"]),
    (dict(image_size=0), ["image_size (0, 0) must be positive"]),
    (dict(patch_size=0), ["patch_size 0 must be a positive"]),
    (dict(mask_ratio=1.0), ["mask_ratio", "1.0", "[0, 1)"]),
    (dict(mask_ratio=-0.1), ["mask_ratio", "-0.1", "[0, 1)"]),
    (dict(mask_ratio=0.99), ["mask_ratio", "0.99", "no visible patch"]),
    (dict(embed_dim=30, num_heads=3), ["embed_dim", "30", "multiple of 4"]),
    (dict(embed_dim=32, num_heads=3), ["embed_dim 32", "num_heads 3"]),
    (dict(decoder_embed_dim=18), ["decoder_embed_dim", "18"]),
    (dict(decoder_num_heads=5), ["decoder_embed_dim 16", "decoder_num_heads 5"]),
    (dict(dtype="int8"), ["dtype", "int8"]),
    (dict(attention="flash"), ["attention", "flash"]),
    (dict(ops="gpu"), ["ops", "'gpu'", "'auto', 'xla_cpu', 'generic'"]),
    (dict(remat="some"), ["remat", "'some'", "'dots'"]),
])
def test_bad_settings_fail_at_construction(overrides, words):
    with pytest.raises(ValueError) as info:
        models.MaskedAutoencoderViT(**dict(TINY, **overrides))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_bad_images_fail_before_compilation():
    model = models.MaskedAutoencoderViT(**TINY)
    variables = models.init_variables(model, jax.random.key(0))
    for shape in [(2, 32, 32, 1), (2, 32, 24, 3), (32, 32, 3)]:
        with pytest.raises(ValueError, match=r"images of shape .* num_channels 3") as info:
            jax.jit(model.apply)(variables, np.zeros(shape, np.float32), noise=np.zeros((2, 16), np.float32))
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"noise of shape \(2, 5\) must be \[N, L\] = \(2, 16\)"):
        model.apply(variables, np.zeros((2, 32, 32, 3), np.float32), noise=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="variant 'X/16' is not known"):
        models.variant("X/16")
