"""mae_jax.optimizers against transcriptions of the official util/lr_decay.py, util/lars.py and
torch.optim.AdamW with the official param groups."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mae_jax import optimizers

# -------------------------------------------------------------------------------------------------------
# The oracle: util/lr_decay.py (facebookresearch/mae), transcribed; `model` needs `.blocks` and
# `.named_parameters()` yielding objects with `.ndim` and `.requires_grad`.
# -------------------------------------------------------------------------------------------------------


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=[], layer_decay=.75):
    param_group_names = {}
    param_groups = {}
    num_layers = len(model.blocks) + 1
    layer_scales = list(layer_decay ** (num_layers - i) for i in range(num_layers + 1))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or n in no_weight_decay_list:
            g_decay = "no_decay"
            this_decay = 0.
        else:
            g_decay = "decay"
            this_decay = weight_decay
        layer_id = get_layer_id_for_vit(n, num_layers)
        group_name = "layer_%d_%s" % (layer_id, g_decay)
        if group_name not in param_group_names:
            this_scale = layer_scales[layer_id]
            param_group_names[group_name] = {"lr_scale": this_scale, "weight_decay": this_decay, "params": []}
            param_groups[group_name] = {"lr_scale": this_scale, "weight_decay": this_decay, "params": []}
        param_group_names[group_name]["params"].append(n)
        param_groups[group_name]["params"].append(p)
    return list(param_groups.values()), param_group_names


def get_layer_id_for_vit(name, num_layers):
    if name in ['cls_token', 'pos_embed']:
        return 0
    elif name.startswith('patch_embed'):
        return 0
    elif name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    else:
        return num_layers


NO_WEIGHT_DECAY_LIST = {"pos_embed", "cls_token"}  # timm VisionTransformer.no_weight_decay()

# -------------------------------------------------------------------------------------------------------
# A fine-tuning classifier's parameters (models_vit.VisionTransformer, global pool): official names and
# torch shapes, and our paths and shapes.
# -------------------------------------------------------------------------------------------------------


def official_shapes(depth, dim, patch=2, channels=3, grid=2, classes=5, mlp_ratio=4):
    hidden = dim * mlp_ratio
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim),
              "patch_embed.proj.weight": (dim, channels, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}"
        shapes.update({
            f"{b}.norm1.weight": (dim,), f"{b}.norm1.bias": (dim,),
            f"{b}.attn.qkv.weight": (3 * dim, dim), f"{b}.attn.qkv.bias": (3 * dim,),
            f"{b}.attn.proj.weight": (dim, dim), f"{b}.attn.proj.bias": (dim,),
            f"{b}.norm2.weight": (dim,), f"{b}.norm2.bias": (dim,),
            f"{b}.mlp.fc1.weight": (hidden, dim), f"{b}.mlp.fc1.bias": (hidden,),
            f"{b}.mlp.fc2.weight": (dim, hidden), f"{b}.mlp.fc2.bias": (dim,),
        })
    shapes.update({"fc_norm.weight": (dim,), "fc_norm.bias": (dim,),
                   "head.weight": (classes, dim), "head.bias": (classes,)})
    return shapes


def flax_path(name):
    """Official key -> our param path (blocks.{i} -> blocks_{i}, weight -> kernel / scale)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        parts = [f"blocks_{parts[1]}"] + parts[2:]
    elif parts[0] == "patch_embed":
        parts = ["patch_embed"] + parts[2:]
    if parts[-1] == "weight":
        parts[-1] = "scale" if "norm" in parts[-2] else "kernel"
    return tuple(parts)


def flax_shape(name, shape):
    if name == "patch_embed.proj.weight":
        d, c, p, q = shape
        return (p * q * c, d)
    return shape[::-1] if len(shape) == 2 else shape


def set_path(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def flax_tree(shapes, leaf):
    tree = {}
    for name, shape in shapes.items():
        set_path(tree, flax_path(name), leaf(name, flax_shape(name, shape)))
    return tree


class FakeModel:
    def __init__(self, depth, params):
        self.blocks = [None] * depth
        self._params = params

    def named_parameters(self):
        return list(self._params.items())


# -------------------------------------------------------------------------------------------------------
# Layer-decay scales and weight-decay groups.
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth,dim,decay", [(12, 768, 0.65), (24, 1024, 0.75), (2, 8, 0.65)])
def test_scales_and_weight_decay_match_param_groups_lrd(depth, dim, decay):
    shapes = official_shapes(depth, dim, patch=16, grid=14, classes=1000)
    fake = {n: types.SimpleNamespace(ndim=len(s), requires_grad=True) for n, s in shapes.items()}
    groups, _ = param_groups_lrd(FakeModel(depth, fake), 0.05, NO_WEIGHT_DECAY_LIST, decay)
    expected = {}
    for group in groups:
        for p in group["params"]:
            name = next(n for n, q in fake.items() if q is p)
            expected[name] = (group["lr_scale"], group["weight_decay"])
    assert set(expected) == set(shapes)

    params = flax_tree(shapes, lambda _, s: jax.ShapeDtypeStruct(s, jnp.float32))
    scales = optimizers.layer_decay_scales(params, depth, decay)
    mask = optimizers.finetune_weight_decay_mask(params)
    for name, (lr_scale, weight_decay) in expected.items():
        path = flax_path(name)
        assert get_path(scales, path) == lr_scale, name  # same float64 power: exactly equal
        assert (0.05 if get_path(mask, path) else 0.0) == weight_decay, name
    # The groups the recipe relies on: head/fc_norm at scale 1, the embeddings at decay ** (depth + 1).
    assert get_path(scales, ("head", "kernel")) == 1.0
    assert get_path(scales, ("cls_token",)) == decay ** (depth + 1)


def test_scanned_blocks_get_per_slice_scales_and_groups():
    depth, dim, decay = 3, 8, 0.65
    shapes = official_shapes(depth, dim)
    params = flax_tree(shapes, lambda _, s: jax.ShapeDtypeStruct(s, jnp.float32))
    blocks = [params.pop(f"blocks_{i}") for i in range(depth)]
    scanned = dict(params, blocks=jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((depth, *s.shape), s.dtype), blocks[0]))
    unscanned_scales = optimizers.layer_decay_scales(dict(params, **{f"blocks_{i}": b for i, b in enumerate(blocks)}),
                                                     depth, decay)
    scales = optimizers.layer_decay_scales(scanned, depth, decay)
    mask = optimizers.finetune_weight_decay_mask(scanned)
    for path, leaf in jax.tree_util.tree_flatten_with_path(scanned["blocks"])[0]:
        keys = tuple(k.key for k in path)
        scale = get_path(scales["blocks"], keys)
        assert scale.shape == (depth,) + (1,) * (len(leaf.shape) - 1)
        for i in range(depth):
            np.testing.assert_allclose(scale.reshape(depth)[i], get_path(unscanned_scales[f"blocks_{i}"], keys),
                                       rtol=1e-7)
        assert get_path(mask["blocks"], keys) == (len(leaf.shape) > 2)  # kernels decay, biases / norms not


# -------------------------------------------------------------------------------------------------------
# AdamW with layer decay vs torch.optim.AdamW with the official param groups.
# -------------------------------------------------------------------------------------------------------


def random_tree(shapes, seed):
    rng = np.random.default_rng(seed)
    return flax_tree(shapes, lambda _, s: rng.normal(size=s).astype(np.float32))


def run_steps(tx, params, grads):
    """`len(grads)` steps of `tx` from `params`, one jitted step. Returns (params, opt_state)."""

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    p, state = params, tx.init(params)
    for g in grads:
        p, state = step(p, state, g)
    return p, state


def warmup(peak, steps):
    """A warmup lr as the official lr_sched gives it on iterations 1, 2, ... of the first epoch."""
    return lambda count: peak * (count + 1) / steps


def test_finetune_adamw_matches_torch_adamw_with_param_groups():
    torch = pytest.importorskip("torch", reason="the AdamW oracle is torch.optim.AdamW")
    depth, dim, decay, wd, steps = 2, 8, 0.65, 0.05, 3
    shapes = official_shapes(depth, dim)
    params = random_tree(shapes, 0)
    grads = [random_tree(shapes, 1 + t) for t in range(steps)]
    schedule = warmup(1e-2, 5)

    tensors = {n: torch.nn.Parameter(torch.from_numpy(np.array(get_path(params, flax_path(n)))))
               for n in shapes}
    groups, _ = param_groups_lrd(FakeModel(depth, tensors), wd, NO_WEIGHT_DECAY_LIST, decay)
    opt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    for t in range(steps):
        for group in opt.param_groups:  # util/lr_sched.adjust_learning_rate
            group["lr"] = schedule(t) * group["lr_scale"]
        for n, p in tensors.items():
            p.grad = torch.from_numpy(np.array(get_path(grads[t], flax_path(n))))
        opt.step()

    tx = optimizers.finetune_optimizer(schedule, depth=depth, layer_decay=decay, weight_decay=wd)
    p, _ = run_steps(tx, params, grads)
    for n, tensor in tensors.items():
        ours = np.asarray(get_path(p, flax_path(n)))
        np.testing.assert_allclose(ours, tensor.detach().numpy(), atol=1e-6, rtol=0, err_msg=n)
    # Sanity: the steps moved the params well beyond the tolerance.
    assert np.abs(np.asarray(p["head"]["kernel"]) - params["head"]["kernel"]).max() > 1e-3


def scan_blocks(params, depth):
    """blocks_{i} subtrees -> one `blocks` subtree with a leading [depth] axis (the nn.scan layout)."""
    blocks = [params[f"blocks_{i}"] for i in range(depth)]
    rest = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    return dict(rest, blocks=jax.tree_util.tree_map(lambda *xs: np.stack(xs), *blocks))


def test_finetune_adamw_on_scanned_blocks_equals_unscanned():
    depth, steps = 3, 2
    shapes = official_shapes(depth, 8)
    params = random_tree(shapes, 0)
    grads = [random_tree(shapes, 1 + t) for t in range(steps)]
    tx = optimizers.finetune_optimizer(warmup(1e-2, 5), depth=depth, layer_decay=0.65, weight_decay=0.05)
    unscanned, _ = run_steps(tx, params, grads)
    scanned, _ = run_steps(tx, scan_blocks(params, depth), [scan_blocks(g, depth) for g in grads])
    expected = scan_blocks(jax.tree_util.tree_map(np.asarray, unscanned), depth)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-7),
                           scanned, expected)


# -------------------------------------------------------------------------------------------------------
# LARS vs util/lars.py.
# -------------------------------------------------------------------------------------------------------


def official_lars(torch):
    class LARS(torch.optim.Optimizer):
        """util/lars.py (facebookresearch/mae), transcribed."""

        def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
            defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                            trust_coefficient=trust_coefficient)
            super().__init__(params, defaults)

        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g['params']:
                    dp = p.grad
                    if dp is None:
                        continue
                    if p.ndim > 1:
                        dp = dp.add(p, alpha=g['weight_decay'])
                        param_norm = torch.norm(p)
                        update_norm = torch.norm(dp)
                        one = torch.ones_like(param_norm)
                        q = torch.where(param_norm > 0.,
                                        torch.where(update_norm > 0,
                                                    (g['trust_coefficient'] * param_norm / update_norm), one),
                                        one)
                        dp = dp.mul(q)
                    param_state = self.state[p]
                    if 'mu' not in param_state:
                        param_state['mu'] = torch.zeros_like(p)
                    mu = param_state['mu']
                    mu.mul_(g['momentum']).add_(dp)
                    p.add_(mu, alpha=-g['lr'])

    return LARS


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lars_matches_official(weight_decay):
    torch = pytest.importorskip("torch", reason="the LARS oracle is util/lars.py, a torch optimizer")
    rng = np.random.default_rng(0)
    params = {
        "head": {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
                 "bias": rng.normal(size=(4,)).astype(np.float32)},
        "zero": {"kernel": np.zeros((3, 5), np.float32)},  # |p| = 0 on the first step: q = 1
        "conv": {"kernel": rng.normal(size=(2, 2, 3, 4)).astype(np.float32)},
        "norm": {"scale": rng.normal(size=(4,)).astype(np.float32)},
    }
    steps = 5
    grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
             for _ in range(steps)]
    grads[2]["conv"]["kernel"] = np.zeros_like(grads[2]["conv"]["kernel"])  # |dp| = 0 when wd = 0: q = 1
    schedule = warmup(0.5, steps)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    tensors = [torch.nn.Parameter(torch.from_numpy(np.array(x))) for x in leaves]
    opt = official_lars(torch)(tensors, lr=0.0, weight_decay=weight_decay)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = schedule(t)
        for tensor, g in zip(tensors, jax.tree_util.tree_leaves(grads[t])):
            tensor.grad = torch.from_numpy(np.array(g))
        opt.step()
    expected = jax.tree_util.tree_unflatten(treedef, [t.detach().numpy() for t in tensors])

    tx = optimizers.lars(schedule, weight_decay=weight_decay)
    p, _ = run_steps(tx, params, grads)
    for (path, ours), theirs in zip(jax.tree_util.tree_flatten_with_path(p)[0], jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))
    # The 1-D params took plain momentum-SGD steps (no trust ratio): they moved by O(lr), the matrices by
    # O(lr * 0.001 * |p|).
    assert np.abs(np.asarray(p["head"]["bias"]) - params["head"]["bias"]).max() > 0.1
    assert np.abs(np.asarray(p["head"]["kernel"]) - params["head"]["kernel"]).max() < 0.05


# -------------------------------------------------------------------------------------------------------
# Partial fine-tuning.
# -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable_blocks,trained", [
    (2, {"blocks_2", "blocks_3", "fc_norm", "head"}),
    (0, {"fc_norm", "head"}),
    (4, {"blocks_0", "blocks_1", "blocks_2", "blocks_3", "fc_norm", "head"}),
    (-1, {"cls_token", "pos_embed", "patch_embed", "blocks_0", "blocks_1", "blocks_2", "blocks_3", "fc_norm",
          "head"}),
])
def test_partial_finetuning_freezes_early_layers_bit_exactly(trainable_blocks, trained):
    depth = 4
    shapes = official_shapes(depth, 8)
    params = jax.tree_util.tree_map(jnp.asarray, random_tree(shapes, 0))
    grads = [random_tree(shapes, 1 + t) for t in range(3)]
    # Weight decay > 0 so that a frozen leaf would move even with zero gradients.
    tx = optimizers.finetune_optimizer(warmup(1e-2, 5), depth=depth, layer_decay=0.65, weight_decay=0.05,
                                       trainable_blocks=trainable_blocks)
    new, state = run_steps(tx, params, grads)
    for top in params:
        for path, before in jax.tree_util.tree_flatten_with_path(params[top])[0]:
            after = get_path(new[top], tuple(k.key for k in path))
            if top in trained:
                # Nearly every entry moved (one may return to its start when the gradient signs alternate).
                assert (np.asarray(after) != np.asarray(before)).mean() > 0.9, (top, path)
            else:
                np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg=f"{top}{path}")
    # Frozen leaves carry no Adam moments.
    moments = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    expected = 2 * sum(x.size for top in trained for x in jax.tree_util.tree_leaves(params[top]))
    assert moments == expected


def test_trainable_mask_rejects_bad_settings():
    depth = 4
    params = flax_tree(official_shapes(depth, 8), lambda _, s: jax.ShapeDtypeStruct(s, jnp.float32))
    with pytest.raises(ValueError, match="trainable_blocks 5 must be <= depth 4"):
        optimizers.trainable_mask(params, depth, 5)
    scanned = {"blocks": {"mlp": {"fc1": {"kernel": jax.ShapeDtypeStruct((depth, 8, 32), jnp.float32)}}}}
    with pytest.raises(ValueError, match="needs unscanned blocks"):
        optimizers.trainable_mask(scanned, depth, 2)
    assert optimizers.trainable_mask(scanned, depth, depth)["blocks"]["mlp"]["fc1"]["kernel"]
    assert not optimizers.trainable_mask(scanned, depth, 0)["blocks"]["mlp"]["fc1"]["kernel"]
