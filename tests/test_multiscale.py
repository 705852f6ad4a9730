"""Multi-scale pretraining (`config.input.image_sizes`, issue 27 item 4): the size of each step (a pure function of
(seed, step), the same in Python and in the tf.data graph), the pipelines emitting each step's size, one compiled
train step per size, the same losses on 1 and 8 devices, an exact resume, a step at another size against the
official model built at that size (PyTorch), one-line errors."""

import math
import re
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from scipy import stats

from configs import tiny
from mae_jax import augment, config_lib, datasets, input_pipeline, loop, models, train, trainer
from runs import losses, run_main
from test_input_pipeline import _config as _folder_config, _photo, _write

SIZES = (32, 48)
SCHEDULE = (32, 48, 32, 48, 32, 32, 48, 48)  # seed 0: the sizes of steps 0-7 (logged as steps 1-8)


def test_step_sizes_are_uniform_independent_and_the_same_in_the_tf_data_graph():
    """`step_image_size`: equal in Python and in TensorFlow (any seed, 10,000 steps); uniform over the entries
    (chi-square), consecutive steps independent (chi-square of the pairs), and another seed another sequence."""
    for seed, sizes in [(0, SIZES), (1, (224, 256, 288)), (-7, (224, 256, 288)), (2**40 + 3, (16, 16, 24))]:
        steps = np.arange(10_000)
        python = np.array([input_pipeline.step_image_size(seed, s, sizes) for s in steps])
        graph = input_pipeline._step_image_size_tf(seed, tf.constant(steps, tf.int64), sizes).numpy()
        np.testing.assert_array_equal(python, graph)
        index = np.array([sorted(set(sizes)).index(s) for s in python])
        expected = np.bincount([sorted(set(sizes)).index(s) for s in sizes]) / len(sizes)  # 16 listed twice
        counts = np.bincount(index, minlength=len(expected))
        assert stats.chisquare(counts, expected * len(steps)).pvalue > 1e-3, (seed, counts)
        pairs = np.bincount(index[:-1] * len(expected) + index[1:], minlength=len(expected) ** 2)
        assert stats.chisquare(pairs, np.outer(expected, expected).ravel() * (len(steps) - 1)).pvalue > 1e-3
    assert tuple(input_pipeline.step_image_size(0, s, SIZES) for s in range(8)) == SCHEDULE
    other = [input_pipeline.step_image_size(1, s, SIZES) for s in range(64)]
    assert other != [input_pipeline.step_image_size(0, s, SIZES) for s in range(64)]


def test_synthetic_batches_are_the_steps_size_and_resume_exactly():
    config = tiny.get_config().input
    config.image_sizes = SIZES

    def iterator(state=None):
        return input_pipeline.create_train_iterator(config, image_shape=(32, 32, 3), seed=0, global_batch_size=4,
                                                    process_index=0, process_count=1, state=state)

    it = iterator()
    batches = [next(it)["images"] for _ in range(8)]
    assert [b.shape for b in batches] == [(4, s, s, 3) for s in SCHEDULE]
    # The nominal-size stream's images where the schedule says 32: the same smooth patterns.
    plain = input_pipeline.create_train_iterator(tiny.get_config().input, image_shape=(32, 32, 3), seed=0,
                                                 global_batch_size=4, process_index=0, process_count=1)
    for size, batch, nominal in zip(SCHEDULE, batches, (next(plain)["images"] for _ in range(8))):
        if size == 32:
            np.testing.assert_array_equal(batch, nominal)
    resumed = iterator({"batch_index": 3})
    for batch in batches[3:]:
        np.testing.assert_array_equal(next(resumed)["images"], batch)


def test_folder_batches_are_the_steps_size_and_resume_exactly(tmp_path):
    """A real tfds source: batch k is at the size of step k, each row exactly RandomResizedCrop straight to that
    size (the static-size transform of its own bytes and key), the examples those of the single-size stream; a
    resume from the state after 3 batches continues with the same batches, across epoch boundaries."""
    for i in range(7):
        _write(str(tmp_path / "photos" / f"{i}.jpg"), _photo(i, 40 + 9 * i, 90 - 6 * i))
    config = _folder_config(tmp_path, tmp_path / "photos", image_size=(32, 32))
    config.input.image_sizes = SIZES

    def iterator(input_config, state=None):
        return input_pipeline.create_train_iterator(input_config, image_shape=(32, 32, 3), seed=0,
                                                    global_batch_size=3, process_index=0, process_count=1,
                                                    state=state)

    it = iterator(config.input)
    plain_config = _folder_config(tmp_path, tmp_path / "photos", image_size=(32, 32))
    plain = iterator(plain_config.input)
    records = list(datasets.get_builder(config.input).as_dataset(
        split="train", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator())
    batches, states = [], []
    for size in SCHEDULE:
        images = next(it)["images"]
        next(plain)
        assert images.shape == (3, size, size, 3)
        np.testing.assert_array_equal(it.last_example_ids, plain.last_example_ids)
        for row, (epoch, example_id) in enumerate(zip(it.last_epochs, it.last_example_ids)):
            expected = augment.preprocess_for_train(
                tf.constant(records[example_id]["image"]), input_pipeline.example_key(0, epoch, example_id),
                image_size=(size, size), num_channels=3)
            np.testing.assert_array_equal(images[row], expected.numpy())
        batches.append(images)
        states.append(it.get_state())
    assert states[2] == {"examples_per_process": 9, "process_count": 1, "seed": 0, "batches": 3}
    assert "batches" not in plain.get_state()  # single-size runs store what they always stored
    resumed = iterator(config.input, states[2])
    for images in batches[3:]:
        np.testing.assert_array_equal(next(resumed)["images"], images)


def test_the_loop_runs_each_batch_on_the_step_of_its_shapes():
    """`loop.dispatch_by_batch_shapes` (what the trainer hands the loop): a batch goes to the step compiled for its
    shapes and dtypes; one of no compiled shape is an error naming them; a single step is used as it is."""
    spec = lambda size, dtype=np.uint8: {"images": jax.ShapeDtypeStruct((4, size, size, 3), dtype)}
    steps = [(spec(size), lambda state, batch, size=size: (state + [size], {})) for size in SIZES]
    step_fn = loop.dispatch_by_batch_shapes(steps)
    state = []
    for size in SCHEDULE:
        state, _ = step_fn(state, {"images": np.zeros((4, size, size, 3), np.uint8)})
    assert tuple(state) == SCHEDULE
    with pytest.raises(ValueError, match=r"a batch of images \[4, 40, 40, 3\] uint8 matches none of the compiled "
                                         r"steps \(images \[4, 32, 32, 3\] uint8; images \[4, 48, 48, 3\] uint8\)"):
        step_fn(state, {"images": np.zeros((4, 40, 40, 3), np.uint8)})
    with pytest.raises(ValueError, match="matches none"):  # the dtype counts too
        step_fn(state, {"images": np.zeros((4, 32, 32, 3), np.float32)})
    assert loop.dispatch_by_batch_shapes(steps[:1]) is steps[0][1]


# --------------------------------------------------------------------------------------------------------
# Runs: configs/tiny.py over (32, 48) (60 steps) on 1 device (exactly the README command's run: its programs then
# come from the compilation cache in test_readme_command_...), on 8 devices, and the 8-device run resumed from its
# checkpoint at step 20.
# --------------------------------------------------------------------------------------------------------

STEPS = 60  # configs/tiny.py: 6 epochs of 10 steps; checkpoints every 20, the last 3 kept


def _run(workdir, devices, **fields):
    """What `main.py --config configs/tiny.py --config.input.image_sizes=32,48` runs, on `devices` (a subset of this
    process's 8), logging every step."""
    config = tiny.get_config()
    config.input.image_sizes = SIZES
    config.log_every_steps = 1
    config.update(fields)
    config_lib.resolve(config)
    train.Pretraining.validate(config, len(devices), 1)
    train.Pretraining(config, platform="cpu").run(config, workdir, devices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (workdir, train step traces (their image shapes), train step programs lowered, the image size of
    every batch the loop ran)} of the runs on 1 device, on 8 devices (no reconstructions), and of the 8-device run
    resumed from its checkpoint at step 20 (those at 40 and 60 removed)."""
    root = tmp_path_factory.mktemp("multiscale")
    traces, lowered, dispatched = [], [], []
    step, lower, dispatch = train.train_step, trainer.Program.lower, loop.dispatch_by_batch_shapes

    def counting_step(state, batch, **kwargs):
        traces.append(batch["images"].shape[1:3])
        return step(state, batch, **kwargs)

    def counting_lower(program):
        if program.description.startswith("the train step"):
            lowered.append(program.description)
        return lower(program)

    def recording_dispatch(steps):
        step_fn = dispatch(steps)

        def recorded(state, batch):
            dispatched.append(batch["images"].shape[1])
            return step_fn(state, batch)

        return recorded

    train.train_step, trainer.Program.lower, loop.dispatch_by_batch_shapes = \
        counting_step, counting_lower, recording_dispatch
    found = {}
    try:
        for name, devices, fields in [("1 device", jax.devices()[:1], {}),
                                      ("8 devices", jax.devices(), {"visualize_every_steps": 0})]:
            traces.clear(), lowered.clear(), dispatched.clear()
            _run(root / name, devices, **fields)
            found[name] = (root / name, list(traces), list(lowered), list(dispatched))
        shutil.copytree(root / "8 devices", root / "resumed")
        for later in ("40", "60"):
            shutil.rmtree(root / "resumed" / "checkpoints" / later)
        traces.clear(), lowered.clear(), dispatched.clear()
        _run(root / "resumed", jax.devices(), visualize_every_steps=0)
        found["resumed"] = (root / "resumed", list(traces), list(lowered), list(dispatched))
    finally:
        train.train_step, trainer.Program.lower, loop.dispatch_by_batch_shapes = step, lower, dispatch
    return found


def _schedule(first, last):
    """The sizes of logged steps first..last (step s takes batch s - 1)."""
    return [input_pipeline.step_image_size(0, s - 1, SIZES) for s in range(first, last + 1)]


@pytest.mark.slow
def test_one_compiled_step_per_size_and_each_step_at_its_size(runs):
    """Every run traces and compiles the train step once per size, up front, however many steps run; the loop ran
    every step on the program of the size `step_image_size` gives it (the resumed run: from step 21 on)."""
    for name, (_, traces, lowered, dispatched) in runs.items():
        assert sorted(traces) == [(32, 32), (48, 48)], name
        assert sorted(lowered) == ["the train step at 32 x 32", "the train step at 48 x 48"], name
        assert dispatched == _schedule(21 if name == "resumed" else 1, STEPS), name
    assert tuple(_schedule(1, 8)) == SCHEDULE


@pytest.mark.slow
def test_losses_on_one_and_eight_devices_are_identical(runs):
    one, eight = losses(runs["1 device"][0]), losses(runs["8 devices"][0])
    assert sorted(one) == sorted(eight) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in one.values()) and one[STEPS] < 0.9 * one[1]  # it trains
    diff = max(abs(eight[s] - one[s]) for s in one)
    print(f"max |loss on 8 devices - loss on 1 device| over {STEPS} steps at 32 and 48 px: {diff:.1e}")
    assert diff <= 1e-6


@pytest.mark.slow
def test_resume_mid_run_continues_exactly(runs):
    straight, resumed = losses(runs["8 devices"][0]), losses(runs["resumed"][0])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in range(21, STEPS + 1):
        assert resumed[s] == straight[s], (s, resumed[s], straight[s])


@pytest.mark.slow
def test_checkpoints_hold_the_nominal_model_for_visualize_and_the_converters(runs):
    """A multi-scale run's checkpoint is the model at its nominal `image_size` (32), with that grid's tables:
    `visualize` reconstructs 32 px images from it and the official export carries the 4 x 4 grid's table."""
    from mae_jax import convert, visualize

    model, variables = visualize.load_model(str(runs["1 device"][0]))
    assert model.image_size in (32, (32, 32)) and model.num_patches == 16
    np.testing.assert_array_equal(variables["constants"]["pos_embed"][0],
                                  models.get_2d_sincos_pos_embed(32, (4, 4), cls_token=True))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    panels, patch_losses, _ = visualize.reconstructions(model, variables, images)
    assert panels.shape[0] == 2 and np.all(np.isfinite(patch_losses))
    state_dict = convert.to_torch(variables, model, format="official")
    assert state_dict["pos_embed"].shape == (1, 17, 32) and state_dict["decoder_pos_embed"].shape == (1, 17, 16)


# --------------------------------------------------------------------------------------------------------
# A step at another size is the official model built at that size, with the same parameters.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_step_at_another_size_matches_the_official_model_at_that_size():
    """Parameters of a 32 px model, a batch at 48 px: our loss and gradients (`train.at_image_size`, what the
    train step calls) equal the official `models_mae.py` transcription built for 48 px images with the same
    weights (its own sin-cos tables of the 6 x 6 grid), to 1e-5."""
    torch = pytest.importorskip("torch", reason="compares against PyTorch (pip install torch)")
    pytest.importorskip("transformers", reason="torch_reference imports transformers")
    import official_mae

    fields = models.variant("test/8", image_size=32, norm_pix_loss=True)
    model = models.MaskedAutoencoderViT(**fields)
    nominal = official_mae.official_mae(fields, seed=1)
    variables = official_mae.to_flax(nominal.state_dict(), model.depth, model.decoder_depth)
    model48, constants = train.at_image_size(model, variables["constants"], (48, 48))
    assert model48.num_patches == 36 and constants["pos_embed"].shape == (1, 37, 32)

    reference = official_mae.official_mae(dict(fields, image_size=48), seed=2)
    weights = {k: v for k, v in nominal.state_dict().items() if "pos_embed" not in k}
    reference.load_state_dict(weights, strict=False)  # the 32 px model's weights; its own 6 x 6 tables
    images = np.random.default_rng(0).normal(size=(3, 48, 48, 3)).astype(np.float32)
    noise = np.array(models.masking_noise(jax.random.key(0), 3, model48))
    loss, grads = jax.jit(jax.value_and_grad(train.loss_fn), static_argnums=2)(
        variables["params"], constants, model48, images, noise)
    ref_loss = reference(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(noise), 0.75)[0]
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), float(ref_loss.detach()), rtol=1e-6, atol=1e-6)
    ref_grads = official_mae.to_flax(official_mae.grads(reference), model.depth, model.decoder_depth)["params"]
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref_grads)
    for (path, ours), theirs in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                    jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))
    assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 1e-3
    # The 48 px tables are the official ones of the 6 x 6 grid, not the 4 x 4 grid's interpolated.
    np.testing.assert_array_equal(constants["pos_embed"][0], reference.pos_embed[0].numpy())


@pytest.mark.slow
def test_plan_compiles_and_reports_every_sizes_step():
    """`mae_jax.plan` compiles each size's train step for a TPU slice (libtpu, no TPU) and reports each: the
    largest as "train_step" (the memory check sees the worst case), more FLOPs per step at the larger size."""
    pytest.importorskip("libtpu", reason="libtpu compiles for TPUs (pip install -e '.[tpu]')")
    from mae_jax import plan

    plan.configure()
    config = tiny.get_config()
    config.input.image_sizes, config.visualize_every_steps, config.batch_size = SIZES, 0, 32
    result = plan.plan(config, plan.topology("v5e:2x2"), suggest=0)
    assert sorted(result.programs) == ["train_step", "train_step_32"]
    big, small = result.programs["train_step"], result.programs["train_step_32"]
    assert (big.name, small.name) == ("the train step at 48 x 48", "the train step at 32 x 32")
    assert big.fits and small.fits and 0 < small.total_bytes <= big.total_bytes
    assert big.flops > 1.5 * small.flops > 0 and big.seconds > 0 and small.seconds > 0
    # The run's time per step is the mean over the sizes it draws, each by its share of the list.
    shares = {size: SIZES.count(size) / len(SIZES) for size in set(SIZES)}
    assert result.train_step_shares == {"train_step": shares[48], "train_step_32": shares[32]}
    assert result.step_seconds == pytest.approx(shares[48] * big.seconds + shares[32] * small.seconds)
    text = plan.format_plan(result)
    assert "train_step_32" in text and "train_step" in text


# --------------------------------------------------------------------------------------------------------
# Settings.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"input.image_sizes": (32, 44)}, "input.image_sizes (32, 44): 44 is not divisible by model.patch_size 8"),
    ({"input.image_sizes": (32, 0)}, "input.image_sizes (32, 0): 0 is not a positive int"),
    ({"input.image_sizes": (32, 40), "model.mask_sampling": "grid"},
     "input.image_sizes (32, 40): at 40 x 40, model: mask_sampling 'grid' with mask_ratio 0.75 needs a patch grid "
     "divisible into 2 x 2 cells; the grid is (5, 5)"),
    ({"input.image_sizes": (32, 48), "task": "finetune"},
     "input.image_sizes (32, 48): multi-scale training is implemented for pretraining only; task 'finetune'"),
])
def test_bad_image_sizes_are_one_line_before_anything_is_written(tmp_path, fields, message):
    config = tiny.get_config()
    config.update_from_flattened_dict(fields)
    with pytest.raises(ValueError) as error:
        trainer.train_and_evaluate(config, tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not list(tmp_path.iterdir())  # no config.json, no checkpoints


@pytest.mark.slow
def test_readme_command_logs_each_sizes_compilation(tmp_path):
    """The README's command (configs/tiny.py over 32 and 48 px, the sizes given on the command line): each size's
    train step has its own start-up line, both before the first step, and the run ends normally."""
    result = run_main(tmp_path, "--config.input.image_sizes=32,48")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    compiling = [i for i, line in enumerate(lines) if "s] Compiling the train step" in line]
    assert [re.search(r"Compiling the train step[^(]*", lines[i]).group() for i in compiling] == [
        "Compiling the train step at 48 x 48 ", "Compiling the train step at 32 x 32 "]
    first_step = next(i for i, line in enumerate(lines) if "Training from step 0" in line)
    assert max(compiling) < first_step and "Done: step 60/60" in result.stdout
