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
