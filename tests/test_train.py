"""Tests of pretraining and the shared skeleton: main.py end to end, one in-process run shared by several
checks (tracing once, profiling, window means), the schedule, the non-finite guard, the weight-decay mask,
gradient accumulation, config errors, the paper's recipes. PyTorch parity: test_train_parity.py; devices:
test_parallel.py; interruptions: test_checkpoints.py; TPU programs: test_plan.py."""

import json
import math
import os
import re
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from configs import tiny
from mae_jax import config_lib, models, train, train_state, trainer
from runs import ROOT, read_metrics, run_main, tiny_setup


@pytest.mark.slow
def test_tiny_config_trains_end_to_end(tmp_path):
    start = time.perf_counter()
    result = run_main(tmp_path, "--config.synthetic_num_examples=160")  # an old name of config.input's field
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "config.synthetic_num_examples is now config.input.synthetic_num_examples" in result.stdout + result.stderr
    print(f"configs/tiny.py: {seconds:.1f} s wall")
    metrics = read_metrics(tmp_path)
    config = tiny.get_config()
    total = config.num_epochs * config.input.synthetic_num_examples // config.batch_size
    assert [m["step"] for m in metrics] == list(range(5, total + 1, 5))
    for m in metrics:
        assert {"step", "loss", "lr", "grad_norm", "param_norm", "images_per_sec"} <= set(m)
        assert math.isfinite(m["loss"]) and m["images_per_sec"] > 0
    first, last = metrics[0]["loss"], np.mean([m["loss"] for m in metrics[-3:]])
    assert last < 0.9 * first, (first, last)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["batch_size"] == config.batch_size and saved["model"]["embed_dim"] == config.model.embed_dim
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40", "60"]
    # Progress on stdout: step / total, loss, images/s and, before the end, the ETA.
    assert f"step {total}/{total} | loss" in result.stdout and "img/s" in result.stdout
    assert re.search(rf"step {total - 5}/{total} \| loss .* img/s \| ETA \d+:\d\d:\d\d$", result.stdout, re.M)
    assert "Setting work unit notes" not in result.stdout + result.stderr  # clu's progress report: hidden
    # The next command runs here: the tiny fine-tuning config, whose encoder is this one.
    assert f"or fine-tune: python main.py --config configs/finetune_tiny.py --workdir FT_DIR " \
           f"--config.init_from={tmp_path}" in result.stdout


# --------------------------------------------------------------------------------------------------------
# One in-process run (12 steps, logged every 3), and one logging every step: shared by the tests below.
# --------------------------------------------------------------------------------------------------------


def _config(**fields):
    config = tiny.get_config()
    config.total_steps, config.checkpoint_every_steps, config.visualize_every_steps = 12, 6, 0
    config.update(fields)
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"windows": (workdir, last metrics) of a run logging every 3 steps, traced and profiled; "steps": the
    same run logging every step}."""
    root = tmp_path_factory.mktemp("train_runs")
    traced = chex.assert_max_traces(train.train_step, n=1)
    original, train.train_step = train.train_step, traced
    try:
        last = trainer.train_and_evaluate(_config(log_every_steps=3, profile_steps=2, profile_first_step=4),
                                          root / "windows")
    finally:
        train.train_step = original
    trainer.train_and_evaluate(_config(log_every_steps=1), root / "steps")
    return {"windows": (root / "windows", last), "steps": root / "steps"}


@pytest.mark.slow
def test_train_step_traced_once_and_profiled(runs):
    """One trace of the step over a whole run (chex.assert_max_traces in the fixture would have raised);
    `profile_steps` writes a profiler trace TensorBoard reads."""
    workdir, last = runs["windows"]
    assert [m["step"] for m in read_metrics(workdir)] == [3, 6, 9, 12] and math.isfinite(last["loss"])
    traces = list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000, traces


@pytest.mark.slow
def test_logged_metrics_are_window_means(runs):
    """The logged loss is the mean of the per-step losses since the previous log line (lr: the last step's)."""
    per_step = {m["step"]: m for m in read_metrics(runs["steps"])}
    windows = read_metrics(runs["windows"][0])
    for m in windows:
        steps = range(m["step"] - 2, m["step"] + 1)
        np.testing.assert_allclose(m["loss"], np.mean([per_step[s]["loss"] for s in steps]), rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], np.mean([per_step[s]["grad_norm"] for s in steps]), rtol=1e-6)
        assert m["lr"] == per_step[m["step"]]["lr"] and m["param_norm"] == per_step[m["step"]]["param_norm"]
    assert windows[0]["loss"] != per_step[3]["loss"]  # a mean, not the last step's value


# --------------------------------------------------------------------------------------------------------
# Numerics: the schedule against the official formula, the guard, the masks, accumulation.
# --------------------------------------------------------------------------------------------------------


def official_lr(step, steps_per_epoch, lr, min_lr, warmup_epochs, epochs):
    """util/lr_sched.py adjust_learning_rate, at epoch = step / steps_per_epoch."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def test_learning_rate_schedule_matches_official():
    config = tiny.get_config()
    config.batch_size, config.base_lr, config.min_lr, config.warmup_epochs = 4096, 1.5e-4, 1e-6, 40
    steps_per_epoch, epochs = 312, 800
    schedule = train_state.learning_rate_schedule(config, steps_per_epoch, epochs * steps_per_epoch)
    lr = 1.5e-4 * 4096 / 256
    for step in [0, 1, 100, 12479, 12480, 12481, 50000, 200000, 249599]:
        expected = official_lr(step, steps_per_epoch, lr, 1e-6, 40, epochs)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=2e-6, atol=1e-12, err_msg=str(step))


@pytest.mark.slow
def test_nonfinite_step_leaves_state_unchanged():
    """A NaN batch: params and optimizer state stay bit-identical, the step is recorded; later steps too."""
    config = tiny.get_config()
    config.batch_size = 4
    setup = tiny_setup(config, devices=1)
    state = setup.init_state()
    step_fn = jax.jit(setup.programs["train_step"].fn)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    state, _ = step_fn(state, {"images": images})  # one good step, so that the optimizer state is not all zeros
    before = jax.device_get((state.params, state.opt_state))
    bad = images.copy()
    bad[1, 3, 5, 0] = np.nan
    state, metrics = step_fn(state, {"images": bad})
    assert not np.isfinite(float(metrics["loss"])) and int(state.nonfinite_step) == 2 and int(state.step) == 2
    chex.assert_trees_all_equal(jax.device_get((state.params, state.opt_state)), before)
    state, metrics = step_fn(state, {"images": images})  # a good batch after a bad one is not applied either
    assert np.isfinite(float(metrics["loss"])) and int(state.nonfinite_step) == 2
    chex.assert_trees_all_equal(jax.device_get((state.params, state.opt_state)), before)


def test_weight_decay_mask_follows_official_groups():
    model = models.MaskedAutoencoderViT(**models.variant("test/8", image_size=32))
    params = models.init_variables(model, jax.random.key(0))["params"]
    mask = train.weight_decay_mask(params)
    flat = {"/".join(k.key for k in path): (v, m) for (path, v), m in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(mask))}
    for name, (value, decayed) in flat.items():
        assert decayed == (value.ndim >= 2), name
    assert flat["cls_token"][1] and flat["mask_token"][1] and not flat["norm/scale"][1]
    # With stacked (scanned) blocks a bias is 2-D but still not decayed.
    scanned = models.MaskedAutoencoderViT(**models.variant("test/8", image_size=32, scan_blocks=True))
    shapes = jax.eval_shape(lambda: models.init_variables(scanned, jax.random.key(0)))["params"]
    scanned_mask = train.weight_decay_mask(shapes)
    assert not scanned_mask["blocks"]["attn"]["qkv"]["bias"] and scanned_mask["blocks"]["attn"]["qkv"]["kernel"]


@pytest.mark.slow
def test_grad_accumulation_matches_full_batch():
    config = tiny.get_config()
    config.batch_size = 32
    images = np.random.default_rng(0).integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
    results = {}
    for accum in (1, 4):
        config.grad_accum_steps = accum
        setup = tiny_setup(config, devices=8)
        state = start = setup.init_state()
        step = setup.programs["train_step"].lower().compile()
        batch = {"images": jax.device_put(images, setup.programs["train_step"].args[1]["images"].sharding)}
        for _ in range(2):  # step 0 has lr 0; step 1 moves the parameters
            state, metrics = step(state, batch)
        results[accum] = (state, metrics, start)
    (full, m_full, start), (accum, m_accum, _) = results[1], results[4]
    np.testing.assert_allclose(m_full["loss"], m_accum["loss"], atol=1e-5)
    np.testing.assert_allclose(m_full["grad_norm"], m_accum["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(full.params, accum.params, atol=1e-5, rtol=0)


def test_uint8_batches_are_normalised_on_the_device():
    """The pipelines' uint8 pixels and the same images normalised on the host give the same loss."""
    config = tiny.get_config()
    config.batch_size = 4
    setup = tiny_setup(config, devices=1)
    step = jax.jit(setup.programs["train_step"].fn)
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    from mae_jax import pixels as pixels_lib

    floats = pixels_lib.normalise(pixels.astype(np.float32) / 255.0, 3).astype(np.float32)
    a = step(setup.init_state(), {"images": pixels})[1]["loss"]
    b = step(setup.init_state(), {"images": floats})[1]["loss"]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_renamed_fields_and_square_image_size(caplog):
    """Old top-level data fields still work (with a warning naming the new field); an int image_size too (the
    command line turns `--config.model.image_size=16` into the 1-tuple (16,)). End to end: the tiny run above
    passes `--config.synthetic_num_examples`."""
    config = tiny.get_config()
    config.dataset, config.synthetic_num_examples, config.model.image_size = "folder", 64, (16,)
    caplog.set_level("WARNING")
    config_lib.resolve(config)
    assert config.input.dataset == "folder" and config.input.synthetic_num_examples == 64
    assert config.dataset is None and config.model.image_size == (16, 16)
    assert "config.dataset is now config.input.dataset" in caplog.text
    assert "config.synthetic_num_examples is now config.input.synthetic_num_examples" in caplog.text


# --------------------------------------------------------------------------------------------------------
# Settings: one line each, before anything is compiled or saved.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.batch_sizee=8", "--config.batch_sizee=8: the config has no field 'batch_sizee'. Did you mean "
                               "\"batch_size\""),
    ("--config.batch_size=12", "batch_size 12 is not divisible by the 8 devices of the data=8 x fsdp=1 mesh"),
])
def test_bad_settings_through_main_are_one_line(tmp_path, override, message):
    """main.py: a misspelt field (its own parsing) and a setting the library refuses, one line each."""
    result = run_main(tmp_path, override, devices=8)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, result.stderr[-2000:]
    assert "Compiling the train step" not in result.stdout
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # no checkpoint written


@pytest.mark.parametrize("fields, message", [
    ({"total_steps": -1}, "total_steps -1 must be >= 0"),
    ({"mesh.data": 3}, "mesh data=3 x fsdp=1 does not divide the 8 devices"),
    ({"model.mask_ratio": 1.0}, "model: mask_ratio 1.0 must be in [0, 1)"),
    ({"batch_size": 800}, "batch_size 800 exceeds the 160 training examples"),
    ({"input.dataset": "folder"}, 'dataset="folder" needs config.input.image_folder'),
    ({"init_from": "/nonexistent/weights.pth"}, "/nonexistent/weights.pth does not exist"),
    ({"task": "pretraining"}, "task 'pretraining' must be one of ['finetune', 'linprobe', 'pretrain']"),
])
def test_bad_settings_fail_before_compiling_with_one_line(tmp_path, caplog, fields, message):
    config = tiny.get_config()
    config.update_from_flattened_dict(fields)
    caplog.set_level("INFO")
    with pytest.raises(ValueError) as error:
        trainer.train_and_evaluate(config, tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "Compiling" not in caplog.text
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_paper_recipes():
    """Every shipped recipe against REFERENCE.md (PRETRAIN.md / FINETUNE.md), and valid on a 256-chip pod."""
    from configs import (finetune_vit_base, finetune_vit_huge, finetune_vit_large, linprobe_vit_base,
                         linprobe_vit_huge, linprobe_vit_large, vit_base, vit_huge, vit_large)

    fields = ("task", "batch_size", "num_epochs", "warmup_epochs", "base_lr", "min_lr", "weight_decay", "b1", "b2")
    pretrain = ("pretrain", 4096, 800, 40, 1.5e-4, 0.0, 0.05, 0.9, 0.95)
    finetune = ("finetune", 1024, None, 5, None, 1e-6, 0.05, 0.9, 0.999)
    probe = ("linprobe", 16384, None, 10, 0.1, 0.0, 0.0, 0.9, 0.999)
    table = {  # module: (common fields, {other fields})
        vit_base: (pretrain, {"model.embed_dim": 768, "model.mask_ratio": 0.75, "model.norm_pix_loss": True}),
        vit_large: (pretrain, {"model.embed_dim": 1024, "model.depth": 24}),
        vit_huge: (pretrain, {"model.embed_dim": 1280, "model.patch_size": 14}),
        finetune_vit_base: (finetune, {"num_epochs": 100, "base_lr": 5e-4, "layer_decay": 0.65,
                                       "model.drop_path_rate": 0.1}),
        finetune_vit_large: (finetune, {"num_epochs": 50, "base_lr": 1e-3, "layer_decay": 0.75,
                                        "model.drop_path_rate": 0.2}),
        finetune_vit_huge: (finetune, {"num_epochs": 50, "base_lr": 1e-3, "layer_decay": 0.75,
                                       "model.drop_path_rate": 0.3}),
        linprobe_vit_base: (probe, {"num_epochs": 90}),
        linprobe_vit_large: (probe, {"num_epochs": 50}),
        linprobe_vit_huge: (probe, {"num_epochs": 50}),
    }
    finetune_common = {"label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.5,
                       "input.rand_augment": "rand-m9-mstd0.5-inc1", "input.random_erasing": 0.25,
                       "model.global_pool": True, "input.crop_scale": (0.08, 1.0)}
    probe_common = {"mixup": 0, "cutmix": 0, "label_smoothing": 0, "input.rand_augment": "",
                    "input.random_erasing": 0.0, "input.crop_scale": (0.08, 1.0), "model.global_pool": False,
                    "model.head_batch_norm": True, "model.frozen_encoder": True, "model.head_init_std": 0.01}
    for module, (common, other) in table.items():
        config = module.get_config()
        expected = {**{k: v for k, v in zip(fields, common) if v is not None}, **other,
                    **(finetune_common if common is finetune else probe_common if common is probe else {})}
        for name, value in expected.items():
            actual = config
            for part in name.split("."):
                actual = actual[part]
            assert tuple(actual) == value if isinstance(value, tuple) else actual == value, (module.__name__, name)
        assert trainer.task_class(config).validate(config, 256, 64) == (256, 1), module.__name__


@pytest.mark.slow
def test_missing_or_broken_config_file_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    missing = tmp_path / "missing.py"
    for config, message in [(missing, f"--config {missing}: no such file (e.g. configs/vit_base.py)"),
                            (broken, f"--config: {broken}:1: invalid syntax")]:
        result = subprocess.run([sys.executable, "main.py", "--config", str(config), "--workdir", str(tmp_path / "w")],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == [f"main.py: error: {message}"], result.stderr[-2000:]


@pytest.mark.slow
def test_show_config_lists_fields_with_values_and_meanings():
    result = subprocess.run([sys.executable, "main.py", "--config", "configs/tiny.py", "--show_config",
                             "--config.batch_size=32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "32" in lines["batch_size"] and "global batch per optimizer step" in lines["batch_size"]
    assert "'synthetic'" in lines["input.dataset"] and "a tfds name" in lines["input.dataset"]
    assert "model.mask_ratio" in lines and "dataset" not in lines  # renamed old names are not listed


@pytest.mark.slow
def test_an_unusable_workdir_is_one_line_before_anything_starts(tmp_path):
    """A --workdir that cannot be created (under a file) or written (a read-only mount, where mounting is
    allowed): one line naming --workdir, the path and why, within seconds, before the input or any compilation."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(blocker / "w", "Not a directory (ENOTDIR)")]
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(readonly)],
                      capture_output=True).returncode == 0:
        cases.append((readonly / "w", "Read-only file system (EROFS)"))
    try:
        for workdir, reason in cases:
            start = time.perf_counter()
            result = run_main(workdir)
            seconds = time.perf_counter() - start
            assert result.returncode == 1
            assert result.stderr.strip().splitlines() == [
                f"main.py: error: --workdir {workdir}: {reason}: use a directory you can create and write"], \
                result.stderr[-2000:]
            assert "Opening the input" not in result.stdout and "Compiling" not in result.stdout
            print(f"{reason}: {seconds:.1f} s")
    finally:
        subprocess.run(["umount", str(readonly)], capture_output=True)
