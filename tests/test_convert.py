"""Tests of mae_jax.convert: parity with Hugging Face ViTMAE and the official layout, exact round trips,
the command line, position-table interpolation against torch, and the error messages."""

import argparse
import functools
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch", reason="the converter tests compare with PyTorch: pip install -e '.[torch]'")
transformers = pytest.importorskip("transformers", reason="the converter tests need transformers: pip install -e '.[torch]'")

import torch_reference  # noqa: E402
from mae_jax import checkpoints, convert, models  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs or PyTorch comparisons: not in the quick subset

torch.set_num_threads(2)

TINY = models.variant("test/8", image_size=32, norm_pix_loss=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _noise(n, length, seed=1):
    return np.random.default_rng(seed).uniform(size=(n, length)).astype(np.float32)


def _hf_forward(hf, images, noise):
    with torch.no_grad():
        out = hf(torch.from_numpy(images).permute(0, 3, 1, 2), noise=torch.from_numpy(noise))
    return out.loss.item(), out.logits.numpy(), out.mask.numpy()


def _assert_matches_hf(out, ref, atol=1e-5):
    """Returns (max |pred - hf|, |loss - hf|) after asserting them."""
    loss, logits, mask = ref
    np.testing.assert_array_equal(np.asarray(out.mask), mask)
    pred_err = float(np.abs(np.asarray(out.pred) - logits).max())
    loss_err = abs(float(out.loss) - loss)
    assert pred_err <= atol and loss_err <= atol, (pred_err, loss_err)
    return pred_err, loss_err


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_init = jax.jit(models.init_variables, static_argnums=0)  # op by op, a tiny init takes ~15 s here


def _features(model, variables, images):
    return jax.jit(functools.partial(model.apply, method=model.features))(variables, images)


def _random_variables(model, seed=0):
    """Our variables with every tensor random (LayerNorm and biases included), numpy."""
    variables = _init(model, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
    rng = np.random.default_rng(seed)
    leaves = [(rng.normal(size=x.shape) * 0.05).astype(np.float32) + (1 if x.ndim == 1 and np.all(x == 1) else 0)
              for x in leaves]
    return {"params": jax.tree_util.tree_unflatten(treedef, leaves),
            "constants": jax.tree_util.tree_map(np.asarray, variables["constants"])}


@pytest.fixture(scope="module")
def tiny_hf():
    return torch_reference.random_hf_model(TINY, seed=3)


@pytest.fixture(scope="module")
def tiny_model():
    return models.MaskedAutoencoderViT(**TINY)


@pytest.fixture(scope="module")
def tiny_apply(tiny_model):
    return jax.jit(lambda v, x, noise: tiny_model.apply(v, x, noise=noise))


# --------------------------------------------------------------------------------------------------------
# 1-2. Hugging Face and official checkpoints -> identical outputs.
# --------------------------------------------------------------------------------------------------------


def test_load_hf_tiny_matches_transformers(tiny_hf, tiny_model, tiny_apply, tmp_path):
    tiny_hf.save_pretrained(tmp_path)
    model, params = convert.load_hf(tmp_path)
    assert model == tiny_model
    _assert_trees_equal(params, torch_reference.hf_to_flax(tiny_hf)["params"])
    images, noise = _images(3, 32), _noise(3, 16)
    out = tiny_apply({"params": params, "constants": models.position_tables(model)}, images, noise)
    errors = _assert_matches_hf(out, _hf_forward(tiny_hf, images, noise))
    print(f"tiny load_hf: max |pred - hf| {errors[0]:.2e}, |loss - hf| {errors[1]:.2e}")
    # load_variables reads the same directory with its tables.
    variables = convert.load_variables(tmp_path, model)
    _assert_trees_equal(variables["params"], params)
    np.testing.assert_array_equal(variables["constants"]["pos_embed"],
                                  tiny_hf.vit.embeddings.position_embeddings.detach().numpy())


def test_official_full_tiny_matches_transformers(tiny_hf, tiny_model, tiny_apply):
    official = torch_reference.hf_to_official(tiny_hf)
    params = convert.from_torch(official, tiny_model)
    _assert_trees_equal(params, torch_reference.hf_to_flax(tiny_hf)["params"])
    images, noise = _images(2, 32, 5), _noise(2, 16, 6)
    out = tiny_apply({"params": params, "constants": models.position_tables(tiny_model)}, images, noise)
    _assert_matches_hf(out, _hf_forward(tiny_hf, images, noise))
    # Torch tensors in, same numbers out.
    _assert_trees_equal(convert.from_torch({k: torch.from_numpy(v) for k, v in official.items()}, tiny_model),
                        params)


def test_hf_key_name_flavours_agree(tiny_hf, tiny_model, tmp_path):
    in_memory = {k: v for k, v in tiny_hf.state_dict().items()}  # transformers 5: vit.layers.0.attention.q_proj
    tiny_hf.save_pretrained(tmp_path)  # 5.23 writes vit.encoder.layer.* and decoder.decoder_encoder.layer.*
    saved = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("decoder.decoder_encoder.layer.0.attention.attention.key") for k in saved)
    hub = torch_reference.hub_names(in_memory)  # transformers 4: decoder.decoder_layers.0.attention.attention.key
    assert "decoder.decoder_layers.0.attention.attention.key.weight" in hub
    expected = torch_reference.hf_to_flax(tiny_hf)["params"]
    for state_dict in (in_memory, saved, hub):
        _assert_trees_equal(convert.from_torch(state_dict, tiny_model), expected)
    # A ViTMAEModel (encoder only, no "vit." prefix) loads the encoder.
    encoder = convert.from_torch(tiny_hf.vit.state_dict(), tiny_model)
    _assert_trees_equal({k: v for k, v in encoder.items() if not k.startswith(("decoder", "mask"))},
                        {k: v for k, v in expected.items() if not k.startswith(("decoder", "mask"))})
    # pytorch_model.bin with Hub names.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(hub, bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((tmp_path / "config.json").read_text())
    _assert_trees_equal(convert.load_hf(bin_dir)[1], expected)


def test_load_hf_reads_safetensors_without_torch(tiny_hf, tmp_path):
    tiny_hf.save_pretrained(tmp_path)
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import numpy as np; from mae_jax import convert\n"
        f"model, params = convert.load_hf({str(tmp_path)!r})\n"
        "np.save(sys.argv[1], params['blocks_1']['attn']['qkv']['kernel'])\n")
    out = tmp_path / "qkv.npy"
    subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=ROOT))
    np.testing.assert_array_equal(np.load(out), torch_reference.hf_to_flax(tiny_hf)["params"]["blocks_1"]["attn"]
                                  ["qkv"]["kernel"])


def test_encoder_only_official_gives_same_features(tiny_hf, tiny_model, caplog):
    encoder_only = torch_reference.hf_to_official(tiny_hf, decoder=False)
    assert not any(k.startswith(("decoder", "mask_token")) for k in encoder_only)
    base = _random_variables(tiny_model, seed=7)
    with caplog.at_level(logging.INFO):
        variables = convert.from_torch_variables(encoder_only, tiny_model, base_variables=base)
    assert "encoder only: the decoder (" in caplog.text and "kept from the base variables" in caplog.text
    for name in ("decoder_embed", "mask_token", "decoder_blocks_0", "decoder_norm", "decoder_pred"):
        _assert_trees_equal(variables["params"][name], base["params"][name])
    np.testing.assert_array_equal(variables["constants"]["decoder_pos_embed"], base["constants"]["decoder_pos_embed"])
    images = _images(2, 32, 9)
    feats = _features(tiny_model, variables, images)
    # HF's encoder with nothing masked, patches in order: mask ratio 0 and increasing noise.
    mask_ratio, tiny_hf.config.mask_ratio = tiny_hf.config.mask_ratio, 0.0
    try:
        with torch.no_grad():
            ref = tiny_hf.vit(torch.from_numpy(images).permute(0, 3, 1, 2),
                              noise=torch.arange(16.0).repeat(2, 1)).last_hidden_state.numpy()
    finally:
        tiny_hf.config.mask_ratio = mask_ratio
    err = float(np.abs(np.asarray(feats) - ref).max())
    assert err <= 1e-5, err
    # Without base variables the decoder comes from a fresh init, and the log says so.
    with caplog.at_level(logging.INFO):
        params = convert.from_torch(encoder_only, tiny_model)
    assert "kept from a fresh initialisation" in caplog.text
    _assert_trees_equal(params["decoder_pred"], _init(tiny_model, jax.random.key(0))["params"]["decoder_pred"])


def test_official_training_checkpoint_file(tiny_hf, tiny_model, tmp_path):
    """torch.save({'model', 'optimizer', 'epoch', 'args'}) as main_pretrain.py writes, read safely."""
    official = {k: torch.from_numpy(v) for k, v in torch_reference.hf_to_official(tiny_hf).items()}
    path = tmp_path / "checkpoint-399.pth"
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=32, mask_ratio=0.75, norm_pix_loss=True)
    torch.save({"model": official, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": args}, path)
    variables = convert.load_variables(path, tiny_model)
    _assert_trees_equal(variables, torch_reference.hf_to_flax(tiny_hf))
    # A bare state dict works too.
    torch.save(official, tmp_path / "bare.pth")
    _assert_trees_equal(convert.load_variables(tmp_path / "bare.pth", tiny_model), variables)
    # An encoder-only file, as config.init_from passes it: the decoder comes from base_variables.
    torch.save({"model": {k: v for k, v in official.items() if not k.startswith(("decoder", "mask_token"))}},
               tmp_path / "encoder.pth")
    base = _random_variables(tiny_model, seed=21)
    loaded = convert.load_variables(tmp_path / "encoder.pth", tiny_model, base)
    _assert_trees_equal(loaded["params"]["blocks_1"], variables["params"]["blocks_1"])
    _assert_trees_equal(loaded["params"]["decoder_blocks_0"], base["params"]["decoder_blocks_0"])
    with pytest.raises(convert.CheckpointError, match="missing.pth does not exist: expected an official MAE .pth"):
        convert.load_variables(tmp_path / "missing.pth", tiny_model)


B16 = models.variant("B/16", image_size=224, norm_pix_loss=True)


def test_vit_b16_hf_and_official(tmp_path):
    hf = torch_reference.random_hf_model(B16, seed=1)
    model = models.MaskedAutoencoderViT(**B16)
    images, noise = _images(1, 224, 2), _noise(1, 196, 3)
    ref = _hf_forward(hf, images, noise)
    apply = jax.jit(lambda v, x, n: model.apply(v, x, noise=n))
    hf.save_pretrained(tmp_path)
    official = torch_reference.hf_to_official(hf)
    del hf
    loaded_model, params = convert.load_hf(tmp_path)
    assert loaded_model == model
    out = apply({"params": params, "constants": models.position_tables(model)}, images, noise)
    hf_err = _assert_matches_hf(out, ref)
    official_params = convert.from_torch(official, model)
    _assert_trees_equal(official_params, params)
    out = apply({"params": official_params, "constants": models.position_tables(model)}, images, noise)
    official_err = _assert_matches_hf(out, ref)
    print(f"ViT-B/16 load_hf: max |pred - hf| {hf_err[0]:.2e}, |loss - hf| {hf_err[1]:.2e}; "
          f"official: {official_err[0]:.2e}, {official_err[1]:.2e}")


# --------------------------------------------------------------------------------------------------------
# 3. Exact round trips, and transformers loading our export.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_round_trips_are_bit_exact(tiny_hf, scan):
    model = models.MaskedAutoencoderViT(**dict(TINY, scan_blocks=scan))
    variables = _random_variables(model, seed=11)
    if scan:
        assert variables["params"]["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
    official = convert.to_torch(variables, model, format="official")
    reference = torch_reference.hf_to_official(tiny_hf)  # the official key set, by an independent mapping
    assert {k: v.shape for k, v in official.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.dtype == np.float32 for v in official.values())
    _assert_trees_equal(convert.from_torch_variables(official, model), variables)
    _assert_trees_equal(convert.from_torch(official, model), variables["params"])
    hf = convert.to_torch(variables, model, format="hf")
    assert hf.keys() == torch_reference.hub_names(tiny_hf.state_dict()).keys()
    _assert_trees_equal(convert.from_torch_variables(hf, model), variables)
    hf_t5 = convert.to_torch(variables, model, format="hf_t5")
    assert hf_t5.keys() == tiny_hf.state_dict().keys()
    _assert_trees_equal(convert.from_torch_variables(hf_t5, model), variables)
    # Scanned <-> unscanned through the official layout.
    other = model.clone(scan_blocks=not scan)
    back = convert.from_torch_variables(convert.to_torch(convert.from_torch_variables(official, other), other),
                                        model)
    _assert_trees_equal(back, variables)


@pytest.mark.parametrize("scan", [False, True])
def test_save_hf_loads_in_transformers(tmp_path, scan):
    model = models.MaskedAutoencoderViT(**dict(TINY, scan_blocks=scan))
    variables = _random_variables(model, seed=13)
    convert.save_hf(variables["params"], model, tmp_path)
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.hidden_act == "gelu" and hf.config.qkv_bias
    assert hf.config.norm_pix_loss and hf.config.mask_ratio == 0.75 and hf.config.image_size == 32
    hf.eval()
    images, noise = _images(2, 32, 4), _noise(2, 16, 5)
    out = jax.jit(lambda v, x, n: model.apply(v, x, noise=n))(variables, images, noise)
    errors = _assert_matches_hf(out, _hf_forward(hf, images, noise))
    print(f"tiny save_hf (scan={scan}) -> from_pretrained: max |pred - hf| {errors[0]:.2e}")
    # And back: Flax -> HF directory -> Flax is exact.
    loaded_model, params = convert.load_hf(tmp_path, scan_blocks=scan)
    assert loaded_model == model
    _assert_trees_equal(params, variables["params"])


# --------------------------------------------------------------------------------------------------------
# 4. Command line and our checkpoint format.
# --------------------------------------------------------------------------------------------------------


def _cli(*args):
    result = subprocess.run([sys.executable, "-m", "mae_jax.convert", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_cli_pth_to_flax_and_back(tiny_hf, tmp_path):
    official = torch_reference.hf_to_official(tiny_hf)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}, "epoch": 3,
                "args": argparse.Namespace(mask_ratio=0.75, norm_pix_loss=True, input_size=32)},
               tmp_path / "in.pth")
    log = _cli(tmp_path / "in.pth", tmp_path / "ours")
    assert "official MAE" in log and "Wrote our checkpoint" in log
    fields, variables = checkpoints.load_variables(tmp_path / "ours")
    assert models.MaskedAutoencoderViT(**fields) == models.MaskedAutoencoderViT(**TINY)
    _assert_trees_equal(variables, torch_reference.hf_to_flax(tiny_hf))
    _cli(tmp_path / "ours", tmp_path / "back.pth", "--to", "official")
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert back.keys() == official.keys()
    for key, value in official.items():
        np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)
    _cli(tmp_path / "ours", tmp_path / "hf", "--to", "hf")
    model, params = convert.load_hf(tmp_path / "hf")
    assert model == models.MaskedAutoencoderViT(**TINY)
    _assert_trees_equal(params, variables["params"])


def test_load_variables_from_our_checkpoint_into_scanned_model(tmp_path, tiny_model):
    variables = _random_variables(tiny_model, seed=17)
    checkpoints.save_variables(tmp_path, variables, models.constructor_fields(tiny_model))
    scanned = tiny_model.clone(scan_blocks=True)
    loaded = convert.load_variables(tmp_path, scanned)
    assert loaded["params"]["decoder_blocks"]["mlp"]["fc1"]["kernel"].shape == (1, 16, 64)
    _assert_trees_equal(convert.to_torch(loaded, scanned), convert.to_torch(variables, tiny_model))
    images = _images(1, 32, 8)  # identical weights; XLA orders a scanned loop's float ops differently
    np.testing.assert_allclose(_features(scanned, loaded, images), _features(tiny_model, variables, images),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------
# 5. Position tables on another grid; wrong checkpoints.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src, dst", [((14, 14), (16, 16)), ((14, 14), (7, 7)), ((14, 14), (24, 24)),
                                      ((4, 4), (6, 3))])
def test_interpolate_pos_embed_equals_torch_bicubic(src, dst):
    table = models.get_2d_sincos_pos_embed(64, src, cls_token=True)[None]
    table = table + np.random.default_rng(0).normal(size=table.shape).astype(np.float32) * 0.1
    # The same kernel: float64 against torch's float64.
    ours64 = convert.interpolate_pos_embed(table, src, dst, dtype=np.float64)
    tokens = torch.from_numpy(table[:, 1:].astype(np.float64)).reshape(1, *src, 64).permute(0, 3, 1, 2)
    ref64 = torch.nn.functional.interpolate(tokens, size=dst, mode="bicubic", align_corners=False)
    np.testing.assert_allclose(ours64[:, 1:], ref64.permute(0, 2, 3, 1).reshape(1, -1, 64).numpy(),
                               atol=1e-12, rtol=0)
    # The official function in float32: torch's own float32 rounding, ~1e-6.
    ours = convert.interpolate_pos_embed(table, src, dst)
    ref = torch_reference.official_interpolate_pos_embed(table, src, dst)
    assert ours.shape == ref.shape == (1, 1 + dst[0] * dst[1], 64) and ours.dtype == np.float32
    err = float(np.abs(ours - ref).max())
    print(f"bicubic {src} -> {dst}: max |ours - torch float32| {err:.2e}")
    assert err <= 2e-6, err
    np.testing.assert_array_equal(ours[:, 0], table[:, 0])


def test_checkpoint_of_another_image_size_is_interpolated(tiny_hf, caplog):
    official = torch_reference.hf_to_official(tiny_hf)  # 32 px, 4 x 4 grid
    model = models.MaskedAutoencoderViT(**dict(TINY, image_size=48))  # 6 x 6 grid
    with caplog.at_level(logging.INFO):
        variables = convert.from_torch_variables(official, model)
    assert "Interpolating pos_embed from a (4, 4) grid" in caplog.text
    for name in ("pos_embed", "decoder_pos_embed"):
        np.testing.assert_allclose(variables["constants"][name],
                                   torch_reference.official_interpolate_pos_embed(official[name], (4, 4), (6, 6)),
                                   atol=2e-6, rtol=0)
    _assert_trees_equal(variables["params"], torch_reference.hf_to_flax(tiny_hf)["params"])
    out = jax.jit(lambda v, x, n: model.apply(v, x, noise=n))(variables, _images(1, 48), _noise(1, 36))
    assert np.isfinite(float(out.loss))


def test_position_table_off_the_formula_is_used_with_a_warning(tiny_hf, tiny_model, caplog):
    official = torch_reference.hf_to_official(tiny_hf)
    official["pos_embed"] = official["pos_embed"] + 0.01
    with caplog.at_level(logging.WARNING):
        variables = convert.from_torch_variables(official, tiny_model)
    assert "pos_embed of the checkpoint differs from the 2-D sin-cos formula by up to 0.01" in caplog.text
    np.testing.assert_array_equal(variables["constants"]["pos_embed"], official["pos_embed"])


def _official_shapes(embed_dim, depth, decoder_dim=512, decoder_depth=8, patch=16, grid=14):
    """Zeros in the official layout (virtual memory only: never touched)."""
    shapes = {"cls_token": (1, 1, embed_dim), "pos_embed": (1, 1 + grid * grid, embed_dim),
              "patch_embed.proj.weight": (embed_dim, 3, patch, patch), "patch_embed.proj.bias": (embed_dim,),
              "norm.weight": (embed_dim,), "norm.bias": (embed_dim,), "mask_token": (1, 1, decoder_dim),
              "decoder_pos_embed": (1, 1 + grid * grid, decoder_dim),
              "decoder_embed.weight": (decoder_dim, embed_dim), "decoder_embed.bias": (decoder_dim,),
              "decoder_norm.weight": (decoder_dim,), "decoder_norm.bias": (decoder_dim,),
              "decoder_pred.weight": (patch * patch * 3, decoder_dim), "decoder_pred.bias": (patch * patch * 3,)}
    for prefix, dim, n in (("blocks", embed_dim, depth), ("decoder_blocks", decoder_dim, decoder_depth)):
        for i in range(n):
            for name, shape in (("norm1", (dim,)), ("norm2", (dim,)), ("attn.qkv", (3 * dim, dim)),
                                ("attn.proj", (dim, dim)), ("mlp.fc1", (4 * dim, dim)),
                                ("mlp.fc2", (dim, 4 * dim))):
                shapes[f"{prefix}.{i}.{name}.weight"] = shape
                shapes[f"{prefix}.{i}.{name}.bias"] = shape[:1]
    return {k: np.zeros(v, np.float32) for k, v in shapes.items()}


def test_vit_l_checkpoint_into_vit_b_fails_naming_keys_and_shapes():
    model_b = models.MaskedAutoencoderViT(**models.variant("B/16"))
    sd_l = _official_shapes(1024, 24)
    with pytest.raises(ValueError) as error:
        convert.from_torch(sd_l, model_b)
    message = str(error.value)
    print(message)
    assert "shape mismatches" in message and "cls_token [1, 1, 1024] vs [1, 1, 768]" in message
    assert "patch_embed.proj.weight [1024, 3, 16, 16] vs [768, 3, 16, 16]" in message
    assert "unexpected keys" in message and "blocks.12.norm1.weight [1024]" in message
    assert "looks like embed_dim=1024, depth=24" in message
    # The full B shapes load (the oracle of the zeros above), and an encoder-only B dict too.
    sd_b = _official_shapes(768, 12)
    assert convert.from_torch(sd_b, model_b)["blocks_11"]["attn"]["qkv"]["kernel"].shape == (768, 2304)


def test_hf_names_in_error_messages_and_other_errors(tiny_hf, tiny_model, caplog):
    big = torch_reference.random_hf_model(dict(TINY, embed_dim=64, num_heads=4), seed=0)
    with pytest.raises(ValueError, match=r"vit\.encoder\.layer\.0\.attention\.attention\.\{query,key,value\}"
                                         r"\.weight \[192, 64\] vs \[96, 32\]"):
        convert.from_torch(torch_reference.hub_names(big.state_dict()), tiny_model)
    official = torch_reference.hf_to_official(tiny_hf)
    # A missing key is an error naming it; strict=False takes it from the base with a warning.
    partial = {k: v for k, v in official.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError,
                       match=r"1 missing keys \(model shape\): blocks\.1\.mlp\.fc2\.weight \[32, 128\]"):
        convert.from_torch(partial, tiny_model)
    base = _random_variables(tiny_model, seed=2)
    with caplog.at_level(logging.WARNING):
        params = convert.from_torch(partial, tiny_model, base_params=base["params"], strict=False)
    assert "strict=False: 1 keys missing" in caplog.text
    np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc2"]["kernel"],
                                  base["params"]["blocks_1"]["mlp"]["fc2"]["kernel"])
    # Unknown keys, fine-tuned classifiers, half an attention projection.
    with pytest.raises(ValueError, match=r"unexpected keys \(not in the model\): blocks\.0\.attn\.extra\.weight"):
        convert.from_torch(dict(official, **{"blocks.0.attn.extra.weight": np.zeros((2, 2), np.float32)}),
                           tiny_model)
    finetuned = dict(official, **{"fc_norm.weight": np.ones(32, np.float32), "head.weight": np.zeros((10, 32))})
    with pytest.raises(ValueError, match="fine-tuned classifier checkpoint"):
        convert.from_torch(finetuned, tiny_model)
    hub = torch_reference.hub_names(tiny_hf.state_dict())
    del hub["vit.encoder.layer.1.attention.attention.value.bias"]
    with pytest.raises(ValueError, match=r"incomplete attention projection.*\['value'\] missing"):
        convert.from_torch(hub, tiny_model)
    with pytest.raises(ValueError, match="unknown Hugging Face keys"):
        convert.from_torch(dict(hub, **{"vit.pooler.dense.weight": np.zeros((2, 2))}), tiny_model)


def test_encoder_mask_tokens_model_round_trips_and_fine_tunes(tmp_path, caplog):
    """A "w/ [M]" model (Table 1c) has an `encoder_mask_token` and no decoder `mask_token`: our checkpoints and
    official-style exports carry it and read back exactly; Hugging Face export is refused in one line; a
    classifier loads its encoder and drops the token with the decoder."""
    fields = dict(TINY, encoder_mask_tokens=True, mask_sampling="block")
    model = models.MaskedAutoencoderViT(**fields)
    variables = jax.tree_util.tree_map(np.asarray, models.init_variables(model, jax.random.key(3)))
    checkpoints.save_variables(tmp_path / "ours", variables, models.constructor_fields(model))
    convert.save_official(variables, model, tmp_path / "mae.pth")
    assert "encoder_mask_token" in torch.load(tmp_path / "mae.pth", weights_only=False)["model"]
    for source in (tmp_path / "ours", tmp_path / "mae.pth"):
        loaded_model, loaded = convert.load_model(source)
        assert loaded_model == model
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    with pytest.raises(ValueError, match=r"^encoder_mask_tokens=True: transformers' ViTMAE has no encoder mask "
                                         r"token; export --to flax, or --to official"):
        convert.save_hf(variables, model, tmp_path / "hf")
    assert not (tmp_path / "hf" / "config.json").exists()
    classifier = models.ViTClassifier(**models.classifier_fields(fields, num_classes=5))
    with caplog.at_level(logging.INFO, logger="absl"):
        loaded = convert.load_variables(tmp_path / "ours", classifier)
    assert "encoder_mask_token" not in loaded["params"] and "encoder_mask_token" in caplog.text
    np.testing.assert_array_equal(loaded["params"]["blocks_1"]["mlp"]["fc2"]["kernel"],
                                  variables["params"]["blocks_1"]["mlp"]["fc2"]["kernel"])
