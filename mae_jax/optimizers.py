"""Fine-tuning and linear-probing optimizers of the official recipe, built from optax parts.

- Layer-wise lr decay (`util/lr_decay.py` `param_groups_lrd` + `util/lr_sched.py`): every tensor's update is
  scaled by `decay ** (num_layers - layer_id)`, num_layers = depth + 1.
- AdamW with that decay and the official weight-decay groups (`finetune_optimizer`), equal to
  `torch.optim.AdamW(param_groups_lrd(...))` with each group's lr = schedule lr * lr_scale.
- LARS exactly as `util/lars.py` (`lars`).
- Partial fine-tuning (`trainable_mask`, `train_only`): train the last k blocks and the head; the rest gets a
  zero update, weight decay included.

Paths are those of the classifier's params dict (not wrapped in {"params": ...}): official names
`cls_token`, `pos_embed`, `patch_embed`, `blocks_{i}`, `fc_norm` / `norm`, `head`. A scanned `blocks`
subtree (leading [depth] axis, `scan_blocks=True`) gets per-slice layer-decay scales and weight-decay groups;
LARS and partial fine-tuning treat each leaf as one tensor, so they do not support it (LARS trains the
head only; `trainable_mask` raises unless all or none of the blocks train).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

# The official `no_weight_decay_list` (timm VisionTransformer.no_weight_decay()).
NO_WEIGHT_DECAY = ("pos_embed", "cls_token")
EMBEDDING = ("cls_token", "pos_embed", "patch_embed")  # layer id 0
SCANNED_BLOCKS = "blocks"  # nn.scan module name of the encoder blocks (models.make_blocks)


def _name(key: Any) -> str:
    """A path entry (jax DictKey / GetAttrKey / str) -> its name."""
    return str(getattr(key, "key", getattr(key, "name", key)))


def layer_id(path: Sequence[Any], depth: int) -> int | np.ndarray:
    """`get_layer_id_for_vit`: 0 for the embeddings, i + 1 for `blocks_{i}`, depth + 1 for the rest.

    For the scanned `blocks` subtree, the ids of its [depth] slices: [1, ..., depth].
    """
    top = _name(path[0])
    if top in EMBEDDING:
        return 0
    if top == SCANNED_BLOCKS:
        return np.arange(1, depth + 1)
    if top.startswith("blocks_"):
        return int(top[len("blocks_"):]) + 1
    return depth + 1


def _is_scanned(path: Sequence[Any]) -> bool:
    return _name(path[0]) == SCANNED_BLOCKS


def layer_decay_scales(params: PyTree, depth: int, decay: float) -> PyTree:
    """Per-leaf lr scale `decay ** (depth + 1 - layer_id)`: a float, or for a scanned leaf a float32 array
    [depth, 1, ...] that broadcasts over the leaf."""

    def scale(path, leaf):
        ids = layer_id(path, depth)
        if isinstance(ids, np.ndarray):
            return (decay ** (depth + 1 - ids)).astype(np.float32).reshape((depth,) + (1,) * (np.ndim(leaf) - 1))
        return decay ** (depth + 1 - ids)

    return jax.tree_util.tree_map_with_path(scale, params)


def finetune_weight_decay_mask(params: PyTree) -> PyTree:
    """True where `param_groups_lrd` decays: not 1-D tensors (biases, LayerNorm), not pos_embed / cls_token."""

    def decays(path, leaf):
        ndim = np.ndim(leaf) - _is_scanned(path)  # a scanned leaf stacks `depth` tensors
        return ndim > 1 and _name(path[0]) not in NO_WEIGHT_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_layer_decay(depth: int, decay: float) -> optax.GradientTransformation:
    """Multiplies each update by its `layer_decay_scales` factor (stateless; scales come from the paths)."""

    def apply(updates, params):
        del params
        scales = layer_decay_scales(updates, depth, decay)
        return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)

    return optax.stateless(apply)


def finetune_optimizer(learning_rate: optax.ScalarOrSchedule, *, depth: int, layer_decay: float,
                       weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                       trainable_blocks: int | None = None) -> optax.GradientTransformation:
    """AdamW with layer-wise lr decay and the official weight-decay groups (`main_finetune.py`).

    torch's AdamW scales both the Adam step and the decoupled weight decay by the group lr
    (= lr * lr_scale), so scaling optax.adamw's whole update by lr_scale is the same optimizer.
    `trainable_blocks` as in `trainable_mask` (None: train everything).
    """
    tx = optax.chain(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=finetune_weight_decay_mask),
        scale_by_layer_decay(depth, layer_decay),
    )
    if trainable_blocks is None or trainable_blocks < 0:
        return tx
    return train_only(tx, functools.partial(trainable_mask, depth=depth, trainable_blocks=trainable_blocks))


def lars(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = 0.001) -> optax.GradientTransformation:
    """LARS as the official `util/lars.py` (MoCo v3), the linear-probe optimizer.

    For tensors with ndim > 1: dp = g + wd * p, dp *= trust * |p| / |dp| (1 when a norm is 0); every tensor:
    mu = momentum * mu + dp, p -= lr * mu. Not `optax.lars`: it applies the lr before the momentum
    (mu = momentum * mu + lr * dp), which differs from the official optimizer while the lr changes (warmup).
    """
    matrices = lambda params: jax.tree_util.tree_map(lambda p: np.ndim(p) > 1, params)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=matrices),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )


def trainable_mask(params: PyTree, depth: int, trainable_blocks: int | None) -> PyTree:
    """True for the leaves partial fine-tuning trains: the last `trainable_blocks` blocks and everything
    after them (norm / fc_norm / head); 0 trains only those, None or -1 everything. Embeddings never
    (for trainable_blocks >= 0). The official linear probe trains `head` alone (its norm stays frozen)."""
    if trainable_blocks is None or trainable_blocks < 0:
        return jax.tree_util.tree_map(lambda _: True, params)
    if trainable_blocks > depth:
        raise ValueError(f"trainable_blocks {trainable_blocks} must be <= depth {depth} (or -1 / None: all)")

    def trainable(path, _):
        ids = layer_id(path, depth)
        if isinstance(ids, np.ndarray):
            if 0 < trainable_blocks < depth:
                raise ValueError(f"trainable_blocks {trainable_blocks} of {depth} needs unscanned blocks "
                                 "(scan_blocks=False): a scanned leaf holds all blocks")
            return trainable_blocks == depth
        return ids > depth - trainable_blocks

    return jax.tree_util.tree_map_with_path(trainable, params)


def train_only(tx: optax.GradientTransformation,
               trainable: PyTree | Callable[[PyTree], PyTree]) -> optax.GradientTransformation:
    """`tx` on the leaves where `trainable` (a bool tree or a function of params) is True, a zero update (no
    weight decay, no optimizer state) elsewhere."""
    labels = (lambda params: _labels(trainable(params))) if callable(trainable) else _labels(trainable)
    # The labels name the optimizer state's subtrees in checkpoints: kept as they were written.
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def _labels(trainable: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda t: "trainable" if t else "frozen", trainable)
