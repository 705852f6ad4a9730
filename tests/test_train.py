"""Tests of pretraining: main.py end to end, the schedule, the non-finite guard, the weight-decay mask, gradient
accumulation, tracing once, config errors. PyTorch parity: test_train_parity.py; devices: test_parallel.py;
interruptions: test_checkpoints.py."""

import functools
import json
import math
import os
import re
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mae_jax import config_lib, models, parallel, train, trainer
from runs import ROOT, read_metrics, run_main


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
        assert {"step", "loss", "lr", "grad_norm", "images_per_sec"} <= set(m)
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


# --------------------------------------------------------------------------------------------------------
# Numerics: one step against PyTorch, the schedule against the official formula.
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
    schedule = train.learning_rate_schedule(config, steps_per_epoch, epochs * steps_per_epoch)
    lr = 1.5e-4 * 4096 / 256
    for step in [0, 1, 100, 12479, 12480, 12481, 50000, 200000, 249599]:
        expected = official_lr(step, steps_per_epoch, lr, 1e-6, 40, epochs)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=2e-6, atol=1e-12, err_msg=str(step))


@pytest.mark.slow
def test_nonfinite_step_leaves_state_unchanged():
    """A NaN batch: params and optimizer state stay bit-identical, the step is recorded; later steps too."""
    config = tiny.get_config()
    config.batch_size = 4
    fields = dict(config.model)
    model = models.MaskedAutoencoderViT(**fields)
    schedule = train.learning_rate_schedule(config, 2, 10)
    tx = train.make_optimizer(config, schedule)
    state = trainer.init_state(functools.partial(models.init_variables, model), tx, config.seed)
    step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                        grad_accum_steps=1, num_batch_shards=1))
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    state, _ = step_fn(state, images)  # one good step, so that the optimizer state is not all zeros
    before = jax.device_get((state.params, state.opt_state))
    bad = images.copy()
    bad[1, 3, 5, 0] = np.nan
    state, metrics = step_fn(state, bad)
    assert not np.isfinite(float(metrics["loss"])) and int(state.nonfinite_step) == 2 and int(state.step) == 2
    chex.assert_trees_all_equal(jax.device_get((state.params, state.opt_state)), before)
    state, metrics = step_fn(state, images)  # a good batch after a bad one is not applied either
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


# --------------------------------------------------------------------------------------------------------
# Devices, meshes, processes.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grad_accumulation_matches_full_batch():
    mesh = parallel.create_mesh(8, 1)
    config = tiny.get_config()
    config.batch_size = 32
    model = models.MaskedAutoencoderViT(**config.model)
    schedule = train.learning_rate_schedule(config, 10, 60)
    tx = train.make_optimizer(config, schedule)
    state, shardings = train.create_train_state(model, tx, 0, mesh)
    images = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype(np.float32)
    images = jax.device_put(images, parallel.batch_sharding(mesh))
    results = {}
    for accum in (1, 4):
        step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                         grad_accum_steps=accum, num_batch_shards=8))
        s = state
        for _ in range(2):  # step 0 has lr 0; step 1 moves the parameters
            s, metrics = step(s, images)
        results[accum] = (s, metrics)
    (full, m_full), (accum, m_accum) = results[1], results[4]
    np.testing.assert_allclose(m_full["loss"], m_accum["loss"], atol=1e-5)
    np.testing.assert_allclose(m_full["grad_norm"], m_accum["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(full.params, accum.params, atol=1e-5, rtol=0)
    assert float(jnp.abs(full.params["patch_embed"]["kernel"] - state.params["patch_embed"]["kernel"]).max()) > 1e-5


@pytest.mark.slow
def test_train_step_traced_once_and_profiled(tmp_path, monkeypatch):
    """One trace of the step over a whole run; `profile_steps` writes a profiler trace TensorBoard reads."""
    monkeypatch.setattr(train, "train_step", chex.assert_max_traces(train.train_step, n=1))
    config = tiny.get_config()
    config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 12, 3, 6
    config.visualize_every_steps = 0  # reconstructions are tested in tests/test_visualize.py
    config.profile_steps, config.profile_first_step = 2, 4
    last = train.train_and_evaluate(config, tmp_path)
    assert [m["step"] for m in read_metrics(tmp_path)] == [3, 6, 9, 12] and math.isfinite(last["loss"])
    traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000, traces


@pytest.mark.slow
def test_logged_metrics_are_window_means(tmp_path):
    """The logged loss is the mean of the per-step losses since the previous log line (lr: the last step's)."""
    config = tiny.get_config()
    config.total_steps, config.checkpoint_every_steps, config.visualize_every_steps = 6, 0, 0
    config.log_every_steps = 1
    train.train_and_evaluate(config, tmp_path / "a")
    per_step = {m["step"]: m for m in read_metrics(tmp_path / "a")}
    config.log_every_steps = 3
    train.train_and_evaluate(config, tmp_path / "b")
    windows = read_metrics(tmp_path / "b")
    assert [m["step"] for m in windows] == [3, 6]
    for m in windows:
        steps = range(m["step"] - 2, m["step"] + 1)
        np.testing.assert_allclose(m["loss"], np.mean([per_step[s]["loss"] for s in steps]), rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], np.mean([per_step[s]["grad_norm"] for s in steps]), rtol=1e-6)
        assert m["lr"] == per_step[m["step"]]["lr"]
    assert windows[0]["loss"] != per_step[3]["loss"]  # a mean, not the last step's value


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
# Resume.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.batch_sizee=8", "--config.batch_sizee=8: the config has no field 'batch_sizee'. Did you mean "
                               "\"batch_size\""),
    ("--config.mesh.model=2", "--config.mesh.model=2: the config has no field 'model'"),
    ("--config.total_steps=-1", "total_steps -1 must be >= 0"),
    ("--config.batch_size=12", "batch_size 12 is not divisible by the 8 devices of the data=8 x fsdp=1 mesh"),
    ("--config.mesh.data=3", "mesh data=3 x fsdp=1 does not divide the 8 devices"),
    ("--config.model.mask_ratio=1.0", "model: mask_ratio 1.0 must be in [0, 1)"),
    ("--config.batch_size=800", "batch_size 800 exceeds the 160 training examples"),
    ("--config.input.dataset=folder", 'dataset="folder" needs config.input.image_folder'),
    ("--config.init_from=/nonexistent/weights.pth", "/nonexistent/weights.pth does not exist"),
])
def test_bad_settings_fail_at_once_with_one_line(tmp_path, override, message):
    result = run_main(tmp_path, override, devices=8)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, result.stderr[-2000:]
    assert "Compiling the train step" not in result.stdout
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # no checkpoint written


def test_validate_config_accepts_paper_recipes():
    from configs import vit_base, vit_huge, vit_large
    for module in (vit_base, vit_large, vit_huge):
        config = module.get_config()
        assert config.batch_size == 4096 and config.num_epochs == 800 and config.warmup_epochs == 40
        assert config.base_lr == 1.5e-4 and config.weight_decay == 0.05 and config.input.dataset == "imagenet2012"
        assert config.model.norm_pix_loss and config.model.mask_ratio == 0.75
        assert train.validate_config(config, 8, 1) == (8, 1)
    assert train.validate_config(vit_base.get_config(), 256, 32) == (256, 1)


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


def test_train_step_on_the_generic_path_has_no_cpu_only_ops():
    """The lowered train step of ops="generic" (what GPUs and TPUs run under ops="auto") holds none of xla_cpu's
    exp(0 * x) barriers; the xla_cpu step does (so the check can see them)."""
    from test_models import _count_exp_of_times_zero

    config = tiny.get_config()
    mesh = parallel.create_mesh(-1, 1)
    schedule = train.learning_rate_schedule(config, 10, 60)
    tx = train.make_optimizer(config, schedule)
    counts = {}
    for ops in ("generic", "xla_cpu"):
        model = models.MaskedAutoencoderViT(**dict(config.model, ops=ops))
        shardings = train.state_shardings(train.abstract_train_state(model, tx), tx, mesh)
        text = train.lower_train_step(model, tx, schedule, mesh, shardings, batch_size=16).as_text()
        counts[ops] = _count_exp_of_times_zero(text)
    assert counts["generic"] == 0 and counts["xla_cpu"] > 0, counts
