"""PyTorch key names and tensor layouts of MaskedAutoencoderViT and ViTClassifier: official facebookresearch/mae
and Hugging Face.

The canonical form is the official state dict (`models_mae.py` names: `blocks.{i}.attn.qkv.weight`, torch
layouts, float32 numpy; a ViTClassifier's are `models_vit.py`'s, with `pos_embed`, `fc_norm` or `norm`, `head`).
A linear-probe classifier (`head_batch_norm`) has main_linprobe.py's `head.0.running_mean`, `head.0.running_var`,
`head.0.num_batches_tracked` (int64, the one integer entry) and `head.1.{weight,bias}`.
`official_layout` maps it to our parameter paths (`batch_stats_layout` the BatchNorm's statistics to the
"batch_stats" collection); `hf_to_official` and `official_to_hf` rename Hugging Face ViTMAE keys (transformers
4 and 5) to and from it, fusing and splitting q, k, v by rows; `canonical` detects the format of any supported
state dict. No checks of fit, no files: `mae_jax.convert` owns those.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from mae_jax import models

Model = models.MaskedAutoencoderViT | models.ViTClassifier
POSITION_TABLES = ("pos_embed", "decoder_pos_embed")  # MaskedAutoencoderViT's constants (a ViTClassifier trains
# its pos_embed); in either model these are the tables that may come from another grid (interpolated)
CLASSIFIER_KEYS = ("head", "fc_norm")  # first name components only a fine-tuned classifier checkpoint has
SHOW = 8  # how many offending keys an error names per kind
COUNTER_SUFFIX = ".num_batches_tracked"  # torch BatchNorm's int64 counter: the only non-float entry kept as is

# ---------------------------------------------------------------------------------------------------------
# Official names <-> our parameter paths.
# ---------------------------------------------------------------------------------------------------------


def official_layout(model: Model) -> dict[str, tuple[tuple[str, ...], str]]:
    """Official key -> (path in the unscanned params, kind); kind "conv", "linear" (transpose) or "copy".

    MaskedAutoencoderViT: `models_mae` keys without the fixed position tables. ViTClassifier: `models_vit`
    keys, its trainable `pos_embed` included, `fc_norm` (global pool) or `norm`, and `head`.
    """
    out = {}

    def add(key, path, kind="copy"):
        out[key] = (tuple(path), kind)

    def linear(key, path):
        add(f"{key}.weight", (*path, "kernel"), "linear")
        add(f"{key}.bias", (*path, "bias"))

    def norm(key, path):
        add(f"{key}.weight", (*path, "scale"))
        add(f"{key}.bias", (*path, "bias"))

    def blocks(prefix, depth):
        for i in range(depth):
            norm(f"{prefix}.{i}.norm1", (f"{prefix}_{i}", "norm1"))
            linear(f"{prefix}.{i}.attn.qkv", (f"{prefix}_{i}", "attn", "qkv"))
            linear(f"{prefix}.{i}.attn.proj", (f"{prefix}_{i}", "attn", "proj"))
            norm(f"{prefix}.{i}.norm2", (f"{prefix}_{i}", "norm2"))
            linear(f"{prefix}.{i}.mlp.fc1", (f"{prefix}_{i}", "mlp", "fc1"))
            linear(f"{prefix}.{i}.mlp.fc2", (f"{prefix}_{i}", "mlp", "fc2"))

    add("cls_token", ["cls_token"])
    if isinstance(model, models.ViTClassifier):
        add("pos_embed", ["pos_embed"])
    add("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv")
    add("patch_embed.proj.bias", ("patch_embed", "bias"))
    blocks("blocks", model.depth)
    if isinstance(model, models.ViTClassifier):
        final_norm = "fc_norm" if model.global_pool else "norm"
        norm(final_norm, [final_norm])
        linear(head_linear_key(model), ["head"])
        return out
    norm("norm", ["norm"])
    if model.encoder_mask_tokens:  # Table 1c's "w/ [M]": no official counterpart; only mae_jax reads it back
        add("encoder_mask_token", ["encoder_mask_token"])
    else:
        add("mask_token", ["mask_token"])
    linear("decoder_embed", ["decoder_embed"])
    blocks("decoder_blocks", model.decoder_depth)
    norm("decoder_norm", ["decoder_norm"])
    linear("decoder_pred", ["decoder_pred"])
    return out


def head_linear_key(model: models.ViTClassifier) -> str:
    """The official name of the classifier's Linear: "head", or "head.1" behind main_linprobe.py's BatchNorm."""
    return "head.1" if model.head_batch_norm else "head"


def batch_stats_layout(model: Model) -> dict[str, tuple[str, ...]]:
    """Official key -> path in the "batch_stats" collection: main_linprobe.py's `head.0` BatchNorm1d buffers for
    a ViTClassifier with `head_batch_norm`, else nothing."""
    if not (isinstance(model, models.ViTClassifier) and model.head_batch_norm):
        return {}
    return {"head.0.running_mean": ("head_bn", "mean"), "head.0.running_var": ("head_bn", "var"),
            "head.0" + COUNTER_SUFFIX: ("head_bn", "num_batches_tracked")}


def is_decoder(key: str) -> bool:
    """Whether `key` belongs to the pretraining model only: the decoder, its mask token, or the encoder mask
    token of an `encoder_mask_tokens` model (which a classifier does not use either)."""
    return key.startswith(("decoder_", "mask_token", "encoder_mask_token"))


def is_classifier_key(key: str) -> bool:
    """Whether `key` belongs to a fine-tuned classifier's head (`head.*`, `fc_norm.*`)."""
    return key.split(".")[0] in CLASSIFIER_KEYS


def to_torch_layout(x: np.ndarray, kind: str, model: Model) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "conv":  # [p*q*C, D] Dense on (p, q, c) patch vectors -> conv weight [D, C, p, q]
        p = model.patch_size
        return np.ascontiguousarray(x.reshape(p, p, model.num_channels, -1).transpose(3, 2, 0, 1))
    return np.array(x)  # a copy: never alias the caller's arrays or tensors


def from_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "conv":
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0]))
    return np.array(x)


@functools.lru_cache(maxsize=16)
def expected_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """Official key -> torch-layout shape for `model`, the position tables and BatchNorm statistics included."""
    unscanned = model.clone(scan_blocks=False, remat="none")
    abstract = jax.eval_shape(functools.partial(models.init_variables, unscanned), jax.random.key(0))
    shapes = {}
    for key, (path, kind) in official_layout(model).items():
        shape = tuple(get(abstract["params"], path).shape)
        if kind == "linear":
            shape = shape[::-1]
        elif kind == "conv":
            shape = (shape[1], model.num_channels, model.patch_size, model.patch_size)
        shapes[key] = shape
    for key, table in abstract.get("constants", {}).items():
        shapes[key] = tuple(table.shape)
    for key, path in batch_stats_layout(model).items():
        shapes[key] = tuple(get(abstract["batch_stats"], path).shape)
    return shapes


def get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def unscan(params: Mapping) -> dict:
    """Scanned `blocks` / `decoder_blocks` subtrees (leading [depth] axis) -> `blocks_{i}`; else unchanged."""
    out = {}
    for name, value in params.items():
        if name in ("blocks", "decoder_blocks"):
            depth = jax.tree_util.tree_leaves(value)[0].shape[0]
            for i in range(depth):
                out[f"{name}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i], value)
        else:
            out[name] = value
    return out


def scan(params: dict, model: Model) -> dict:
    """Unscanned params -> the layout `model` expects (stacked blocks when `model.scan_blocks`)."""
    if not model.scan_blocks:
        return params
    out = {k: v for k, v in params.items() if not re.fullmatch(r"(decoder_)?blocks_\d+", k)}
    depths = [("blocks", model.depth)]
    if isinstance(model, models.MaskedAutoencoderViT):
        depths.append(("decoder_blocks", model.decoder_depth))
    for prefix, depth in depths:
        out[prefix] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[params[f"{prefix}_{i}"]
                                                                          for i in range(depth)])
    return out


# ---------------------------------------------------------------------------------------------------------
# Hugging Face names <-> official names.
# ---------------------------------------------------------------------------------------------------------

_HF_TOP = {  # after an optional "vit." prefix (ViTMAEModel checkpoints have none) and "decoder."
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DECODER_TOP = ("mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
                   "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")
# Block prefixes: transformers 4 (Hub), transformers 5 in memory, transformers 5 `save_pretrained`.
_HF_BLOCK = re.compile(r"(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)")
_HF_DECODER_BLOCK = re.compile(r"decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)")
# Module names inside a block, transformers 4 and 5; (q, k, v) -> row block of `attn.qkv`.
_HF_SUB = {"layernorm_before": "norm1", "layernorm_after": "norm2",
           "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
           "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2"}
_HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
           "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_HF_OUT = {  # export names: (encoder block prefix, decoder block prefix, sub-module names, q/k/v names)
    "hf": ("vit.encoder.layer", "decoder.decoder_layers",
           {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"},
           ("attention.attention.query", "attention.attention.key", "attention.attention.value")),
    "hf_t5": ("vit.layers", "decoder.decoder_layers",
              {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
              ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
}


def hf_to_official(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """HF names -> (official state dict, official key -> source name). Raises on keys it cannot place."""
    out, origin, qkv, unknown = {}, {}, {}, []
    for key, value in sd.items():
        name = key[len("vit."):] if key.startswith("vit.") else key
        block = _HF_BLOCK.fullmatch(key) or _HF_DECODER_BLOCK.fullmatch(key)
        if name in _HF_TOP:
            target = _HF_TOP[name]
        elif key.startswith("decoder.") and key[len("decoder."):] in _HF_DECODER_TOP:
            target = key[len("decoder."):]
        elif block and block.group(2) in _HF_SUB:
            prefix = "decoder_blocks" if key.startswith("decoder.") else "blocks"
            target = f"{prefix}.{block.group(1)}.{_HF_SUB[block.group(2)]}.{block.group(3)}"
        elif block and block.group(2) in _HF_QKV:
            prefix = "decoder_blocks" if key.startswith("decoder.") else "blocks"
            target = f"{prefix}.{block.group(1)}.attn.qkv.{block.group(3)}"
            qkv.setdefault(target, [None] * 3)[_HF_QKV[block.group(2)]] = (key, value)
            continue
        else:
            unknown.append(key)
            continue
        out[target], origin[target] = value, key
    if unknown:
        raise ValueError(f"unknown Hugging Face keys (not part of ViTMAEForPreTraining): {first_keys(unknown)}")
    for target, parts in qkv.items():
        present = [p for p in parts if p is not None]
        split = [p[0].rsplit(".", 2) for p in present]  # (prefix, module, weight|bias)
        label = f"{split[0][0]}.{{{','.join(s[1] for s in split)}}}.{split[0][2]}"
        if len(present) < 3:
            missing = [("query", "key", "value")[i] for i, p in enumerate(parts) if p is None]
            raise ValueError(f"incomplete attention projection in the checkpoint: {label} present, "
                             f"{missing} missing")
        shapes = {p[1].shape for p in present}
        if len(shapes) > 1:
            raise ValueError("query/key/value of different shapes in the checkpoint: "
                             + ", ".join(f"{k} {list(v.shape)}" for k, v in present))
        out[target] = np.concatenate([p[1] for p in present], axis=0)
        origin[target] = label
    return out, origin


def official_to_hf(sd: Mapping[str, np.ndarray], flavour: str = "hf") -> dict[str, np.ndarray]:
    """Official state dict -> HF names: "hf" the Hub's (transformers 4), "hf_t5" transformers 5 in memory."""
    encoder, decoder, sub, qkv = _HF_OUT[flavour]
    top = {v: "vit." + k for k, v in _HF_TOP.items()} | {k: "decoder." + k for k in _HF_DECODER_TOP}
    out = {}
    for key, value in sd.items():
        block = re.fullmatch(r"(decoder_blocks|blocks)\.(\d+)\.(.+)\.(weight|bias)", key)
        if not block:
            out[top[key]] = value
            continue
        prefix = f"{decoder if block.group(1) == 'decoder_blocks' else encoder}.{block.group(2)}"
        if block.group(3) == "attn.qkv":
            for part, piece in zip(qkv, np.split(value, 3, axis=0)):
                out[f"{prefix}.{part}.{block.group(4)}"] = np.ascontiguousarray(piece)
        else:
            out[f"{prefix}.{sub[block.group(3)]}.{block.group(4)}"] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Any supported state dict -> the official form.
# ---------------------------------------------------------------------------------------------------------


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    return np.asarray(value)


def first_keys(keys: list[str]) -> str:
    """The first SHOW keys, comma-separated, and how many more."""
    return ", ".join(keys[:SHOW]) + (f" and {len(keys) - SHOW} more" if len(keys) > SHOW else "")


def canonical(state_dict: Mapping[str, Any]) -> tuple[dict, dict, str]:
    """Any supported state dict -> (official state dict of float32 numpy, key -> source name, format).
    BatchNorm counters (`*.num_batches_tracked`) keep their integer dtype."""
    if isinstance(state_dict.get("model"), Mapping):  # an official training checkpoint
        others = sorted(k for k in state_dict if k != "model")
        if others:
            logging.info("Reading the 'model' entry of a training checkpoint; ignoring %s", others)
        state_dict = state_dict["model"]
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):  # saved from a DistributedDataParallel wrapper
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        keys = list(state_dict)
    sd = {k: to_numpy(v) for k, v in state_dict.items()}
    counters = {k for k, v in sd.items() if k.endswith(COUNTER_SUFFIX) and np.issubdtype(v.dtype, np.integer)}
    for key, value in sd.items():
        if key not in counters and not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"checkpoint entry {key} has dtype {value.dtype}; expected floating-point weights")
    dtypes = sorted({str(v.dtype) for k, v in sd.items() if k not in counters} - {"float32"})
    if dtypes:
        logging.info("Casting %s weights to float32", dtypes)
    is_hf = [k for k in keys if k.startswith(("vit.", "decoder.", "embeddings.", "encoder.layer.", "layers."))]
    is_official = [k for k in keys if k.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "blocks",
                                                          "norm", "mask_token", "decoder_blocks",
                                                          *CLASSIFIER_KEYS) or
                   k.startswith(("decoder_embed.", "decoder_norm.", "decoder_pred.", "decoder_pos_embed"))]
    if is_hf and is_official:
        raise ValueError(f"checkpoint mixes Hugging Face keys ({first_keys(is_hf[:2])}) with official keys "
                         f"({first_keys(is_official[:2])})")
    if is_hf:
        flavour = "transformers-5 in-memory" if any(re.search(r"_proj\.|\.mlp\.fc", k) for k in keys) \
            else "Hub / save_pretrained"
        official, origin = hf_to_official({k: v.astype(np.float32, copy=False) for k, v in sd.items()})
        return official, origin, f"Hugging Face ViTMAE ({flavour} names)"
    if not is_official:
        raise ValueError(f"unrecognised checkpoint: neither official MAE (models_mae / models_vit) nor Hugging "
                         f"Face ViTMAE keys "
                         f"(first keys: {first_keys(sorted(keys))})")
    fmt = "official fine-tuned ViT (models_vit)" if any(is_classifier_key(k) for k in keys) else "official MAE"
    if "head.0.running_mean" in sd:
        fmt = "official linear-probe ViT (models_vit, BatchNorm1d + Linear head)"
    return ({k: v if k in counters else v.astype(np.float32, copy=False) for k, v in sd.items()},
            {k: k for k in sd}, fmt)
