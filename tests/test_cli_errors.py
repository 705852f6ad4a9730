"""Tests of the command lines' contract with users: `python -m mae_jax.convert` and `python -m mae_jax.visualize`
fail on bad input with one line naming the file (no traceback unless -v 1), read back everything they write
(architectures that shapes cannot tell included, bit-exact), and print none of Orbax's or jax's chatter; and
`convert.load_variables` raises one exception type, with one line, for every source it cannot use."""

import fractions
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="these commands read and write .pth files: pip install -e '.[torch]'")
pytest.importorskip("transformers", reason="the fixtures build Hugging Face models: pip install -e '.[torch]'")

import torch_reference  # noqa: E402
from mae_jax import checkpoints, convert, models  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end runs or PyTorch comparisons: not in the quick subset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo model's shape, whose head counts no variant of the table implies: only recorded fields can tell.
DEMO = models.variant("test/8", image_size=(64, 64), embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=64,
                      decoder_depth=1, decoder_num_heads=4)
CHATTER = ("orbax", "Unable to initialize backend", "Metadata file does not exist", "xla_bridge")


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT))


def _ok(module, *args):
    """Runs a command that must succeed quietly; returns its output."""
    result = _run(module, *args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for line in CHATTER:
        assert line not in output, (line, output)
    return output


def _last_line(stderr):
    return [line for line in stderr.splitlines() if line.strip()][-1]


def _assert_one_line_error(result, expected_start, path):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr, result.stderr
    last = _last_line(result.stderr)
    assert last.startswith(expected_start), last
    assert str(path) in last, last


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """Our export of the demo-shaped model with every tensor random: (directory, variables)."""
    model = models.MaskedAutoencoderViT(**DEMO)
    abstract = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0)))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.05, abstract)
    directory = tmp_path_factory.mktemp("demo") / "ours"
    checkpoints.save_variables(directory, variables, models.constructor_fields(model))
    return directory, variables


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    import skimage.data

    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(path)
    return path


# --------------------------------------------------------------------------------------------------------
# Every command reads back what any command wrote; quietly.
# --------------------------------------------------------------------------------------------------------


def test_exports_read_back_bit_exact_and_quietly(demo_export, photo, tmp_path):
    ours, variables = demo_export
    with pytest.raises(ValueError, match="cannot infer"):  # the premise: shapes alone cannot tell the heads
        convert._infer_fields(convert.to_torch(variables, models.MaskedAutoencoderViT(**DEMO)))
    pth, hf = tmp_path / "demo.pth", tmp_path / "hf"
    assert "Wrote an official MAE state dict" in _ok("mae_jax.convert", ours, pth, "--to", "official")
    assert "Wrote a Hugging Face ViTMAEForPreTraining" in _ok("mae_jax.convert", ours, hf, "--to", "hf")
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]  # no temporary files left
    # The official loaders read "model" only: exactly the official keys; the fields sit beside it.
    saved = torch.load(pth, weights_only=True)
    assert sorted(saved) == ["mae_jax_model", "model"]
    expected = convert.to_torch(variables, models.MaskedAutoencoderViT(**DEMO), format="official")
    assert saved["model"].keys() == expected.keys()
    assert saved["mae_jax_model"]["num_heads"] == 4 and saved["mae_jax_model"]["decoder_num_heads"] == 4
    for source, name in ((pth, "from_pth"), (hf, "from_hf")):
        assert "Wrote our checkpoint" in _ok("mae_jax.convert", source, tmp_path / name)
        fields, back = checkpoints.load_variables(tmp_path / name)
        assert {k: fields[k] for k in ("num_heads", "decoder_num_heads", "depth", "decoder_depth")} == \
            {"num_heads": 4, "decoder_num_heads": 4, "depth": 4, "decoder_depth": 1}
        assert models.MaskedAutoencoderViT(**fields).grid_size == (8, 8)
        _assert_trees_equal(back, variables)
    # visualize reads each of them, with the same numbers: identical figures.
    figures = []
    for source in (ours, pth, hf):
        output = tmp_path / f"{os.path.basename(source)}.png"
        assert "Wrote" in _ok("mae_jax.visualize", "--checkpoint", source, "--image", photo, "--output", output)
        figures.append(np.asarray(Image.open(output)))
        assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    np.testing.assert_array_equal(figures[0], figures[1])
    np.testing.assert_array_equal(figures[0], figures[2])


def test_visualize_variant_flag(photo, tmp_path):
    """--variant gives the architecture of an official .pth that records none (here a test/8 model)."""
    model = models.MaskedAutoencoderViT(**models.variant("test/8", image_size=32))
    hf = torch_reference.random_hf_model(models.constructor_fields(model), seed=0)
    official = torch_reference.hf_to_official(hf)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}}, tmp_path / "bare.pth")
    output = tmp_path / "figure.png"
    assert "Wrote" in _ok("mae_jax.visualize", "--checkpoint", tmp_path / "bare.pth", "--variant", "test/8",
                          "--image", photo, "--output", output)
    assert Image.open(output).size[0] == 4 * 128 + 3 * 4


# --------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file.
# --------------------------------------------------------------------------------------------------------


def _bad_sources(directory, ours):
    """name -> (path, the start of the message), written into `directory`."""
    convert.save_hf(checkpoints.load_variables(ours)[1], models.MaskedAutoencoderViT(**DEMO), directory / "hf")
    data = (directory / "hf" / "model.safetensors").read_bytes()
    (directory / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}}, directory / "whole.pth")
    data = (directory / "whole.pth").read_bytes()
    (directory / "truncated.pth").write_bytes(data[:len(data) // 2])
    (directory / "random.pth").write_bytes(np.random.default_rng(0).bytes(4000))
    (directory / "not_a_checkpoint").mkdir()
    (directory / "not_a_checkpoint" / "notes.txt").write_text("hello")
    expected = "an official MAE .pth"
    return {
        "missing": (directory / "missing.pth", f"{directory / 'missing.pth'} does not exist: expected {expected}"),
        "truncated.safetensors": (directory / "truncated.safetensors",
                                  f"{directory / 'truncated.safetensors'}: a truncated or damaged .safetensors"),
        "truncated.pth": (directory / "truncated.pth",
                          f"{directory / 'truncated.pth'}: a truncated or damaged torch.save zip archive; "
                          "expected a state dict saved by torch.save"),
        "random.pth": (directory / "random.pth",
                       f"{directory / 'random.pth'}: not a PyTorch checkpoint (neither a torch.save zip archive "
                       "nor a pickle of tensors); expected a state dict saved by torch.save"),
        "directory": (directory / "not_a_checkpoint",
                      f"{directory / 'not_a_checkpoint'} is a directory but not a checkpoint (it holds notes.txt):"
                      f" expected {expected}"),
    }


@pytest.fixture(scope="module")
def bad_sources(demo_export, tmp_path_factory):
    return _bad_sources(tmp_path_factory.mktemp("bad"), demo_export[0])


@pytest.mark.parametrize("name", ["missing", "truncated.safetensors", "truncated.pth", "random.pth", "directory"])
def test_convert_cli_bad_input_is_one_line(bad_sources, tmp_path, name):
    path, message = bad_sources[name]
    result = _run("mae_jax.convert", path, tmp_path / "out")
    _assert_one_line_error(result, f"python -m mae_jax.convert: error: {message}", path)
    assert not os.path.exists(tmp_path / "out")


def test_convert_cli_traceback_only_with_verbosity(bad_sources, tmp_path):
    path, message = bad_sources["random.pth"]
    result = _run("mae_jax.convert", "-v", "1", path, tmp_path / "out")
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr
    assert message in result.stderr


def test_convert_cli_official_output(demo_export, tmp_path):
    """Missing parent directories are created; an output that cannot be written is one line naming it."""
    _ok("mae_jax.convert", demo_export[0], tmp_path / "new" / "out.pth")
    assert os.listdir(tmp_path / "new") == ["out.pth"]
    (tmp_path / "taken.pth").mkdir()
    result = _run("mae_jax.convert", demo_export[0], tmp_path / "taken.pth")
    _assert_one_line_error(result, f"python -m mae_jax.convert: error: {tmp_path / 'taken.pth'} is a directory: "
                           "expected the name of the .pth file to write", tmp_path / "taken.pth")
    assert sorted(os.listdir(tmp_path)) == ["new", "taken.pth"] and os.listdir(tmp_path / "taken.pth") == []


def test_load_variables_raises_one_error_type(bad_sources, demo_export, tmp_path):
    model = models.MaskedAutoencoderViT(**DEMO)
    for name, (path, message) in bad_sources.items():
        with pytest.raises(convert.CheckpointError) as error:
            convert.load_variables(path, model)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), (name, str(error.value))
    # Another architecture: an official file and a Hugging Face directory of another size.
    other = models.variant("test/8", image_size=32)
    hf = torch_reference.random_hf_model(other, seed=0)
    hf.save_pretrained(tmp_path / "hf_other")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in torch_reference.hf_to_official(hf).items()}},
               tmp_path / "other.pth")
    for path in (tmp_path / "hf_other", tmp_path / "other.pth"):
        with pytest.raises(convert.CheckpointError) as error:
            convert.load_variables(path, model)
        message = str(error.value)
        assert message.startswith(f"{path} (") and "does not fit the model (embed_dim=128" in message, message
        assert "cls_token [1, 1, 32] vs [1, 1, 128]" in message and "\n" not in message
    # Python objects torch will not unpickle safely: named, without torch's advice to load unsafely.
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "extra": fractions.Fraction(1, 3)},
               tmp_path / "objects.pth")
    with pytest.raises(convert.CheckpointError) as error:
        convert.load_variables(tmp_path / "objects.pth", model)
    assert str(error.value) == (f"{tmp_path / 'objects.pth'}: it pickles Python objects (fractions.Fraction), which "
                                "are not loaded, for safety; expected a state dict saved by torch.save")
    # A tensor instead of a state dict; and a config.json of another model type.
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(convert.CheckpointError, match=r"tensor.pth holds a Tensor: expected a state dict"):
        convert.load_variables(tmp_path / "tensor.pth", model)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(convert.CheckpointError, match=r"config.json describes a 'bert' model: expected a Hugging"):
        convert.load_variables(tmp_path / "bert", model)


@pytest.mark.parametrize("kind", ["missing", "not an image", "truncated"])
def test_visualize_cli_bad_image_is_one_line(demo_export, photo, tmp_path, kind):
    path = tmp_path / "bad.png"
    if kind == "not an image":
        path.write_bytes(np.random.default_rng(1).bytes(300))
        message = f"--image {path} is not an image (300 bytes in no format PIL reads): expected an image file"
    elif kind == "truncated":
        data = photo.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        message = f"--image {path} is truncated or damaged (image file is truncated): expected an image file"
    else:
        message = f"--image {path} does not exist: expected an image file"
    result = _run("mae_jax.visualize", "--checkpoint", demo_export[0], "--image", photo, "--image", path,
                  "--output", tmp_path / "out.png")
    _assert_one_line_error(result, f"python -m mae_jax.visualize: error: {message}", path)
    assert not os.path.exists(tmp_path / "out.png")


# --------------------------------------------------------------------------------------------------------
# main.py: --config.init_from that cannot be used, and the NaN stop: one line each, promptly.
# --------------------------------------------------------------------------------------------------------


def _other_size_sources(directory):
    """An export and a Hugging Face directory of a tiny model with another embed_dim than configs/tiny.py's."""
    from configs import tiny

    model = models.MaskedAutoencoderViT(**dict(tiny.get_config().model, embed_dim=64))
    variables = jax.tree_util.tree_map(np.asarray, models.init_variables(model, jax.random.key(0)))
    checkpoints.save_variables(directory / "other_export", variables, models.constructor_fields(model))
    convert.save_hf(variables, model, directory / "other_hf")
    return directory / "other_export", directory / "other_hf"


def _line_time(line):
    from test_first_minutes import _line_time as parse

    return parse(line)


def test_main_init_from_and_nan_stop_are_one_line_each(tmp_path):
    """Through `python main.py` (in parallel): an HF directory of another size as init_from, and a NaN stop.
    In-process (`trainer.train_and_evaluate`, whose exception main.py prints as its one line): a text file,
    random bytes, our export of another architecture."""
    from configs import tiny
    from mae_jax import trainer
    from runs import run_main

    export, hf = _other_size_sources(tmp_path)
    fit = "does not fit the model (embed_dim=32, depth=2, patch_size=8, decoder_embed_dim=16, decoder_depth=1): " \
          "31 shape mismatches (checkpoint vs model, torch layout): "
    # The first update is already fatal; a step line per step, so the last one comes just before the failure.
    nan = ("--config.total_steps=40", "--config.log_every_steps=1", "--config.checkpoint_every_steps=1",
           "--config.warmup_epochs=0", "--config.base_lr=1e4", "--config.visualize_every_steps=0")
    procs = {"hf": run_main(tmp_path / "w_hf", f"--config.init_from={hf}", "--config.visualize_every_steps=0",
                            wait=False),
             "nan": run_main(tmp_path / "w_nan", *nan, wait=False)}

    text, random_pth = tmp_path / "notes.txt", tmp_path / "random.pth"
    text.write_text("hello\nnot weights\n")
    random_pth.write_bytes(np.random.default_rng(0).bytes(4000))
    for path, message in [
            (text, f"{text}: a text file (it starts 'hello'), not a PyTorch checkpoint; expected a state dict saved "
                   "by torch.save"),
            (random_pth, f"{random_pth}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle of "
                         "tensors); expected a state dict saved by torch.save"),
            (export, f"{export} (mae_jax checkpoint) {fit}cls_token [1, 1, 64] vs [1, 1, 32], ")]:
        config = tiny.get_config()
        config.init_from, config.visualize_every_steps = str(path), 0
        with pytest.raises(convert.CheckpointError) as error:
            trainer.train_and_evaluate(config, tmp_path / f"w_{path.name}")
        assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
        assert "weights_only" not in str(error.value)

    expected = {"hf": f"main.py: error: {hf} (Hugging Face ViTMAE (Hub / save_pretrained names)) {fit}"
                      "vit.embeddings.cls_token [1, 1, 64] vs [1, 1, 32], ",
                "nan": "main.py: error: non-finite loss or gradient at step 2: stopping; the last good checkpoint "
                       "(step 1) is intact. Lower base_lr, raise warmup_epochs or use float32 (model.dtype)"}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        end = time.time()
        assert proc.returncode == 1, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith(expected[name]), stderr[-3000:]
        assert len(stderr.strip().splitlines()) == 1, stderr[-3000:]  # no traceback, no advice, nothing after it
        last_log = [line for line in stdout.splitlines() if line[:1] in "IW" and line[1:5].isdigit()][-1]
        assert end - _line_time(last_log) < 30, (name, last_log)  # the failure comes after this line
    assert sorted(os.listdir(tmp_path / "w_nan" / "checkpoints")) == ["1"]
    from mae_jax import checkpoints

    _, variables = checkpoints.load_variables(tmp_path / "w_nan")  # the last good state, every value finite
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))
