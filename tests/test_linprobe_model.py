"""Linear probing, model and conversion side, without PyTorch: ViTClassifier's head_batch_norm / head_init_std /
frozen_encoder fields, the batch norm over a sharded batch, probe conversion and checkpoints, and
mae_jax.features (tests/test_classifier_parity.py compares the probe with main_linprobe.py's model)."""

import logging
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mae_jax import checkpoints, convert, features, models, pixels

TINY = models.variant("test/8", image_size=32)
_init = jax.jit(models.init_variables, static_argnums=0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW = pytest.mark.slow  # compiles a model or more: seconds each; not in the quick subset


def _probe(**overrides):
    fields = dict(num_classes=10, global_pool=False, head_batch_norm=True, head_init_std=0.01, ops="generic")
    return models.ViTClassifier(**models.classifier_fields(TINY, **{**fields, **overrides}))


def _images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _random_variables(model, seed):
    """Every variable of `model` random (from its shapes: nothing to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    return jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)


def _random_stats(seed, count=4):
    rng = np.random.default_rng(seed)
    return {"head_bn": {"mean": rng.normal(size=32).astype(np.float32),
                        "var": rng.uniform(0.5, 2.0, size=32).astype(np.float32),
                        "num_batches_tracked": np.int32(count)}}


# ---------------------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------------------


@SLOW
def test_variables_and_head_init():
    """{"params", "batch_stats"} (BatchNorm1d's initial statistics) with head_batch_norm, {"params"} without;
    the head kernel's std is head_init_std (320 draws: the estimate is within 4% per standard error)."""
    variables = _init(_probe(), jax.random.key(0))
    assert sorted(variables) == ["batch_stats", "params"]
    stats = variables["batch_stats"]["head_bn"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(32))
    np.testing.assert_array_equal(stats["var"], np.ones(32))
    assert stats["num_batches_tracked"].dtype == np.int32 and int(stats["num_batches_tracked"]) == 0
    assert "head_bn" not in variables["params"]  # affine=False: nothing to train but the head
    kernel = np.asarray(variables["params"]["head"]["kernel"])
    assert abs(kernel.std() / 0.01 - 1) < 0.2, kernel.std()
    np.testing.assert_array_equal(variables["params"]["head"]["bias"], 0.0)
    plain = _probe(head_batch_norm=False)  # std 2e-5 by default: tests/test_classifier.py
    assert list(jax.eval_shape(lambda: models.init_variables(plain, jax.random.key(0)))) == ["params"]


@pytest.mark.parametrize("overrides, message", [
    (dict(head_batch_norm="yes"), r"head_batch_norm 'yes' must be True or False"),
    (dict(frozen_encoder=1), r"frozen_encoder 1 must be True or False"),
    (dict(head_init_std=0.0), r"head_init_std 0.0 must be a positive number"),
    (dict(head_init_std=float("nan")), r"head_init_std nan must be a positive number"),
    (dict(head_init_std=True), r"head_init_std True must be a positive number"),
])
def test_bad_probe_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        _probe(**overrides)
    assert "\n" not in str(error.value)


@SLOW
def test_train_mode_needs_mutable_batch_stats_and_two_examples():
    probe = _probe()
    variables = _init(probe, jax.random.key(1))
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        jax.eval_shape(lambda v, x: probe.apply(v, x, train=True), variables, _images(2))
    with pytest.raises(ValueError, match="more than 1 example per batch, got 1"):
        jax.eval_shape(lambda v, x: probe.apply(v, x, train=True, mutable=["batch_stats"]), variables, _images(1))
    # Eval mode uses the running statistics: no batch dependence, nothing mutable needed.
    variables = {**variables, "batch_stats": _random_stats(2)}
    images = _images(3, seed=3)
    apply = jax.jit(probe.apply)
    np.testing.assert_allclose(apply(variables, images)[:1], apply(variables, images[:1]), atol=1e-6)


@SLOW
def test_batch_statistics_are_over_the_global_batch():
    """The same jitted train-mode apply with the batch sharded over 8 devices equals 1 device: logits and updated
    statistics (the batch norm reduces over the global batch, not per device)."""
    assert jax.device_count() == 8  # tests/conftest.py
    probe = _probe()
    variables = {**_init(probe, jax.random.key(4)), "batch_stats": _random_stats(5)}
    images = _images(16, seed=6) * np.linspace(0.5, 2.0, 16, dtype=np.float32)[:, None, None, None]

    def step(v, x):
        return probe.apply(v, x, train=True, mutable=["batch_stats"])

    one_logits, one_stats = jax.jit(step)(variables, images)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharded = jax.jit(step, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
    x = jax.device_put(images, NamedSharding(mesh, P("data")))
    assert len({s.device for s in x.addressable_shards}) == 8 and x.addressable_shards[0].data.shape[0] == 2
    logits, stats = sharded(variables, x)
    np.testing.assert_allclose(logits, one_logits, atol=2e-6, rtol=0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), stats, one_stats)
    # Per-device statistics (2 examples each) would be far from these.
    per_device = jax.jit(step)(variables, images[:2])[1]["batch_stats"]["head_bn"]["var"]
    assert np.abs(per_device - one_stats["batch_stats"]["head_bn"]["var"]).max() > 0.01


def _flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@SLOW
def test_frozen_encoder_has_no_encoder_backward():
    """frozen_encoder: zero gradients for every encoder parameter, the head's nonzero; the compiled value_and_grad
    costs about one forward (ratio ~1), against ~3 forwards with the encoder trained."""
    images = _images(8, seed=7)
    labels = np.arange(8) % 10
    ratios = {}
    for frozen in (True, False):
        probe = _probe(frozen_encoder=frozen)
        variables = _init(_probe(), jax.random.key(8))  # the same variables for both settings
        stats = variables["batch_stats"]

        def loss(params, probe=probe, stats=stats):
            logits, _ = probe.apply({"params": params, "batch_stats": stats}, images, train=True,
                                    mutable=["batch_stats"])
            return -jax.nn.log_softmax(logits)[np.arange(8), labels].mean()

        value_and_grad = jax.jit(jax.value_and_grad(loss)).lower(variables["params"]).compile()
        grads = value_and_grad(variables["params"])[1]
        encoder = {k: v for k, v in grads.items() if k != "head"}
        encoder_norm = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(encoder))
        assert float(np.abs(grads["head"]["kernel"]).max()) > 0
        assert (encoder_norm == 0.0) == frozen, encoder_norm
        forward = _flops(jax.jit(loss).lower(variables["params"]).compile())
        backward = _flops(value_and_grad)
        ratios[frozen] = backward / forward
        print(f"frozen_encoder={frozen}: forward {forward:.3g} flops, value_and_grad {backward:.3g} flops, "
              f"ratio {ratios[frozen]:.2f}")
    assert ratios[True] < 1.2 and ratios[False] > 2.0, ratios


# ---------------------------------------------------------------------------------------------------------
# Conversion and checkpoints.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretrained MAE (every tensor random) saved as our export: (variables, path)."""
    mae = models.MaskedAutoencoderViT(**TINY)
    variables = _random_variables(mae, 9)
    path = tmp_path_factory.mktemp("pretrained") / "export"
    checkpoints.save_variables(path, variables, models.constructor_fields(mae))
    return variables, path


@SLOW
def test_probe_round_trips_and_checkpoint_layouts(tmp_path):
    """to_torch -> from_torch_variables is exact (the counter too); an export ({"params", "batch_stats"}), and
    one in the layout before 0.2.0 ({"params", "frozen": {"batch_stats"}}), load back; params alone cannot be
    exported."""
    probe = _probe()
    variables = {"params": _random_variables(probe, 10)["params"], "batch_stats": _random_stats(11, count=9)}
    sd = convert.to_torch(variables, probe)
    assert [k for k in sd if k.startswith("head")] == ["head.1.weight", "head.1.bias", "head.0.running_mean",
                                                       "head.0.running_var", "head.0.num_batches_tracked"]
    back = convert.from_torch_variables(sd, probe)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
    assert back["batch_stats"]["head_bn"]["num_batches_tracked"].dtype == np.int32
    checkpoints.save_variables(tmp_path / "probe", variables, models.constructor_fields(probe))
    loaded = convert.load_variables(tmp_path / "probe", probe)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    legacy = {"params": variables["params"], "frozen": {"batch_stats": variables["batch_stats"]}}
    with checkpoints.make_manager(tmp_path / "legacy", enable_async=False) as manager:
        checkpoints.save(manager, 0, legacy, models.constructor_fields(probe))
    jax.tree_util.tree_map(np.testing.assert_array_equal, convert.load_variables(tmp_path / "legacy", probe),
                           variables)
    model, loaded = convert.load_model(tmp_path / "probe")
    assert models.constructor_fields(model) == models.constructor_fields(probe)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    with pytest.raises(ValueError, match="head_batch_norm exports its BatchNorm running statistics"):
        convert.to_torch(variables["params"], probe)


@SLOW
def test_pretrained_into_probe_gets_fresh_head_and_statistics(pretrained, caplog):
    mae_variables, path = pretrained
    probe = _probe()
    with caplog.at_level(logging.INFO):
        variables = convert.load_variables(path, probe)
    assert sorted(variables) == ["batch_stats", "params"]
    assert "New keys of the classifier" in caplog.text
    assert "head.1.weight, head.1.bias, head.0.running_mean, head.0.running_var, head.0.num_batches_tracked" \
        in caplog.text
    fresh = _init(probe, jax.random.key(0))  # a fresh initialisation, seed 0, as for a fine-tuning head
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["batch_stats"], fresh["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"]["head"], fresh["params"]["head"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"]["norm"], mae_variables["params"]["norm"])
    # Base variables (the trainer's state.variables) provide the statistics.
    base = {**fresh, "batch_stats": _random_stats(12)}
    variables = convert.load_variables(path, probe, base_variables=base)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["batch_stats"], _random_stats(12))


@SLOW
def test_probe_and_finetuned_heads_do_not_mix():
    """A fine-tuned head (head.weight) does not fit a probe (head.1.weight, head.0.*), nor the reverse: one error
    naming the keys, and what the checkpoint looks like."""
    plain = _probe(head_batch_norm=False, head_init_std=2e-5)
    sd = convert.to_torch(_random_variables(plain, 13), plain)
    with pytest.raises(ValueError, match=r"unexpected keys \(not in the model\): head.weight.*missing keys.*"
                                         r"head.1.weight.*head_batch_norm=False") as error:
        convert.from_torch(sd, _probe())
    assert "\n" not in str(error.value)
    probe = _probe()
    sd = convert.to_torch(_random_variables(probe, 14), probe)
    with pytest.raises(ValueError, match=r"head.0.running_mean.*head_batch_norm=True"):
        convert.from_torch(sd, plain)


# ---------------------------------------------------------------------------------------------------------
# mae_jax.features.
# ---------------------------------------------------------------------------------------------------------


@SLOW
def test_extract_keeps_masked_rows_in_order(pretrained, tmp_path):
    """extract() over padded batches: the rows with mask True, in order, equal the classifier's features; a
    pretraining checkpoint loads as cls (default) or mean pooling; written and read back as .npz."""
    _, path = pretrained
    images, labels = _images(13, seed=15), np.arange(13) % 4
    batches = []
    for start in range(0, 13, 8):  # 8 + 5 (padded to 8)
        chunk = slice(start, start + 8)
        n = len(images[chunk])
        batches.append({"images": np.concatenate([images[chunk], np.zeros((8 - n, 32, 32, 3), np.float32)]),
                        "labels": np.concatenate([labels[chunk], np.full(8 - n, -1)]),
                        "mask": np.arange(8) < n})
    assert not features.load_encoder(path)[0].global_pool  # a pretraining checkpoint: cls by default
    model, variables = features.load_encoder(path, "mean")
    assert model.global_pool
    np.testing.assert_array_equal(variables["params"]["fc_norm"]["scale"], 1.0)  # fresh: no fc_norm in an MAE
    for i, batch in enumerate(batches):  # any other per-row entry is carried along, masked the same way
        batch["ids"] = np.asarray([f"id{8 * i + j}" for j in range(8)])
    out = features.extract(model, variables, iter(batches))  # each batch over the 8 devices
    expected = model.apply(variables, images, method=model.features)
    assert sorted(out) == ["features", "ids", "labels"]
    assert out["features"].shape == (13, 32) and out["features"].dtype == np.float32
    np.testing.assert_allclose(out["features"], expected, atol=1e-5, rtol=1e-5)  # other batch sizes: other rounding
    np.testing.assert_array_equal(out["labels"], labels)
    assert out["ids"].tolist() == [f"id{i}" for i in range(13)]
    features.write(tmp_path / "f", out, pool="mean", checkpoint=str(path))
    with np.load(tmp_path / "f") as saved:  # exactly the name given, no ".npz" appended
        np.testing.assert_array_equal(saved["features"], out["features"])
        assert saved["labels"].dtype == np.int64 and str(saved["pool"]) == "mean"
    with pytest.raises(ValueError, match=r"pool 'max' is not one of"):
        features.load_encoder(path, "max")


def _image_folder(root, sizes=((40, 48), (33, 52), (64, 30), (48, 48), (41, 57), (36, 36), (50, 44))):
    """root/<cat|dog>/<i>.png: distinct random images of different sizes, the first four cats."""
    from PIL import Image

    rng = np.random.default_rng(16)
    paths = []
    for i, size in enumerate(sizes):
        folder = root / ("cat" if i < 4 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@SLOW
def test_features_rows_are_the_split_in_order_with_ids_and_paths(pretrained, tmp_path):
    """features.run over a folder dataset the test writes (7 images, 2 classes, batches of 8 over 8 devices):
    row i is the image at file_names[i] (its features computed alone, from the file), with its class label;
    ids and paths are those tfds itself reads (ReadConfig(add_tfds_id=True)), in the same order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from PIL import Image

    from mae_jax import datasets, finetune_augment

    _, path = pretrained
    paths = _image_folder(tmp_path / "images")
    written = features.run(checkpoint=str(path), dataset="folder", image_folder=str(tmp_path / "images"),
                           data_dir=str(tmp_path / "tfds"), split="train", output=str(tmp_path / "feats.npz"),
                           batch_size=8)
    with np.load(tmp_path / "feats.npz") as saved:
        assert sorted(saved) == ["checkpoint", "features", "file_names", "ids", "labels", "pool"]
        for key, value in written.items():
            np.testing.assert_array_equal(saved[key], value)
        assert str(saved["pool"]) == "cls"
    assert sorted(written["file_names"]) == sorted(paths)  # every image once
    builder = datasets.get_builder(features.eval_input_config("folder", "train", str(tmp_path / "tfds"),
                                                              str(tmp_path / "images")))
    stored = list(builder.as_dataset(split="train", shuffle_files=False,
                                     read_config=tfds.ReadConfig(add_tfds_id=True)).as_numpy_iterator())
    assert written["ids"].tolist() == [example["tfds_id"].decode() for example in stored]
    assert written["file_names"].tolist() == [str(tmp_path / "images" / example["file_name"].decode())
                                              for example in stored]
    assert written["file_names"].tolist() != sorted(paths)  # the stored order (shuffled by tfds): a real check
    np.testing.assert_array_equal(written["labels"], [0 if "/cat/" in p else 1 for p in written["file_names"]])
    model, variables = features.load_encoder(path)
    for row, file_name in zip(written["features"], written["file_names"]):
        image = finetune_augment.preprocess_for_eval(tf.constant(np.asarray(Image.open(file_name))),
                                                     model.image_shape[:2], 224 / 256).numpy()
        alone = model.apply(variables, pixels.model_input(image[None]), method=model.features)[0]
        np.testing.assert_allclose(row, alone, atol=1e-5, rtol=1e-5)


@SLOW
def test_features_command_is_quiet_and_names_its_flags(pretrained, tmp_path):
    """python -m mae_jax.features in a user's environment: only our own log lines (no TensorFlow start-up lines,
    no tfds "custom data configuration", nothing about an "official MAE state dict" or a head), ending with what
    was written; a missing flag is one line naming it."""
    import subprocess
    import sys

    _, path = pretrained
    _image_folder(tmp_path / "images")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    env["PYTHONPATH"] = ROOT
    command = [sys.executable, "-m", "mae_jax.features", "--checkpoint", str(path), "--dataset", "folder",
               "--image_folder", str(tmp_path / "images"), "--data_dir", str(tmp_path / "tfds"), "--split",
               "train", "--batch_size", "8"]
    result = subprocess.run([*command, "--output", str(tmp_path / "f.npz")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    ours = re.compile(r"^[IW]\d{4} [\d:.]+ +\d+ (checkpoints|convert|features|datasets)\.py:\d+\] ")
    assert lines and all(ours.match(line) for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    for noise in ("custom data configuration", "official MAE state dict", "head.weight", "oneDNN", "InitializeLog"):
        assert noise not in text, noise
    assert "Features: the cls token of the final norm (--pool cls) of a 2-block, 32-wide encoder" in text
    assert lines[-1].endswith(f"Wrote features [7, 32], labels [7], ids [7], file_names [7] to {tmp_path / 'f.npz'}")
    missing = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 1 and missing.stdout == ""
    helped = subprocess.run([*command[:3], "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert helped.returncode == 0 and "  --output: The .npz file to write." in helped.stdout, helped.stderr[-2000:]
    assert missing.stderr.strip() == "python -m mae_jax.features: error: --output is required (the .npz file to write)"
