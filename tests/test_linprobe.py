"""The linear probe and partial fine-tuning end to end: what is frozen stays bit-identical, what trains moves."""

import jax
import numpy as np
import pytest

from configs import finetune_tiny, linprobe_tiny, tiny
from mae_jax import checkpoints, models, trainer

pytestmark = pytest.mark.slow


def _export_mae(path, **overrides):
    """A randomly initialised tiny MAE (configs/tiny.py's fields + overrides), written as our export."""
    mae = models.MaskedAutoencoderViT(**{**tiny.get_config().model, **overrides})
    variables = jax.tree_util.tree_map(np.asarray, models.init_variables(mae, jax.random.key(3)))
    checkpoints.save_variables(path, variables, models.constructor_fields(mae))
    return {**variables["params"], "pos_embed": variables["constants"]["pos_embed"]}  # the classifier's names


def _run(config, workdir, init_from, steps):
    """Trains `steps` steps from `init_from`; returns the variables after step 1 and after the last."""
    config.total_steps, config.log_every_steps, config.checkpoint_every_steps = steps, 1, 1
    config.keep_checkpoints, config.init_from = steps, str(init_from)
    trainer.train_and_evaluate(config, workdir)
    return [checkpoints.load_variables(workdir / "checkpoints" / str(step))[1] for step in (1, steps)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _different(a, b):
    return all(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_linear_probe_trains_the_head_only(tmp_path):
    pretrained = _export_mae(tmp_path / "mae")
    first, probed = _run(linprobe_tiny.get_config(), tmp_path / "probe", tmp_path / "mae", steps=2)
    params = probed["params"]
    encoder = [k for k in params if k != "head"]
    assert sorted(encoder) == sorted([k for k in pretrained if not k.startswith("decoder") and k != "mask_token"])
    for name in encoder:  # every encoder tensor, the final norm included, bit-identical
        assert _same(params[name], pretrained[name]), name
    assert _different(params["head"], first["params"]["head"])  # step 2 trained the head
    # and updated the BatchNorm's running statistics
    assert _different(probed["batch_stats"], first["batch_stats"])


@pytest.mark.long
def test_partial_finetuning_trains_the_last_blocks_only(tmp_path):
    pretrained = _export_mae(tmp_path / "mae", depth=4)
    config = finetune_tiny.get_config()
    config.model.depth, config.trainable_blocks = 4, 2
    first, last = (v["params"] for v in _run(config, tmp_path / "partial", tmp_path / "mae", steps=2))
    for name in ("patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1"):
        assert _same(last[name], pretrained[name]), name
    for name in ("blocks_2", "blocks_3"):
        assert _different(last[name], pretrained[name]), name
    for name in ("blocks_2", "blocks_3", "fc_norm", "head"):  # trained on every step
        assert _different(last[name], first[name]), name
