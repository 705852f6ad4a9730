"""Tests of pretraining: main.py end to end, parity of one optimizer step with PyTorch, sharding,
multi-process, resume after SIGKILL and SIGTERM, gradient accumulation, config errors."""

import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference
from configs import tiny
from mae_jax import models, parallel, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, *overrides, devices=1, env=None, wait=True):
    """Runs `python main.py --config configs/tiny.py` in a fresh process with `devices` CPU devices."""
    env = dict(os.environ, **(env or {}))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", str(workdir), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}


# --------------------------------------------------------------------------------------------------------
# End to end.
# --------------------------------------------------------------------------------------------------------


def test_tiny_config_trains_end_to_end(tmp_path):
    start = time.perf_counter()
    result = run_main(tmp_path)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"configs/tiny.py: {seconds:.1f} s wall")
    metrics = read_metrics(tmp_path)
    config = tiny.get_config()
    total = config.num_epochs * config.synthetic_num_examples // config.batch_size
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
    # Progress on stdout: step / total, loss, images/s, ETA.
    assert f"step {total}/{total} | loss" in result.stdout and "img/s | ETA" in result.stdout


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


def _hf_and_state(fields, config, steps_per_epoch, total_steps):
    hf = torch_reference.random_hf_model(fields, seed=3)
    variables = torch_reference.hf_to_flax(hf)
    schedule = train.learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = train.make_optimizer(config, schedule)
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=variables["frozen"],
                             opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(config.seed)),
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
        rng = jax.random.fold_in(jax.random.key(config.seed), step)
        return np.asarray(models.per_example_uniform(rng, 4, model.num_patches))

    # Gradients of the loss.
    loss, grads = jax.value_and_grad(train.loss_fn)(state.params, state.frozen, model, images, noise_at(0))
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
    step_fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                        grad_accum_steps=1, num_batch_shards=1))
    for step in range(3):
        state, metrics = step_fn(state, images)
        lr = official_lr(step, steps_per_epoch, 1e-3, 1e-4, 1, total_steps / steps_per_epoch)
        np.testing.assert_allclose(float(metrics["lr"]), lr, rtol=1e-6)
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


def test_nonfinite_step_leaves_state_unchanged():
    """A NaN batch: params and optimizer state stay bit-identical, the step is recorded; later steps too."""
    config = tiny.get_config()
    config.batch_size = 4
    fields = dict(config.model)
    _, state, tx, schedule = _hf_and_state(fields, config, 2, 10)
    model = models.MaskedAutoencoderViT(**fields)
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

FIVE_STEPS = ("--config.total_steps=5", "--config.log_every_steps=1", "--config.checkpoint_every_steps=0")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_losses_do_not_depend_on_devices_mesh_or_processes(tmp_path):
    runs = {
        "1 device": run_main(tmp_path / "a", *FIVE_STEPS, devices=1),
        "8 devices": run_main(tmp_path / "b", *FIVE_STEPS, devices=8),
        "2 x 4 data x fsdp": run_main(tmp_path / "c", *FIVE_STEPS, "--config.mesh.data=2", "--config.mesh.fsdp=4",
                                      devices=8),
    }
    port = _free_port()
    procs = [run_main(tmp_path / "d", *FIVE_STEPS, devices=4, wait=False, env={
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
        for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "over 2 process(es)" in outputs[0][0]
    for name, result in runs.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    reference = losses(tmp_path / "a")
    assert sorted(reference) == [1, 2, 3, 4, 5]
    print("losses on 1 device:", [reference[s] for s in sorted(reference)])
    for name, workdir in [("8 devices", "b"), ("2 x 4 data x fsdp", "c"), ("2 processes x 4 devices", "d")]:
        other = losses(tmp_path / workdir)
        assert sorted(other) == sorted(reference), name
        diff = max(abs(other[s] - reference[s]) for s in reference)
        print(f"{name}: max |loss - 1-device loss| = {diff:.2e}")
        assert diff < 1e-5, name


def test_fsdp_shards_large_kernels():
    assert jax.device_count() == 8
    mesh = parallel.create_mesh(2, 4)
    model = models.MaskedAutoencoderViT(**models.variant("test/8", image_size=32))
    config = tiny.get_config()
    tx = train.make_optimizer(config, train.learning_rate_schedule(config, 10, 60))
    state, _ = train.create_train_state(model, tx, 0, mesh)
    kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]  # [32, 128]
    mu = state.opt_state[0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]
    for array in (kernel, mu):
        assert len(array.addressable_shards) == 8
        assert {s.data.shape for s in array.addressable_shards} == {(8, 128)}  # a quarter of the input dim
        # The four fsdp devices of one data row hold the four different slices.
        rows = {s.index[0].start for s in array.addressable_shards}
        assert rows == {0, 8, 16, 24}
    # Small arrays (biases, LayerNorm, tokens) stay replicated.
    bias = state.params["blocks_0"]["mlp"]["fc1"]["bias"]
    assert {s.data.shape for s in bias.addressable_shards} == {(128,)}
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(kernel))  # the global view is intact


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


def test_train_step_traced_once(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "train_step", chex.assert_max_traces(train.train_step, n=1))
    config = tiny.get_config()
    config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 12, 3, 6
    last = train.train_and_evaluate(config, tmp_path)
    assert [m["step"] for m in read_metrics(tmp_path)] == [3, 6, 9, 12] and math.isfinite(last["loss"])


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    config = tiny.get_config()
    config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 40, 5, 1
    config.warmup_epochs, config.base_lr = 0, 1e4  # the first update is already fatal
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 2: stopping; the last good "
                                                 r"checkpoint \(step 1\) is intact"):
        train.train_and_evaluate(config, tmp_path)
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps == [1]
    from mae_jax import checkpoints
    _, variables = checkpoints.load_variables(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))


# --------------------------------------------------------------------------------------------------------
# Resume.
# --------------------------------------------------------------------------------------------------------

LONG = ("--config.total_steps=400", "--config.log_every_steps=1", "--config.checkpoint_every_steps=50")


def _wait_for_checkpoint(proc, workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step))
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.01)


def test_resume_after_sigkill_continues_exactly(tmp_path):
    straight = run_main(tmp_path / "straight", *LONG)
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = run_main(tmp_path / "killed", *LONG, wait=False)
    _wait_for_checkpoint(proc, tmp_path / "killed", 50)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = losses(tmp_path / "killed")
    assert max(before) < 400, "the run finished before it was killed"
    resumed = run_main(tmp_path / "killed", *LONG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from step" in resumed.stdout
    expected, got = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 401))
    assert got == expected  # bit for bit, every step


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = run_main(tmp_path, *LONG, wait=False)
    _wait_for_checkpoint(proc, tmp_path, 50)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Preempted: saved step" in stdout + stderr
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    last_logged = max(losses(tmp_path))
    assert steps[-1] == last_logged < 400  # the checkpoint is the step it stopped at


# --------------------------------------------------------------------------------------------------------
# Config errors.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("--config.batch_sizee=8", "--config.batch_sizee=8: the config has no field 'batch_sizee'. Did you mean "
                               "\"batch_size\""),
    ("--config.mesh.model=2", "--config.mesh.model=2: the config has no field 'model'"),
    ("--config.total_steps=-1", "total_steps -1 must be >= 0"),
    ("--config.batch_size=12", "batch_size 12 is not divisible by the 8 devices of the data=8 x fsdp=1 mesh"),
    ("--config.mesh.data=3", "mesh data=3 x fsdp=1 does not divide the 8 devices"),
    ("--config.model.mask_ratio=1.0", "model: mask_ratio 1.0 must be in [0, 1)"),
])
def test_bad_settings_fail_at_once_with_one_line(tmp_path, override, message):
    result = run_main(tmp_path, override, devices=8)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Compiled the train step" not in result.stdout
    assert not (tmp_path / "checkpoints").exists()


def test_validate_config_accepts_paper_recipes():
    from configs import vit_base, vit_huge, vit_large
    for module in (vit_base, vit_large, vit_huge):
        config = module.get_config()
        assert config.batch_size == 4096 and config.num_epochs == 800 and config.warmup_epochs == 40
        assert config.base_lr == 1.5e-4 and config.weight_decay == 0.05 and config.dataset == "imagenet2012"
        assert config.model.norm_pix_loss and config.model.mask_ratio == 0.75
        assert train.validate_config(config, 8, 1) == (8, 1)
    assert train.validate_config(vit_base.get_config(), 256, 32) == (256, 1)


# --------------------------------------------------------------------------------------------------------
# Starting from converted weights.
# --------------------------------------------------------------------------------------------------------


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
    assert "Initialised params from" in result.stdout
    _, trained = checkpoints.load_variables(tmp_path / "run" / "checkpoints" / "1")
    expected = torch_reference.hf_to_flax(hf)
    chex.assert_trees_all_equal(trained, expected)
    # The first loss is the loss of the loaded weights.
    model = models.MaskedAutoencoderViT(**config.model)
    from mae_jax import input_pipeline
    images = next(input_pipeline.create_train_iterator(config, global_batch_size=config.batch_size,
                                                       process_index=0, process_count=1))["images"]
    noise = models.per_example_uniform(jax.random.fold_in(jax.random.key(config.seed), 0), config.batch_size,
                                       model.num_patches)
    loss = model.apply(expected, images, noise=noise).loss
    np.testing.assert_allclose(losses(tmp_path / "run")[1], float(loss), rtol=1e-5)
