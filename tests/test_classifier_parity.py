"""Parity of models.ViTClassifier and its conversion with the official fine-tuning model, a PyTorch transcription
of facebookresearch/mae `models_vit.VisionTransformer` (timm 0.3.2 ViT + global pool, tests/torch_reference.py).

Needs torch (and transformers, which tests/torch_reference.py imports); tests/test_classifier.py holds the
tests that need neither.
"""

import argparse
import logging

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="classifier parity tests compare against PyTorch (pip install torch)")
pytest.importorskip("transformers", reason="tests/torch_reference.py imports transformers (pip install transformers)")

import torch_reference  # noqa: E402
from mae_jax import checkpoints, convert, models  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs or PyTorch comparisons: not in the quick subset

torch.set_num_threads(2)

TINY = models.variant("test/8", image_size=32)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _torch_logits(model, images):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def _classifier(fields, **overrides):
    return models.ViTClassifier(**models.classifier_fields(fields, **overrides))


def _max_error(classifier, variables, images, reference):
    ours = np.asarray(jax.jit(classifier.apply)(variables, images))
    assert ours.shape == reference.shape and ours.dtype == np.float32
    return float(np.abs(ours - reference).max())


@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize("overrides", [dict(ops="xla_cpu"), dict(ops="generic"), dict(scan_blocks=True)])
def test_logits_equal_official_tiny(global_pool, overrides):
    """Every tensor random, official-format state dict loaded strictly: eval logits equal models_vit's."""
    reference = torch_reference.official_vit(TINY, num_classes=10, global_pool=global_pool)
    sd = torch_reference.randomize_(reference, seed=1)
    assert ("fc_norm.weight" in sd) == global_pool and ("norm.weight" in sd) != global_pool
    classifier = _classifier(TINY, num_classes=10, global_pool=global_pool, **overrides)
    variables = convert.from_torch_variables(sd, classifier)
    images = _images(3, 32)
    assert _max_error(classifier, variables, images, _torch_logits(reference, images)) <= 1e-5


def test_logits_equal_official_vit_b16():
    """ViT-B/16 at 224 px, one image, both pooling modes (cls mode: the same tensors, fc_norm renamed norm)."""
    fields = models.variant("B/16")
    reference = torch_reference.official_vit(fields, num_classes=1000, global_pool=True)
    sd = torch_reference.randomize_(reference, seed=2)
    images = _images(1, 224, seed=3)
    errors = {}
    for global_pool in (True, False):
        if not global_pool:
            sd = {k.replace("fc_norm.", "norm."): v for k, v in sd.items()}
            reference = torch_reference.official_vit(fields, num_classes=1000, global_pool=False)
            reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
        classifier = _classifier(fields, num_classes=1000, global_pool=global_pool)
        variables = convert.from_torch_variables(sd, classifier)
        errors[global_pool] = _max_error(classifier, variables, images, _torch_logits(reference, images))
    logging.info("ViT-B/16 classifier max |logits - official|: %s", errors)
    assert max(errors.values()) <= 1e-5, errors


def test_parameter_count_vit_b16():
    """ViT-B/16, 1000 classes, global pool: 86,567,656 trainable parameters, pos_embed included (timm trains it)."""
    reference = torch_reference.official_vit(models.variant("B/16"), num_classes=1000, global_pool=True)
    official = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert official == 86_567_656
    classifier = _classifier(models.variant("B/16"), num_classes=1000)
    shapes = jax.eval_shape(lambda: models.init_variables(classifier, jax.random.key(0)))
    assert list(shapes) == ["params"]
    assert models.count_params(shapes) == official


@pytest.mark.parametrize("global_pool", [True, False])
def test_export_loads_strictly_into_official(global_pool, tmp_path):
    """to_torch / save_official / `--to official` -> models_vit.load_state_dict(strict=True) -> equal logits."""
    classifier = _classifier(TINY, num_classes=6, global_pool=global_pool, scan_blocks=True)
    variables = models.init_variables(classifier, jax.random.key(4))
    rng = np.random.default_rng(5)  # a fresh head is ~0: make every tensor matter
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32) * 0.05,
                                       variables)
    images = _images(2, 32, seed=6)
    ours = np.asarray(classifier.apply(variables, images))
    reference = torch_reference.official_vit(TINY, num_classes=6, global_pool=global_pool)
    sd = convert.to_torch(variables, classifier, format="official")
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    np.testing.assert_allclose(_torch_logits(reference, images), ours, atol=1e-5, rtol=0)
    # The command line, from our checkpoint to an official .pth.
    checkpoints.save_variables(tmp_path / "export", variables, models.constructor_fields(classifier))
    convert.main(argparse.Namespace(input=str(tmp_path / "export"), output=str(tmp_path / "vit.pth"), to="official",
                                    variant=None, image_size=None))
    saved = torch.load(tmp_path / "vit.pth", map_location="cpu", weights_only=True)
    reference = torch_reference.official_vit(TINY, num_classes=6, global_pool=global_pool)
    reference.load_state_dict(saved["model"], strict=True)
    np.testing.assert_allclose(_torch_logits(reference, images), ours, atol=1e-5, rtol=0)
    # ... and back: the recorded fields rebuild the classifier.
    model, loaded = convert.load_model(tmp_path / "vit.pth")
    assert models.constructor_fields(model) == models.constructor_fields(classifier)
    np.testing.assert_allclose(np.asarray(model.apply(loaded, images)), ours, atol=1e-6, rtol=0)


def test_official_finetuned_pth_loads_and_rebuilds(tmp_path):
    """An official fine-tuned file ({"model": ...} only, no fields): load_model infers the classifier."""
    reference = torch_reference.official_vit(TINY, num_classes=5, global_pool=True)
    torch_reference.randomize_(reference, seed=7)
    torch.save({"model": reference.state_dict()}, tmp_path / "mae_finetuned_vit_test.pth")
    model, variables = convert.load_model(tmp_path / "mae_finetuned_vit_test.pth", variant="test/8")
    assert isinstance(model, models.ViTClassifier)
    assert (model.num_classes, model.global_pool, model.image_size) == (5, True, 32)
    images = _images(2, 32, seed=8)
    assert _max_error(model, variables, images, _torch_logits(reference, images)) <= 1e-5


def test_pretrained_pth_and_hf_into_classifier(tmp_path, caplog):
    """Official full .pth and HF directory of a pretrained MAE -> classifier: encoder equal, decoder and (global
    pool) norm dropped, head / fc_norm fresh and named; at another resolution pos_embed is interpolated as the
    official interpolate_pos_embed."""
    hf = torch_reference.random_hf_model(TINY, seed=9)
    official = torch_reference.hf_to_official(hf)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}}, tmp_path / "full.pth")
    mae = models.MaskedAutoencoderViT(**TINY)
    convert.save_hf(torch_reference.hf_to_flax(hf), mae, tmp_path / "hf")
    classifier = _classifier(TINY, num_classes=4)
    for source in (tmp_path / "full.pth", tmp_path / "hf"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            variables = convert.load_variables(source, classifier)
        params = variables["params"]
        assert "New keys of the classifier" in caplog.text and "head.weight, head.bias" in caplog.text
        assert "fc_norm.weight" in caplog.text and "norm.weight" in caplog.text  # new, and dropped
        assert not any(k.startswith(("decoder", "mask_token", "norm")) for k in params)
        np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"], official["blocks.1.attn.qkv.weight"].T)
        np.testing.assert_array_equal(params["pos_embed"], official["pos_embed"])
        np.testing.assert_array_equal(params["head"]["bias"], 0.0)
    big = _classifier(TINY, num_classes=4, image_size=48)
    params = convert.load_variables(tmp_path / "full.pth", big)["params"]
    expected = torch_reference.official_interpolate_pos_embed(official["pos_embed"], (4, 4), (6, 6))
    np.testing.assert_allclose(params["pos_embed"], expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Linear probing: main_linprobe.py's head, Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear).
# ---------------------------------------------------------------------------------------------------------


def _probe(global_pool=False, **overrides):
    return _classifier(TINY, num_classes=6, global_pool=global_pool, head_batch_norm=True, head_init_std=0.01,
                       **overrides)


def _random_probe_reference(global_pool, seed):
    reference = torch_reference.official_linprobe_vit(TINY, num_classes=6, global_pool=global_pool)
    torch_reference.randomize_(reference, seed=seed)
    return reference, torch_reference.randomize_batch_norm_(reference, seed=seed + 1)


@pytest.mark.parametrize("global_pool", [False, True])
def test_linprobe_eval_logits_equal_official(global_pool):
    """Every tensor random, running statistics too: eval logits equal main_linprobe.py's model; the official
    state dict (head.0.*, head.1.*) loads strictly and its counter survives."""
    reference, sd = _random_probe_reference(global_pool, seed=11)
    assert {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight"} <= set(sd)
    classifier = _probe(global_pool)
    variables = convert.from_torch_variables(sd, classifier)
    assert sorted(variables) == ["batch_stats", "params"] and int(variables["batch_stats"]["head_bn"]
                                                                  ["num_batches_tracked"]) == 7
    images = _images(3, 32, seed=12)
    error = _max_error(classifier, variables, images, _torch_logits(reference, images))
    print(f"linear probe (global_pool={global_pool}) eval max |logits - official|: {error:.2e}")
    assert error <= 1e-5


def test_batch_norm_train_mode_equals_torch():
    """HeadBatchNorm against torch BatchNorm1d(affine=False, eps=1e-6, momentum=0.1) over 3 batches (sizes 5, 8,
    3; features far from N(0, 1)): outputs and running statistics within 1e-6, counter 3; eval mode after."""
    bn = models.HeadBatchNorm(epsilon=1e-6)
    reference = torch.nn.BatchNorm1d(16, affine=False, eps=1e-6, momentum=0.1).train()
    rng = np.random.default_rng(13)
    variables = bn.init(jax.random.key(0), np.zeros((2, 16), np.float32))
    step = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))
    for n in (5, 8, 3):
        x = (rng.normal(size=(n, 16)) * 3.0 + 2.0).astype(np.float32)
        out, variables = step(variables, x)
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)
    stats = variables["batch_stats"]
    np.testing.assert_allclose(stats["mean"], reference.running_mean.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(stats["var"], reference.running_var.numpy(), atol=1e-6, rtol=0)
    assert int(stats["num_batches_tracked"]) == int(reference.num_batches_tracked) == 3
    x = rng.normal(size=(4, 16)).astype(np.float32)
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bn.apply(variables, x), expected, atol=1e-6, rtol=0)


def test_linprobe_train_mode_equals_official():
    """The whole probe in train mode (frozen encoder, as main_linprobe.py: model.train()) over 3 batches: logits
    and the head's running statistics equal the official model's."""
    reference, sd = _random_probe_reference(False, seed=14)
    classifier = _probe(frozen_encoder=True)
    variables = convert.from_torch_variables(sd, classifier)
    step = jax.jit(lambda v, x: classifier.apply(v, x, train=True, mutable=["batch_stats"]))
    reference.train()
    for seed in (15, 16, 17):
        images = _images(4, 32, seed=seed)
        logits, updates = step(variables, images)
        variables = {**variables, **updates}
        with torch.no_grad():
            expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    stats, bn = variables["batch_stats"]["head_bn"], reference.head[0]
    np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), atol=1e-6, rtol=1e-6)
    assert int(stats["num_batches_tracked"]) == int(bn.num_batches_tracked) == 7 + 3


@pytest.mark.parametrize("global_pool", [False, True])
def test_linprobe_export_loads_strictly_into_official(global_pool, tmp_path):
    """A probe as the trainer checkpoints it ({"params", "batch_stats"}) -> to_torch and `--to
    official` (cls token only) -> main_linprobe.py's model with strict=True -> equal eval logits; and back."""
    classifier = _probe(global_pool, scan_blocks=True)
    variables = models.init_variables(classifier, jax.random.key(18))
    rng = np.random.default_rng(19)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32) * 0.05,
                                    variables["params"])
    stats = {"head_bn": {"mean": rng.normal(size=32).astype(np.float32),
                         "var": rng.uniform(0.5, 2.0, size=32).astype(np.float32),
                         "num_batches_tracked": np.int32(5)}}
    trained = {"params": params, "batch_stats": stats}
    images = _images(2, 32, seed=20)
    ours = np.asarray(classifier.apply({"params": params, "batch_stats": stats}, images))
    sd = convert.to_torch(trained, classifier, format="official")
    assert sd["head.0.num_batches_tracked"].dtype == np.int64 and int(sd["head.0.num_batches_tracked"]) == 5
    reference = torch_reference.official_linprobe_vit(TINY, num_classes=6, global_pool=global_pool)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    np.testing.assert_allclose(_torch_logits(reference, images), ours, atol=1e-5, rtol=0)
    if global_pool:  # the file round trip below does not depend on the pooling: once is enough
        return
    # The command line, from a checkpoint holding the trainer's layout to an official .pth.
    checkpoints.save_variables(tmp_path / "probe", trained, models.constructor_fields(classifier))
    convert.main(argparse.Namespace(input=str(tmp_path / "probe"), output=str(tmp_path / "probe.pth"),
                                    to="official", variant=None, image_size=None))
    saved = torch.load(tmp_path / "probe.pth", map_location="cpu", weights_only=True)
    reference = torch_reference.official_linprobe_vit(TINY, num_classes=6, global_pool=global_pool)
    reference.load_state_dict(saved["model"], strict=True)
    assert int(reference.head[0].num_batches_tracked) == 5
    np.testing.assert_allclose(_torch_logits(reference, images), ours, atol=1e-5, rtol=0)
    # Back, from the .pth with fields and from the bare official file (fields inferred from the keys).
    model, loaded = convert.load_model(tmp_path / "probe.pth")
    assert models.constructor_fields(model) == models.constructor_fields(classifier)
    np.testing.assert_allclose(np.asarray(model.apply(loaded, images)), ours, atol=1e-6, rtol=0)
    torch.save({"model": saved["model"]}, tmp_path / "bare.pth")
    model, loaded = convert.load_model(tmp_path / "bare.pth", variant="test/8")
    assert (model.head_batch_norm, model.global_pool, model.num_classes) == (True, global_pool, 6)
    np.testing.assert_allclose(np.asarray(model.apply(loaded, images)), ours, atol=1e-6, rtol=0)
