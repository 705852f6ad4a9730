"""Fine-tuning end to end (configs/finetune_tiny.py: mixup, cutmix, label smoothing and drop path on): resume,
devices, evaluation, init_from, eval_only, the non-finite guard, config checks."""

import re
import shutil

import jax
import numpy as np
import pytest

from configs import finetune_tiny, tiny
from mae_jax import checkpoints, convert, finetune, models, train_state, trainer
from runs import read_metrics, run_main, tiny_setup

FINETUNE = "configs/finetune_tiny.py"
TWELVE_STEPS = ("--config.total_steps=12", "--config.log_every_steps=1", "--config.checkpoint_every_steps=6",
                "--config.keep_checkpoints=5")


def _records(workdir):
    train = {r["step"]: r for r in read_metrics(workdir) if "loss" in r}
    evals = {r["step"]: r for r in read_metrics(workdir) if "eval_top1" in r}
    return train, evals


def _assert_close(a, b, keys, atol):
    assert sorted(a) == sorted(b)
    for step in a:
        for key in keys:
            assert abs(a[step][key] - b[step][key]) <= atol, (step, key, a[step][key], b[step][key])


@pytest.mark.slow
@pytest.mark.long
def test_resume_devices_and_evaluation(tmp_path):
    """One uninterrupted 12-step run on 1 device; the same on 8 devices; a copy of the first resumed from its
    step-6 checkpoint. Training and eval metrics agree (exactly on resume, 3e-6 over devices), and the
    evaluation (every epoch of 8 steps and at the end: 100 examples in batches of 32) counts every example once."""
    procs = {name: run_main(tmp_path / name, *TWELVE_STEPS, devices=devices, wait=False, config=FINETUNE)
             for name, devices in (("one", 1), ("eight", 8))}
    outputs = {name: p.communicate(timeout=300) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, outputs[name][1][-3000:])
    one_train, one_eval = _records(tmp_path / "one")
    assert sorted(one_train) == list(range(1, 13)) and sorted(one_eval) == [8, 12]
    for r in one_eval.values():  # means over exactly 100 examples
        assert abs(r["eval_top1"] * 100 - round(r["eval_top1"] * 100)) < 1e-9
    assert one_eval[12]["eval_best_top1"] == max(one_eval[8]["eval_top1"], one_eval[12]["eval_top1"])
    stdout = outputs["one"][0]
    assert "eval (validation, 100 examples): top-1" in stdout and "next: python -m mae_jax.convert" in stdout

    eight_train, eight_eval = _records(tmp_path / "eight")
    # float32 sums over 8 devices in another order: a few ulps of the loss (2.3) after 5 updates.
    _assert_close(one_train, eight_train, ["loss", "grad_norm"], 3e-6)
    _assert_close(one_eval, eight_eval, ["eval_loss", "eval_top1", "eval_top5"], 3e-6)

    shutil.copytree(tmp_path / "one", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "12")  # as if stopped after the step-6 save
    result = run_main(tmp_path / "resumed", *TWELVE_STEPS, config=FINETUNE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring step 6" in result.stdout
    resumed_train, resumed_eval = _records(tmp_path / "resumed")
    _assert_close(one_train, resumed_train, ["loss", "grad_norm", "lr", "param_norm"], 0.0)
    _assert_close(one_eval, resumed_eval, ["eval_loss", "eval_top1", "eval_top5", "eval_best_top1"], 0.0)


@pytest.mark.slow
@pytest.mark.long
def test_init_from_pretraining_then_eval_only(tmp_path):
    """README's commands, shortened: pretrain configs/tiny.py, fine-tune configs/finetune_tiny.py from that
    workdir (encoder loaded, decoder and norm dropped, head and fc_norm new), eval_only on the fine-tuned
    workdir (no train step compiled), then `python -m mae_jax.convert WORKDIR classifier.pth --to official`."""
    pretrained, ft = tmp_path / "mae_tiny", tmp_path / "mae_tiny_ft"
    config = tiny.get_config()  # in-process: main.py's configs/tiny.py run, 3 steps
    config.total_steps, config.visualize_every_steps = 3, 0
    trainer.train_and_evaluate(config, pretrained)
    result = run_main(ft, "--config.total_steps=4", f"--config.init_from={pretrained}", config="configs/finetune_tiny.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initialised the ViTClassifier from" in result.stdout
    assert "not loading" in result.stdout + result.stderr  # the decoder and norm, named in the log
    assert "New keys of the classifier" in result.stdout + result.stderr  # head and fc_norm
    _, mae = checkpoints.load_variables(pretrained)
    _, fine_tuned = checkpoints.load_variables(ft)
    # Four steps at warmup lr moved the encoder only a little: it starts from the pretrained weights.
    ours = fine_tuned["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
    theirs = mae["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert np.abs(ours - theirs).max() < 1e-2 < np.abs(theirs).max()
    evals = [r for r in read_metrics(ft) if "eval_top1" in r]

    history = sorted((ft / "config_history").iterdir())
    result = run_main(ft, "--config.eval_only=True", config="configs/finetune_tiny.py")  # as README writes it
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compiling the train step" not in result.stdout
    assert f"Evaluation of step 4 of {ft} on synthetic validation (100 examples): top-1 " \
           f"{evals[-1]['eval_top1']:.4f}" in result.stdout
    # An evaluation is not a resume: no settings compared or recorded, no training steps.
    output = result.stdout + result.stderr
    assert "changed on resume" not in output and not re.search(r"step \d+/1\b", output), output[-2000:]
    assert sorted((ft / "config_history").iterdir()) == history

    # `python -m mae_jax.convert WORKDIR classifier.pth --to official`, in-process
    convert.main(convert._parse_flags(["convert", str(ft), str(tmp_path / "classifier.pth"), "--to", "official"]))
    torch = pytest.importorskip("torch", reason="the export is checked by loading it into PyTorch")
    import torch_reference

    fields = {**finetune_tiny.get_config().model, "image_size": 32}
    reference = torch_reference.official_vit(fields, num_classes=10, global_pool=True)
    reference.load_state_dict(torch.load(tmp_path / "classifier.pth")["model"], strict=True)
    np.testing.assert_array_equal(reference.state_dict()["head.weight"].numpy(),
                                  fine_tuned["params"]["head"]["kernel"].T)


def _config(overrides=None, **kwargs):
    overrides = {**(overrides or {}), **kwargs}
    config = finetune_tiny.get_config()
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


@pytest.mark.parametrize("overrides, message", [
    (dict(task="probe"), "task 'probe' must be one of ('finetune', 'linprobe')"),
    (dict(layer_decay=0.0), "layer_decay 0.0 must be in (0, 1]"),
    (dict(mixup=-1.0), "mixup -1.0 and cutmix 1.0 must be >= 0"),
    (dict(batch_size=15, mesh={"data": 1, "fsdp": 1}), "batch_size 15 must be even with mixup / cutmix"),
    (dict(eval_batch_size=0), "eval_batch_size 0 must be a positive multiple"),
    (dict(trainable_blocks=3), "trainable_blocks 3 must be in [-1, depth 2]"),
    (dict(grad_accum_steps=2), "grad_accum_steps 2: fine-tuning and the linear probe take one batch per step"),
    ({"input.labels": False}, "input.labels False"),
    ({"model.drop_path_rate": 1.0}, "model: drop_path_rate 1.0 must be in [0, 1)"),
    (dict(task="linprobe", **{"model.frozen_encoder": False}),
     "set model.frozen_encoder=True and model.head_batch_norm=True"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(trainer.ConfigError) as error:
        finetune.validate_config(_config(overrides), 1, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_nonfinite_step_changes_nothing_and_is_recorded():
    """The guard the loop reads (trainer.apply_gradients, shared with pretraining, whose end-to-end stop is
    tested through main.py): a NaN batch leaves the params and the optimizer state as they
    were and records the step; later finite steps change nothing either."""
    config = finetune_tiny.get_config()
    setup = tiny_setup(config, devices=1)
    state = setup.init_state()
    step = jax.jit(setup.programs["train_step"].fn)
    images = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    labels = np.arange(16, dtype=np.int32) % 10
    state, _ = step(state, {"images": images, "labels": labels})
    before = jax.device_get(state)
    images[3, 5, 5, 0] = np.nan
    state, metrics = step(state, {"images": images, "labels": labels})
    assert not np.isfinite(float(metrics["loss"])) and int(state.nonfinite_step) == 2
    images[3, 5, 5, 0] = 0.0
    state, metrics = step(state, {"images": images, "labels": labels})
    assert np.isfinite(float(metrics["loss"])) and int(state.nonfinite_step) == 2 and int(state.step) == 3
    for a, b in zip(jax.tree_util.tree_leaves((before.params, before.opt_state)),
                    jax.tree_util.tree_leaves(jax.device_get((state.params, state.opt_state)))):
        np.testing.assert_array_equal(a, b)


def test_partial_optimizer_state_initialises_sharded():
    """The probe's optimizer (LARS on the head, optimizers.train_only elsewhere) keeps an empty MaskedNode for every
    leaf it does not train: the state's shardings follow that structure and the state initialises on an 8-device
    mesh."""
    from mae_jax import optimizers, parallel

    model = models.ViTClassifier(**models.classifier_fields(models.variant("test/8", image_size=(16, 16)),
                                                            num_classes=10))
    tx = optimizers.train_only(optimizers.lars(1e-3), lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key == "head", params))
    init_fn = lambda key: {"params": models.init_variables(model, key)["params"]}
    abstract = train_state.abstract_state(init_fn, tx)
    shardings = train_state.state_shardings(abstract, tx, parallel.create_mesh(jax.devices(), 4, 2))
    state = jax.jit(train_state.init_state, static_argnums=(0, 1), out_shardings=shardings)(init_fn, tx, 0)
    trained = jax.tree_util.tree_leaves(state.opt_state)
    assert sum(x.size for x in trained) == sum(x.size for x in jax.tree_util.tree_leaves(state.params["head"]))
