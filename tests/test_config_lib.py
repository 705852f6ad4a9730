"""Tests of mae_jax.config_lib's descriptions of config fields (main.py's --show_config) and of the shipped
configs (main.py's --help): every field of every shipped config has a whole one-line meaning."""

import importlib
import os
import re

from mae_jax import config_lib
from runs import ROOT

CONFIGS_DIR = os.path.join(ROOT, "configs")
SHIPPED = sorted(name[:-3] for name in os.listdir(CONFIGS_DIR) if name.endswith(".py") and name != "__init__.py")
# A description that stops on one of these has been cut: a clause or a list goes on in a line not read.
CONNECTORS = r"(and|or|the|a|an|of|to|in|for|with|by|from|as|at|is|are|but|than|which|that)"


def _cut(text: str) -> str | None:
    """Why `text` is not a whole one-line description, or None."""
    if not text.strip():
        return "empty"
    if "\n" in text:
        return "more than one line"
    if text.rstrip()[-1] in ",;:(-/&+*=":
        return f"ends with {text.rstrip()[-1]!r}"
    if re.search(rf"\b{CONNECTORS}$", text.rstrip()):
        return "ends with a connecting word"
    for opening, closing in ("()", "[]", "{}"):
        if text.count(opening) != text.count(closing):
            return f"unbalanced {opening}"
    if text.count('"') % 2:
        return "unbalanced quotes"
    return None


def _descriptions(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    sources = config_lib.description_sources(config, os.path.join(CONFIGS_DIR, f"{name}.py"), CONFIGS_DIR)
    return config_lib.field_descriptions(config, sources)


def test_every_field_of_every_shipped_config_has_a_whole_description():
    cut = {(name, key): (why, meaning) for name in SHIPPED for key, (_, meaning) in _descriptions(name).items()
           if (why := _cut(meaning))}
    assert not cut, cut
    assert len(SHIPPED) >= 16 and sum(len(_descriptions(name)) for name in SHIPPED) > 16 * 40


def test_the_checker_sees_cut_descriptions():
    assert _cut("tfds data_dir (None: tfds' default,") == "ends with ','"
    assert _cut("held-out images: reconstructions and") == "ends with a connecting word"
    assert _cut("") == "empty" and _cut("a (b") == "unbalanced ("
    assert _cut("the newest this many are kept") is None


def test_comments_continued_on_the_next_lines_are_read_whole():
    """The comment lines below a field that start "#   " continue its description; the README's example."""
    demo = _descriptions("demo")
    assert demo["input.data_dir"][1] == ("tfds data_dir (None: tfds' default, ~/tensorflow_datasets); folders and "
                                         "the demo are prepared (copied into TFRecords) here too")
    for key in ("model.mask_ratio", "model.norm_pix_loss", "model.depth", "input.train_split"):
        assert demo[key][1], key
    # The general meaning comes first; a config's comment on why it changes a field does not replace it.
    digits = _descriptions("digits_pretrain")
    assert digits["input.hflip"][1].startswith("probability of a random horizontal flip")
    assert digits["input.hflip"][0] == 0.0


def test_field_comments_forms(tmp_path):
    """config.x = v  # text, continued by "#   more" lines; a section comment above a field is not its meaning;
    model fields: end-of-line comments or the comment block right above (models.py's `attention`)."""
    path = tmp_path / "mine.py"
    path.write_text('def get_config():\n'
                    '    # Optimisation: a section heading, not a description.\n'
                    '    config.lr = 1.0  # the peak learning rate (before warmup,\n'
                    '    #   then cosine)\n'
                    '    config.steps = 10\n'
                    '    # a comment that belongs to what follows\n'
                    '    config.other = 2  # its own\n')
    comments = config_lib._field_comments([str(path)])
    assert comments == {"lr": "the peak learning rate (before warmup, then cosine)", "other": "its own"}
    from mae_jax import models

    model = config_lib._field_comments([models.__file__])
    assert model["model.attention"].startswith('"auto": with the xla_cpu ops "custom_vjp"')
    assert model["model.attention"].endswith('"einsum": the reference\'s order of operations.')
    assert model["model.num_classes"] == "outputs of `head`"  # ViTClassifier's, not another module's field


def test_shipped_configs_and_the_closest_one():
    configs = config_lib.shipped_configs(CONFIGS_DIR)
    assert sorted(configs) == [f"{name}.py" for name in SHIPPED]
    for name, summary in configs.items():
        assert summary.endswith((".", ")")) and not _cut(summary), (name, summary)
        doc = importlib.import_module(f"configs.{name[:-3]}").__doc__
        assert doc.strip().splitlines()[0] == summary
    assert configs["tiny.py"].startswith("A tiny MAE on synthetic images")
    assert config_lib.closest_config("configs/vit_bse.py", CONFIGS_DIR) == os.path.join(CONFIGS_DIR, "vit_base.py")
    assert config_lib.closest_config("config/tiny.py", CONFIGS_DIR) == os.path.join(CONFIGS_DIR, "tiny.py")
    assert config_lib.closest_config("/tmp/missing.py", CONFIGS_DIR) is None
