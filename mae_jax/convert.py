r"""PyTorch <-> Flax weights: official facebookresearch/mae checkpoints, Hugging Face ViTMAE, our Orbax format.

Every source is first brought into one canonical form, the official PyTorch state dict (`blocks.{i}.attn.qkv`,
torch layouts, float32 numpy; the names and layouts live in `mae_jax.torch_layout`), where it is checked
against the model: unknown keys, missing keys and shape mismatches are one error naming the keys and both
shapes. An encoder-only checkpoint keeps the decoder of the base variables (or of a fresh init), and says so.

Variables are flax's dict, as `model.apply` takes them (see `mae_jax.train_state`): {"params", "constants"} for a
MaskedAutoencoderViT, {"params"} for a ViTClassifier, {"params", "batch_stats"} for a linear probe's.

Position tables. `from_torch` returns `params` only, what an optimizer trains. The MAE's two fixed sin-cos tables
(the `constants` collection) travel separately:
  - `from_torch_variables` and `load_variables` return {"params", "constants"}: the checkpoint's tables, checked
    against the formula (a warning if they differ) and bicubically interpolated when the checkpoint's grid
    differs from the model's (as the official fine-tuning code does);
  - `models.position_tables(model)` gives the formula tables that `model.init` creates;
  - `to_torch` and `save_hf` accept params (tables from the formula) or variables (tables as given).

Fine-tuning (`models.ViTClassifier`, official `models_vit` keys; its `pos_embed` is a parameter, no constants):
an official fine-tuned classifier (`mae_finetuned_vit_*.pth`) loads strictly; any pretraining source loads its
encoder strictly, drops its decoder (and, with global pool, its `norm`) and takes `head` / `fc_norm` from the
base variables or a fresh init (logged), as main_finetune.py does; `to_torch(..., format="official")` and
`--to official` write what `models_vit.VisionTransformer` loads with strict=True.

Linear probing (`ViTClassifier(head_batch_norm=True)`, main_linprobe.py's head `Sequential(BatchNorm1d, Linear)`:
keys `head.0.running_mean`, `head.0.running_var`, `head.0.num_batches_tracked`, `head.1.{weight,bias}`): its
variables are {"params", "batch_stats"}. An official linear-probe checkpoint loads strictly and `load_model` infers
head_batch_norm from its keys; a pretraining checkpoint gets a fresh head and fresh statistics (logged).

Usage:
  params = convert.from_torch(torch.load(path)["model"], model)        # official, HF 4 or HF 5 key names
  variables = convert.load_variables(path, model, base_variables)       # .pth, HF directory or our checkpoint
  state_dict = convert.to_torch(variables, model, format="official")    # or "hf" (Hub names), "hf_t5"
  convert.save_hf(variables, model, directory)                           # for ViTMAEForPreTraining.from_pretrained
  model, params = convert.load_hf(directory)
  variables = convert.load_variables("mae_pretrain_vit_base.pth", classifier)  # encoder + fresh head

Command line (writes our Orbax format, an official .pth or a Hugging Face directory):
  python -m mae_jax.convert mae_pretrain_vit_base.pth /tmp/mae_b16            # -> our format (`--to flax`)
  python -m mae_jax.convert /tmp/mae_b16 /tmp/mae_b16.pth --to official
  python -m mae_jax.convert /tmp/mae_b16 /tmp/mae_b16_hf --to hf
  python -m mae_jax.convert hf_dir out --variant B/16 --image_size 448       # force an architecture / size
  python -m mae_jax.convert finetune_workdir /tmp/vit_b16.pth --to official   # a classifier: models_vit keys

Our exports carry their architecture: an official .pth holds {"model": state dict, "mae_jax_model":
constructor fields} (the official code reads "model" only), a Hugging Face directory its config.json, our
format its "model" item. A source that cannot be read or does not fit raises `CheckpointError`, one line
naming the path, what was expected and what was found; the command line prints that line and exits 1
(`-v 1` also shows the traceback and third-party INFO logs, which are hidden otherwise).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import json
import os
import re
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from absl import app, logging
from absl.flags import argparse_flags

from mae_jax import checkpoints, models, runtime, torch_layout

PyTree = Any
FORMATS = ("official", "hf", "hf_t5")
MODEL_FIELDS_KEY = "mae_jax_model"  # our official-format exports: the constructor fields, beside "model"
POSITION_TABLES = torch_layout.POSITION_TABLES
_CLASSIFIER_FIELDS = ("num_classes", "global_pool", "head_batch_norm")  # what a classifier's keys tell
Model = torch_layout.Model
SHOW = torch_layout.SHOW


CheckpointError = checkpoints.CheckpointError  # what every reader raises: a one-line message naming the path


def as_variables(tree: Mapping) -> Mapping:
    """`tree` as variables: itself if it holds "params", else {"params": tree} (a params tree never has a
    "params" entry)."""
    return tree if "params" in tree else {"params": tree}


# ---------------------------------------------------------------------------------------------------------
# Checks, position tables, filling in.
# ---------------------------------------------------------------------------------------------------------


def _source_grid(length: int, model: Model, name: str) -> tuple[int, int]:
    if length == model.num_patches:
        return model.grid_size
    side = int(round(length**0.5))
    if side * side != length:
        raise ValueError(f"{name} has {length} patch rows: neither the model's {model.grid_size} grid nor "
                         "a square grid, so it cannot be interpolated")
    return side, side


def _check(sd: Mapping, origin: Mapping, model: Model, strict: bool,
           description: str, new_keys: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """Raises one error naming every kind of misfit; returns (keys to fill from the base, encoder_only).

    `new_keys`: keys of the model the source is not meant to have (a classifier's head over a pretraining
    checkpoint); they are filled from the base, not reported missing.
    """
    expected = torch_layout.expected_shapes(model)
    head = [k for k in sd if torch_layout.is_classifier_key(k)]
    if head and isinstance(model, models.MaskedAutoencoderViT):
        raise ValueError(
            f"this is a fine-tuned classifier checkpoint (it has {torch_layout.first_keys(head)}), not a "
            "pretraining one: MaskedAutoencoderViT cannot load it. Load it into a models.ViTClassifier, or use a "
            "pretraining checkpoint (mae_pretrain_vit_*.pth, mae_visualize_vit_*.pth or a ViTMAEForPreTraining "
            "directory)")
    unexpected = [k for k in sd if k not in expected]
    mismatched = []
    for key in expected:  # in the model's order, so that the first ones named are the first layers
        if key not in sd:
            continue
        shape, want = tuple(sd[key].shape), expected[key]
        if key in POSITION_TABLES:  # another grid is fine (interpolated); the width is not
            ok = len(shape) == 3 and shape[0] == 1 and shape[2] == want[2]
        else:
            ok = shape == want
        if not ok:
            mismatched.append(key)
    missing = [k for k in expected if k not in sd and k not in POSITION_TABLES and k not in new_keys]
    encoder_only = bool(missing) and all(torch_layout.is_decoder(k) for k in missing) and \
        not any(torch_layout.is_decoder(k) for k in sd if k not in POSITION_TABLES)
    def listed(keys, describe):
        return ", ".join(describe(k) for k in keys[:SHOW]) + (f" and {len(keys) - SHOW} more"
                                                               if len(keys) > SHOW else "")

    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (checkpoint vs model, torch layout): " + listed(
            mismatched, lambda k: f"{origin.get(k, k)} {list(sd[k].shape)} vs {list(expected[k])}"))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (not in the model): " + listed(
            unexpected, lambda k: f"{origin.get(k, k)} {list(sd[k].shape)}"))
    if missing and not encoder_only and strict:
        problems.append(f"{len(missing)} missing keys (model shape): " + listed(
            missing, lambda k: f"{k} {list(expected[k])}") + " (strict=False takes them from the base variables)")
    if problems:
        hint = ""
        try:
            fields = _infer_fields(sd)
            hint = ". The checkpoint looks like " + ", ".join(
                f"{k}={fields[k]}" for k in ("embed_dim", "depth", "patch_size", "decoder_embed_dim",
                                             "decoder_depth", *_CLASSIFIER_FIELDS) if k in fields)
        except (ValueError, KeyError, IndexError):  # a hint only
            pass
        arch = ", ".join(f"{k}={getattr(model, k)}" for k in ("embed_dim", "depth", "patch_size",
                                                                "decoder_embed_dim", "decoder_depth",
                                                                *_CLASSIFIER_FIELDS) if hasattr(model, k))
        raise ValueError(f"{description} does not fit the model ({arch}): " + "; ".join(problems) + hint)
    if missing and not encoder_only:
        logging.warning("strict=False: %d keys missing from %s are taken from the base variables: %s",
                        len(missing), description, torch_layout.first_keys(missing))
    return missing + [k for k in new_keys if k in expected], encoder_only


def _for_classifier(sd: Mapping, model: models.ViTClassifier, strict: bool,
                    description: str) -> tuple[dict, tuple[str, ...]]:
    """The part of a state dict a ViTClassifier loads, and its keys to initialise fresh (as main_finetune.py).

    A fine-tuned or linear-probe classifier (it has `head`) loads as it is. A pretraining checkpoint loses its
    decoder, and in global-pool mode its `norm` (replaced by a fresh `fc_norm`); `head` (and `fc_norm`, and
    with head_batch_norm the BatchNorm statistics `head.0.*`) are new.
    """
    layout = {**torch_layout.official_layout(model), **torch_layout.batch_stats_layout(model)}
    expected = torch_layout.expected_shapes(model)
    if any(torch_layout.is_classifier_key(k) for k in sd):
        linear = torch_layout.head_linear_key(model)
        head = [k for k in (f"{linear}.weight", f"{linear}.bias")
                if k in sd and tuple(sd[k].shape) != expected[k]]
        if not head:
            return dict(sd), ()
        shapes = f"{head[0]} {list(sd[head[0]].shape)} vs the model's {list(expected[head[0]])}"
        if strict:
            raise ValueError(f"{description} is a classifier for another number of classes ({shapes}, "
                             f"num_classes {model.num_classes}): strict=False re-initialises the head, as "
                             "main_finetune.py does")
        logging.warning("%s: %s; the head is initialised fresh (strict=False)", description, shapes)
        return {k: v for k, v in sd.items() if k not in head}, tuple(head)
    # The pretraining norm first: with global pool its absence matters more than the decoder's.
    dropped = [k for k in sd if k.split(".")[0] == "norm"] if model.global_pool else []
    dropped += [k for k in sd if torch_layout.is_decoder(k)]
    if dropped:
        logging.info("%s is a pretraining checkpoint: not loading %d tensors the classifier does not have "
                     "(%s)", description, len(dropped), torch_layout.first_keys(dropped))
    new = tuple(k for k in layout if torch_layout.is_classifier_key(k) or (k == "pos_embed" and k not in sd))
    return {k: v for k, v in sd.items() if k not in dropped}, new


def interpolate_pos_embed(pos_embed: np.ndarray, src_grid: tuple[int, int], dst_grid: tuple[int, int],
                          num_extra_tokens: int = 1, dtype: Any = np.float32) -> np.ndarray:
    """Resizes a position table [1, extra + h*w, D] to another grid, the extra (cls) rows kept.

    The kernel of the official `interpolate_pos_embed`: `torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False)` on the [1, D, h, w] grid (cubic a = -0.75, source index (i + 0.5) * in / out - 0.5,
    edge clamp). Computed in float64 without torch (equal to torch's float64 result to ~1e-14), then cast to
    `dtype`; torch's float32 arithmetic differs from the exact value by ~1e-6.
    """
    table = np.asarray(pos_embed, np.float64)
    extra, tokens = table[:, :num_extra_tokens], table[:, num_extra_tokens:]
    grid = tokens.reshape(table.shape[0], *src_grid, table.shape[-1])
    weights_h, weights_w = (_bicubic_matrix(n_in, n_out) for n_in, n_out in zip(src_grid, dst_grid))
    grid = np.einsum("oh,pw,nhwd->nopd", weights_h, weights_w, grid)
    out = np.concatenate([extra, grid.reshape(table.shape[0], -1, table.shape[-1])], axis=1)
    return out.astype(dtype)


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] weights of torch's 1-D bicubic resampling with align_corners=False."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # not clamped for cubic, as torch
    floor = np.floor(src)
    t = src - floor

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    coeffs = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    matrix = np.zeros((n_out, n_in))
    for k in range(4):
        index = np.clip(floor.astype(int) - 1 + k, 0, n_in - 1)
        np.add.at(matrix, (np.arange(n_out), index), coeffs[:, k])
    return matrix


def _position_table(table: np.ndarray, name: str, model: Model) -> np.ndarray:
    """Checks a checkpoint's table against the formula, and interpolates it to the model's grid."""
    grid = _source_grid(table.shape[1] - 1, model, name)
    formula = models.get_2d_sincos_pos_embed(table.shape[2], grid, cls_token=True)
    error = float(np.abs(table[0] - formula).max())
    # A classifier trains its table: a fine-tuned one differs from the formula by design.
    if error > 1e-5 and isinstance(model, models.MaskedAutoencoderViT):
        logging.warning("%s of the checkpoint differs from the 2-D sin-cos formula by up to %.3g; "
                        "using the checkpoint's table", name, error)
    if grid != model.grid_size:
        logging.info("Interpolating %s from a %s grid to the model's %s grid (bicubic, as the official "
                     "fine-tuning code)", name, grid, model.grid_size)
        table = interpolate_pos_embed(table, grid, model.grid_size)
    return table


def _variables_from_official(sd: Mapping, origin: Mapping, model: Model,
                             base_variables: PyTree | None, strict: bool, description: str) -> dict:
    classifier = isinstance(model, models.ViTClassifier)
    new_keys = ()
    if classifier:
        sd, new_keys = _for_classifier(sd, model, strict, description)
    fill, encoder_only = _check(sd, origin, model, strict, description, new_keys)
    layout = torch_layout.official_layout(model)
    stats_layout = torch_layout.batch_stats_layout(model)
    tables = {name: _position_table(sd[name], name, model) for name in POSITION_TABLES if name in sd}
    params, batch_stats = {}, {}
    for key, (path, kind) in layout.items():
        if key in sd:
            value = tables[key] if key in tables else torch_layout.from_torch_layout(sd[key], kind)
            torch_layout.set_path(params, path, value)
    for key, path in stats_layout.items():
        if key in sd:
            torch_layout.set_path(batch_stats, path, _stat(key, sd[key]))
    constants = {name: table for name, table in tables.items() if name not in layout}
    absent_tables = [] if classifier else [name for name in POSITION_TABLES if name not in sd]
    if fill or absent_tables:
        if base_variables is None:
            base_variables = jax.jit(models.init_variables, static_argnums=0)(model, jax.random.key(0))
            base_name = "a fresh initialisation (models.init_variables, seed 0)"
        else:
            base_name = "the base variables"
        base = jax.tree_util.tree_map(np.asarray, dict(as_variables(base_variables)))
        base_params, base_stats = torch_layout.unscan(base["params"]), base.get("batch_stats")
        for key in fill:
            if key in stats_layout:  # a base without statistics (params only): BatchNorm1d's initial ones
                value = _initial_stat(model, key) if base_stats is None else \
                    torch_layout.get(base_stats, stats_layout[key])
                torch_layout.set_path(batch_stats, stats_layout[key], _stat(key, value))
            else:
                torch_layout.set_path(params, layout[key][0], torch_layout.get(base_params, layout[key][0]))
        if absent_tables:
            base_constants = base.get("constants") or models.position_tables(model)
            for name in absent_tables:
                constants[name] = base_constants[name]
            logging.info("%s has no %s: taken from %s", description, absent_tables, base_name)
        if encoder_only:
            logging.info("%s holds the encoder only: the decoder (%d tensors) is kept from %s", description,
                         len(fill), base_name)
        if new_keys:
            logging.info("New keys of the classifier, not in %s: %s; taken from %s", description,
                         ", ".join(new_keys), base_name)
    params = torch_layout.scan(params, model)
    if classifier:
        return {"params": params, "batch_stats": batch_stats} if stats_layout else {"params": params}
    return {"params": params, "constants": {k: np.array(v, np.float32) for k, v in constants.items()}}


def _stat(key: str, value: np.ndarray) -> np.ndarray:
    """A BatchNorm buffer as our batch_stats hold it: the counter int32, the statistics float32."""
    return np.array(value, np.int32 if key.endswith(torch_layout.COUNTER_SUFFIX) else np.float32)


def _initial_stat(model: Model, key: str) -> np.ndarray:
    """torch BatchNorm1d's initial buffer (and HeadBatchNorm's): running_var 1, running_mean and the counter 0."""
    return np.full(torch_layout.expected_shapes(model)[key], 1.0 if key.endswith("running_var") else 0.0)


# ---------------------------------------------------------------------------------------------------------
# Public conversions.
# ---------------------------------------------------------------------------------------------------------


def from_torch_variables(state_dict: Mapping[str, Any], model: Model,
                         base_variables: PyTree | None = None, strict: bool = True) -> dict:
    """A PyTorch state dict -> {"params", "constants"} (a ViTClassifier: {"params"}, with head_batch_norm {"params",
    "batch_stats"}) of numpy arrays for `model`.

    `state_dict` maps names to numpy arrays or torch tensors: official MAE (encoder-only, full, or a
    training checkpoint holding 'model'), official fine-tuned classifier (`models_vit`), or Hugging Face
    ViTMAE with transformers 4 or 5 names; the format is detected from the keys. What the checkpoint lacks
    (the decoder of an encoder-only one; a classifier's `head` and `fc_norm` over a pretraining checkpoint,
    whose decoder and, with global pool, `norm` are dropped; the BatchNorm statistics of a linear-probe head over
    a checkpoint without them; any missing key with `strict=False`) comes from
    `base_variables`, else from a fresh initialisation (seed 0), and is logged. Position tables come from the
    checkpoint, interpolated to the model's grid if needed.
    """
    sd, origin, fmt = torch_layout.canonical(state_dict)
    return _variables_from_official(sd, origin, model, base_variables, strict, f"the {fmt} state dict")


def from_torch(state_dict: Mapping[str, Any], model: Model,
               base_params: PyTree | None = None, strict: bool = True) -> PyTree:
    """A PyTorch state dict (official or Hugging Face, detected) -> `params` for `model`.

    See `from_torch_variables`, which also returns the position tables; here they are only checked.
    """
    base = None if base_params is None else {"params": base_params}
    return from_torch_variables(state_dict, model, base, strict)["params"]


def to_torch(variables: PyTree, model: Model,
             format: str = "official") -> dict[str, np.ndarray]:
    """Variables (or `params` alone) -> a state dict of float32 numpy arrays in torch layouts.

    A ViTClassifier with head_batch_norm needs its statistics, {"params", "batch_stats"}; it exports main_linprobe.py's `head.0.running_mean`,
    `head.0.running_var`, `head.0.num_batches_tracked` (int64: the count of train-mode batches that updated
    the statistics, which HeadBatchNorm tracks) and `head.1.{weight,bias}`.

    format "official": exactly the keys and shapes of the official full `MaskedAutoencoderViT` (of
    `models_vit.VisionTransformer` for a ViTClassifier, the only format it has);
    "hf": Hugging Face ViTMAEForPreTraining with the Hub's (transformers 4) names, which transformers 4 and
    5 both load with `from_pretrained`; "hf_t5": transformers 5's in-memory names, for `load_state_dict`.
    Without "constants", the MAE's position tables are the formula's for the model's grid.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {FORMATS}")
    classifier = isinstance(model, models.ViTClassifier)
    if classifier and format != "official":
        raise ValueError(f"format {format!r}: a ViTClassifier exports to 'official' (models_vit) only")
    if not classifier and format != "official" and model.encoder_mask_tokens:
        raise ValueError(_NO_HF_ENCODER_MASK_TOKEN)
    variables = as_variables(variables)
    params, batch_stats = torch_layout.unscan(variables["params"]), variables.get("batch_stats")
    sd = {}
    for key, (path, kind) in torch_layout.official_layout(model).items():
        value = np.asarray(torch_layout.get(params, path), np.float32)
        sd[key] = torch_layout.to_torch_layout(value, kind, model)
    stats_layout = torch_layout.batch_stats_layout(model)
    if stats_layout and batch_stats is None:
        raise ValueError("a ViTClassifier with head_batch_norm exports its BatchNorm running statistics: pass "
                         "{'params', 'batch_stats'}, not params alone")
    for key, path in stats_layout.items():
        counter = key.endswith(torch_layout.COUNTER_SUFFIX)
        sd[key] = np.array(torch_layout.get(batch_stats, path), np.int64 if counter else np.float32)
    if not classifier:  # the classifier's pos_embed is a parameter, in the layout
        constants = variables.get("constants") or models.position_tables(model)
        for key in POSITION_TABLES:
            sd[key] = np.array(constants[key], np.float32)
    expected = torch_layout.expected_shapes(model)
    wrong = [k for k in sd if tuple(sd[k].shape) != expected[k]]
    if wrong:
        raise ValueError("params do not fit the model: " + ", ".join(
            f"{k} {list(sd[k].shape)} vs {list(expected[k])}" for k in wrong[:SHOW]))
    return sd if format == "official" else torch_layout.official_to_hf(sd, format)


_NO_HF_ENCODER_MASK_TOKEN = ("encoder_mask_tokens=True: transformers' ViTMAE has no encoder mask token; export "
                             "--to flax, or --to official (an extra encoder_mask_token entry, read back by mae_jax)")


def hf_config(model: models.MaskedAutoencoderViT) -> dict[str, Any]:
    """The `config.json` of a ViTMAEForPreTraining equal to `model` (eps, exact GELU, sizes)."""
    grid_h, grid_w = model.grid_size
    if grid_h != grid_w:
        raise ValueError(f"image_size {model.image_size!r}: transformers' ViTMAE supports square images only")
    if model.encoder_mask_tokens:
        raise ValueError(_NO_HF_ENCODER_MASK_TOKEN)
    height = grid_h * model.patch_size
    hidden = int(model.embed_dim * model.mlp_ratio)
    return {
        "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
        "image_size": height, "patch_size": model.patch_size, "num_channels": model.num_channels,
        "hidden_size": model.embed_dim, "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads, "intermediate_size": hidden,
        "decoder_hidden_size": model.decoder_embed_dim, "decoder_num_hidden_layers": model.decoder_depth,
        "decoder_num_attention_heads": model.decoder_num_heads,
        "decoder_intermediate_size": int(model.decoder_embed_dim * model.mlp_ratio),
        "hidden_act": "gelu", "layer_norm_eps": model.layer_norm_eps, "qkv_bias": True,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "mask_ratio": model.mask_ratio, "norm_pix_loss": model.norm_pix_loss,
    }


def _fields_from_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    get = lambda key, default: config.get(key, default)  # ViTMAEConfig's defaults
    hidden, inter = get("hidden_size", 768), get("intermediate_size", 3072)
    dec_hidden, dec_inter = get("decoder_hidden_size", 512), get("decoder_intermediate_size", 2048)
    if inter * dec_hidden != dec_inter * hidden:
        raise ValueError(f"config: intermediate_size/hidden_size {inter}/{hidden} differs from the decoder's "
                         f"{dec_inter}/{dec_hidden}; MaskedAutoencoderViT has one mlp_ratio")
    if get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config: hidden_act {config['hidden_act']!r}; MAE uses exact 'gelu'")
    if not get("qkv_bias", True):
        raise ValueError("config: qkv_bias=False; MaskedAutoencoderViT always has qkv biases")
    eps = get("layer_norm_eps", 1e-12)
    size = get("image_size", 224)
    return dict(image_size=tuple(size) if isinstance(size, (list, tuple)) else size,
                patch_size=get("patch_size", 16), num_channels=get("num_channels", 3), embed_dim=hidden,
                depth=get("num_hidden_layers", 12), num_heads=get("num_attention_heads", 12),
                decoder_embed_dim=dec_hidden, decoder_depth=get("decoder_num_hidden_layers", 8),
                decoder_num_heads=get("decoder_num_attention_heads", 16), mlp_ratio=inter / hidden,
                mask_ratio=get("mask_ratio", 0.75), norm_pix_loss=get("norm_pix_loss", False),
                layer_norm_eps=eps)


def _warn_on_eps(fields: Mapping[str, Any]) -> None:
    eps = fields.get("layer_norm_eps", 1e-6)
    if eps != 1e-6:  # the Hub's MAE configs carry transformers' default 1e-12
        logging.warning("layer_norm_eps=%g where the official MAE uses 1e-6; the model keeps %g to reproduce "
                        "the checkpoint's source (override layer_norm_eps to change it)", eps, eps)


def save_hf(params: PyTree, model: models.MaskedAutoencoderViT, directory: str | os.PathLike) -> None:
    """Writes `config.json` + `model.safetensors` that `ViTMAEForPreTraining.from_pretrained` loads.

    Each file is written under a temporary name and renamed when complete, `config.json` (which makes the
    directory a Hugging Face one) last, so an interrupted export is never read back as a whole one.
    """
    from safetensors.numpy import save_file

    if isinstance(model, models.ViTClassifier):
        raise ValueError("--to hf writes a ViTMAEForPreTraining; a ViTClassifier exports with --to official "
                         "(models_vit) or --to flax")
    config = hf_config(model)
    os.makedirs(directory, exist_ok=True)
    sd = to_torch(params, model, format="hf")
    with _written(os.path.join(directory, "model.safetensors")) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp, metadata={"format": "pt"})
    with _written(os.path.join(directory, "config.json")) as tmp, open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    logging.info("Wrote a Hugging Face ViTMAEForPreTraining (%d tensors) to %s", len(sd), directory)


def save_official(variables: PyTree, model: Model, path: str | os.PathLike) -> None:
    """Writes `torch.save({"model": state_dict, "mae_jax_model": fields})`: the official loaders read "model"
    (strict=True fits), and `load_model` rebuilds the architecture from the constructor fields."""
    import torch

    sd = to_torch(variables, model, format="official")
    record = {"model": {k: torch.from_numpy(v) for k, v in sd.items()},
              MODEL_FIELDS_KEY: checkpoints._jsonable(models.constructor_fields(model))}
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory: expected the name of the .pth file to write")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _written(path) as tmp:
        torch.save(record, tmp)
    logging.info("Wrote an official %s state dict (%d tensors, under 'model') to %s",
                 "models_vit" if isinstance(model, models.ViTClassifier) else "MAE", len(sd), path)


@contextlib.contextmanager
def _written(path: str) -> Iterator[str]:
    """Yields a temporary name next to `path`, renamed to `path` if the block succeeds, removed otherwise."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_hf_weights(directory: str) -> dict[str, Any]:
    """The state dict of a HF directory: (sharded) safetensors without torch, or pytorch_model.bin."""
    def path(name):
        return os.path.join(directory, name)

    for weights, index in (("model.safetensors", "model.safetensors.index.json"),
                           ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.exists(path(weights)):
            files = [path(weights)]
        elif os.path.exists(path(index)):
            with open(path(index)) as f:
                files = sorted({path(name) for name in json.load(f)["weight_map"].values()})
        else:
            continue
        sd = {}
        for file in files:
            sd.update(_read_file(file))
        return sd
    raise CheckpointError(f"{directory} has a config.json but no weights: expected model.safetensors or "
                          "pytorch_model.bin (or their sharded .index.json) next to it")


def load_hf(directory: str | os.PathLike, **overrides: Any) -> tuple[models.MaskedAutoencoderViT, PyTree]:
    """A Hugging Face ViTMAEForPreTraining directory -> (model, params). Needs no torch for safetensors.

    The architecture comes from `config.json` (`overrides` replace fields, e.g. `scan_blocks=True`). The
    position tables are checked; `load_variables(directory, model)` also returns them.
    """
    directory = os.fspath(directory)
    with _reading(directory):
        fields = _read_hf_config(directory) | overrides
        _warn_on_eps(fields)
        model = models.MaskedAutoencoderViT(**fields)
        params = from_torch(_read_hf_weights(directory), model)
    logging.info("Loaded a Hugging Face ViTMAE from %s", directory)
    return model, params


# ---------------------------------------------------------------------------------------------------------
# Any source on disk.
# ---------------------------------------------------------------------------------------------------------


EXPECTED_SOURCES = ("an official MAE .pth (torch.save), a .safetensors file, a Hugging Face ViTMAE directory "
                    "(config.json + weights) or a mae_jax checkpoint (workdir, checkpoints directory, step or export)")


def _read_hf_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): expected a Hugging Face ViTMAE config") from None
    if not isinstance(config, Mapping) or config.get("model_type", "vit_mae") != "vit_mae":
        found = config.get("model_type") if isinstance(config, Mapping) else type(config).__name__
        raise CheckpointError(f"{path} describes a {found!r} model: expected a Hugging Face ViTMAE config "
                              "(model_type 'vit_mae')")
    return _fields_from_hf_config(config)


def _torch_load(path: str) -> Any:
    """torch.load with weights_only=True (official checkpoints also hold an argparse.Namespace); torch's
    errors, and its advice to load unsafely, become one line saying what the file is not."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {path} needs PyTorch: pip install -e '.[torch]' (or convert it to "
                              ".safetensors)") from None
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, KeyError, ... per kind of damage
            message = str(e)
            unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
            if unsupported:
                found = f"it pickles Python objects ({unsupported.group(1)}), which are not loaded, for safety"
            elif "central directory" in message or "zip archive" in message:
                found = "a truncated or damaged torch.save zip archive"
            elif _text_start(path) is not None:
                found = f"a text file (it starts {_text_start(path)!r}), not a PyTorch checkpoint"
            else:  # legacy-pickle parsing of arbitrary bytes fails in many ways, none of them informative
                found = "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle of tensors)"
            raise CheckpointError(f"{path}: {found}; expected a state dict saved by torch.save") from None


def _text_start(path: str, length: int = 40) -> str | None:
    """The first line of `path` (up to `length` characters) if the file starts as UTF-8 text, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at 512 bytes is fine
    except (OSError, UnicodeDecodeError):
        return None
    if not text.strip() or any(c < " " and c not in "\t\r\n" for c in text):
        return None
    return text.strip().splitlines()[0][:length]


def _read_file(path: str) -> Any:
    """A weights file's contents: `.safetensors` without torch, anything else with `torch.load`."""
    if not path.endswith(".safetensors"):
        return _torch_load(path)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: a truncated or damaged .safetensors file ({e}); expected a complete "
                              "safetensors file of tensors") from None


def _fields_from_record(record: Mapping[str, Any], path: str) -> dict[str, Any]:
    """Constructor fields as our exports record them (JSON types) -> fields for their model class."""
    known = {f.name for f in dataclasses.fields(models.model_class(record))}
    fields = {k: v for k, v in record.items() if k in known}
    if isinstance(fields.get("image_size"), list):
        fields["image_size"] = tuple(fields["image_size"])
    ignored = sorted(set(record) - known)
    if ignored:
        logging.warning("%s records model fields this version does not know, ignored: %s", path, ignored)
    return fields


def _describe_directory(path: str) -> str:
    names = sorted(os.listdir(path))
    if not names:
        return "it is empty"
    return f"it holds {', '.join(names[:SHOW])}" + (f" and {len(names) - SHOW} more" if len(names) > SHOW else "")


def _read_source(path: str | os.PathLike, model: Model | None = None) -> dict:
    """Reads a checkpoint -> {"sd", "origin", "description", "fields" (or None), "hints"}."""
    path = os.fspath(path)
    if not os.path.exists(path):
        kind = "file" if os.path.lexists(path) else "path"
        raise CheckpointError(f"{path} does not exist{' (a dangling symbolic link)' if kind == 'file' else ''}: "
                              f"expected {EXPECTED_SOURCES}")
    # Ours first: a training workdir also holds a config.json (the training config).
    if os.path.isdir(path) and checkpoints.is_checkpoint(path):
        fields, variables = checkpoints.load_variables(path)
        if fields is None:
            if model is None:
                raise CheckpointError(f"{path} records no model fields: pass --variant")
            saved = model
        else:
            saved = models.model_class(fields)(**fields)
        sd = to_torch(variables, saved, format="official")
        return dict(sd=sd, origin={}, description=f"{path} (mae_jax checkpoint)", fields=fields, hints={})
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        fields = _read_hf_config(path)
        sd, origin, fmt = torch_layout.canonical(_read_hf_weights(path))
        return dict(sd=sd, origin=origin, description=f"{path} ({fmt})", fields=fields, hints={})
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory but not a checkpoint ({_describe_directory(path)}): expected "
                              f"{EXPECTED_SOURCES}")
    raw = _read_file(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}: expected a state dict (names -> tensors)")
    if isinstance(raw.get(MODEL_FIELDS_KEY), Mapping) and isinstance(raw.get("model"), Mapping):  # our export
        sd, origin, fmt = torch_layout.canonical(raw["model"])
        return dict(sd=sd, origin=origin, description=f"{path} ({fmt}, written by mae_jax)",
                    fields=_fields_from_record(raw[MODEL_FIELDS_KEY], path), hints={})
    hints = {}
    args = raw.get("args") if isinstance(raw.get("model"), Mapping) else None
    if args is not None:  # the official training script's argparse.Namespace
        args = vars(args) if hasattr(args, "__dict__") else dict(args)
        # main_pretrain.py's "mae_vit_base_patch16", main_finetune.py's "vit_base_patch16"
        match = re.fullmatch(r"(?:mae_)?vit_(base|large|huge)_patch(\d+)", str(args.get("model", "")))
        if match:
            hints["variant"] = f"{dict(base='B', large='L', huge='H')[match.group(1)]}/{match.group(2)}"
        hints.update({k: args[k] for k in ("mask_ratio", "norm_pix_loss") if k in args})
        if "input_size" in args:
            hints["image_size"] = args["input_size"]
    sd, origin, fmt = torch_layout.canonical(raw)
    return dict(sd=sd, origin=origin, description=f"{path} ({fmt})", fields=None, hints=hints)


@contextlib.contextmanager
def _reading(path: str | os.PathLike) -> Iterator[None]:
    """Turns any failure to read `path` into one CheckpointError, in one line that names the path."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as e:
        message = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
        if os.fspath(path) not in message:
            message = f"{os.fspath(path)}: {message}"
        raise CheckpointError(message) from e


def load_variables(path: str | os.PathLike, model: Model,
                   base_variables: PyTree | None = None, strict: bool = True) -> dict:
    """Reads any supported checkpoint into {"params", "constants"} (numpy) shaped for `model`; for a ViTClassifier
    {"params"}, with head_batch_norm {"params", "batch_stats"} (what `model.apply` takes).

    `path`: an official `.pth` (bare state dict or a training checkpoint), a `.safetensors` file, a Hugging
    Face directory, or our Orbax checkpoint / export (workdir, checkpoints dir or step dir). What the source
    lacks comes from `base_variables` (else a fresh init) and is logged; position tables are interpolated
    when the grid differs. For `config.init_from`. Raises CheckpointError (one line naming `path`) when the
    source is missing, unreadable or does not fit `model`.
    """
    with _reading(path):
        source = _read_source(path, model)
        logging.info("Loading %s: %d tensors", source["description"], len(source["sd"]))
        return _variables_from_official(source["sd"], source["origin"], model, base_variables, strict,
                                        source["description"])


def _classifier_fields_from_keys(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """num_classes, global_pool and head_batch_norm of an official classifier state dict (models_vit, or
    main_linprobe.py's `head.0` BatchNorm1d + `head.1` Linear); {} for a pretraining one."""
    for linear, batch_norm in (("head.weight", False), ("head.1.weight", True)):
        if linear in sd:
            return dict(num_classes=sd[linear].shape[0], global_pool="fc_norm.weight" in sd,
                        head_batch_norm=batch_norm or "head.0.running_mean" in sd)
    return {}


def _infer_fields(sd: Mapping[str, np.ndarray], variant: str | None = None) -> dict[str, Any]:
    """Constructor fields from the shapes of an official state dict; num_heads from the variant table.
    A classifier's also hold num_classes, global_pool and head_batch_norm (from its keys).

    With `variant` (e.g. "B/16"), its fields are used and only what shapes cannot contradict (the image
    size, from the position table) is taken from the checkpoint.
    """
    fields = models.variant(variant) if variant else {}
    fields.update(_classifier_fields_from_keys(sd))
    p = sd["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in sd else fields.get("patch_size")
    if "pos_embed" in sd and p:
        side = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
        if side * side == sd["pos_embed"].shape[1] - 1:
            fields["image_size"] = side * p
    if variant:
        return fields
    if "patch_embed.proj.weight" not in sd:
        raise ValueError("cannot infer the architecture without patch_embed.proj.weight: pass a variant")
    embed_dim, channels = sd["patch_embed.proj.weight"].shape[:2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    fields.update(patch_size=p, num_channels=channels, embed_dim=embed_dim, depth=depth)
    if "blocks.0.mlp.fc1.weight" in sd:
        fields["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    if "decoder_embed.weight" in sd:
        fields["decoder_embed_dim"] = sd["decoder_embed.weight"].shape[0]
        fields["decoder_depth"] = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    known = [models.variant(v.format(patch=p)) for v in models.VARIANTS]
    heads = {(f["embed_dim"], f["depth"]): f["num_heads"] for f in known}
    heads_any = {f["embed_dim"]: f["num_heads"] for f in known}
    dec_heads = {f["decoder_embed_dim"]: f["decoder_num_heads"] for f in known}
    fields["num_heads"] = heads.get((embed_dim, depth), heads_any.get(embed_dim))
    if "decoder_embed_dim" in fields:
        fields["decoder_num_heads"] = dec_heads.get(fields["decoder_embed_dim"])
    unknown = [k for k in ("num_heads", "decoder_num_heads") if k in fields and fields[k] is None]
    if unknown:
        raise ValueError(f"cannot infer {unknown} from shapes (embed_dim {embed_dim}, decoder_embed_dim "
                         f"{fields.get('decoder_embed_dim')}): pass a variant, e.g. --variant B/16")
    return fields


def _model_fields(source: dict, variant: str | None, image_size: int | None) -> dict[str, Any]:
    """The architecture for the CLI: the variant, else recorded fields, else inferred from shapes."""
    hints = source["hints"]
    variant = variant or hints.get("variant")
    sd = source["sd"]
    if (variant or source["fields"] is None) and _classifier_fields_from_keys(sd):  # an official classifier
        fields = models.classifier_fields(_infer_fields(sd, variant))
        if "pos_embed" not in sd and "image_size" in hints:
            fields["image_size"] = hints["image_size"]
    elif variant or source["fields"] is None:
        fields = _infer_fields(sd, variant)
        if "decoder_embed_dim" not in fields:
            fields.update({k: v for k, v in models.variant("B/16").items() if k.startswith("decoder_")})
            logging.info("No decoder in the checkpoint: using the paper's decoder %s",
                         {k: v for k, v in fields.items() if k.startswith("decoder_")})
        if "pos_embed" not in sd and "image_size" in hints:
            fields["image_size"] = hints["image_size"]
        fields.update({k: hints[k] for k in ("mask_ratio", "norm_pix_loss") if k in hints})
        if source["fields"] is not None:  # a variant over a source that records its training settings
            fields.update({k: source["fields"][k] for k in ("mask_ratio", "norm_pix_loss", "layer_norm_eps")
                           if k in source["fields"]})
    else:
        fields = dict(source["fields"])
    if image_size:
        fields["image_size"] = image_size
    return fields


def load_model(path: str | os.PathLike, variant: str | None = None,
               **overrides: Any) -> tuple[Model, dict]:
    """(model, {"params", "constants"}; a classifier's variables as `load_variables`) from any supported checkpoint,
    the architecture read from its config, its recorded fields or its shapes (`variant`, e.g. "B/16", where they
    cannot tell).

    `overrides` replace constructor fields, e.g. `image_size=(448, 448)` (position tables interpolated) or
    `mask_ratio=0.5`. Raises CheckpointError (one line naming `path`) for a source that cannot be read.
    """
    if variant:
        models.variant(variant)  # an unknown name is the caller's error, not the checkpoint's
    with _reading(path):
        source = _read_source(path)
        fields = _model_fields(source, variant, None)
        fields.update(overrides)
        _warn_on_eps(fields)
        model = models.model_class(fields)(**fields)
        logging.info("Read %s: %d tensors, %.2fM values; model %s", source["description"], len(source["sd"]),
                     sum(v.size for v in source["sd"].values()) / 1e6, models.constructor_fields(model))
        variables = _variables_from_official(source["sd"], source["origin"], model, None, True,
                                             source["description"])
    return model, variables


def _parse_flags(argv: list[str]) -> argparse.Namespace:
    parser = argparse_flags.ArgumentParser(  # also parses absl's own flags (--verbosity, ...)
        prog="python -m mae_jax.convert",
        description="Convert MAE weights between an official .pth, a Hugging Face directory and our format. "
                    "Errors are one line; -v 1 also shows third-party logs and an error's traceback.")
    parser.add_argument("input", help="official .pth / .safetensors, Hugging Face directory, or our checkpoint")
    parser.add_argument("output", help="directory (flax, hf) or file (official) to write")
    parser.add_argument("--to", choices=("flax", "official", "hf"), default=None,
                        help="output format; default: official if OUTPUT ends in .pth/.pt, else flax")
    parser.add_argument("--variant", default=None, help="architecture, e.g. B/16, when shapes cannot tell")
    parser.add_argument("--image_size", type=int, default=None,
                        help="target image size (position tables interpolated bicubically)")
    return parser.parse_args(argv[1:])


def main(args: argparse.Namespace) -> None:
    with runtime.one_line_errors("python -m mae_jax.convert"):  # bad input or output
        overrides = {"image_size": args.image_size} if args.image_size else {}
        model, variables = load_model(args.input, args.variant, **overrides)
        to = args.to or ("official" if args.output.endswith((".pth", ".pt")) else "flax")
        if to == "flax":
            step_dir = checkpoints.save_variables(args.output, variables,
                                                  models.constructor_fields(model))
            logging.info("Wrote our checkpoint to %s", step_dir)
        elif to == "official":
            save_official(variables, model, args.output)
        else:
            save_hf(variables, model, args.output)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
