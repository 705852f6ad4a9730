"""The independent oracle: Hugging Face `ViTMAEForPreTraining` in PyTorch, and the official formulas.

Nothing here imports mae_jax: this module builds the reference side of every parity test.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import transformers


def official_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py, generalised to an (h, w) grid exactly as the code reads."""
    gh = np.arange(grid_h, dtype=np.float32)
    gw = np.arange(grid_w, dtype=np.float32)
    grid = np.meshgrid(gw, gh)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])

    def from_grid_1d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([from_grid_1d(embed_dim // 2, grid[0]), from_grid_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def hf_config(fields: dict, **extra) -> transformers.ViTMAEConfig:
    """A ViTMAEConfig with the sizes of our constructor `fields` and the official eps 1e-6."""
    size = fields["image_size"]
    return transformers.ViTMAEConfig(
        image_size=size if isinstance(size, int) else list(size),
        patch_size=fields["patch_size"],
        num_channels=fields.get("num_channels", 3),
        hidden_size=fields["embed_dim"],
        num_hidden_layers=fields["depth"],
        num_attention_heads=fields["num_heads"],
        intermediate_size=int(fields["embed_dim"] * fields.get("mlp_ratio", 4.0)),
        decoder_hidden_size=fields["decoder_embed_dim"],
        decoder_num_hidden_layers=fields["decoder_depth"],
        decoder_num_attention_heads=fields["decoder_num_heads"],
        decoder_intermediate_size=int(fields["decoder_embed_dim"] * fields.get("mlp_ratio", 4.0)),
        mask_ratio=fields.get("mask_ratio", 0.75),
        norm_pix_loss=fields.get("norm_pix_loss", False),
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        **extra,
    )


def random_hf_model(fields: dict, seed: int = 0) -> transformers.ViTMAEForPreTraining:
    """A ViTMAEForPreTraining with every trainable tensor random and the official sin-cos tables.

    Weights ~ N(0, 0.02) (the reference init scale, so activations stay sane at depth 12+), biases and
    LayerNorm offsets ~ N(0, 0.05), LayerNorm scales ~ 1 + N(0, 0.1), tokens ~ N(0, 0.02).
    """
    torch.manual_seed(seed)
    size = fields["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    # HF builds square position tables only; for a non-square size build it square, then resize the
    # tables and the size it checks inputs against (its encoder and decoder code handle any L).
    model = transformers.ViTMAEForPreTraining(hf_config(dict(fields, image_size=height))).eval()
    grid_h, grid_w = height // fields["patch_size"], width // fields["patch_size"]
    if width != height:
        model.config.image_size = [height, width]
        model.vit.embeddings.image_size = (height, width)
        num = 1 + grid_h * grid_w
        model.vit.embeddings.position_embeddings = torch.nn.Parameter(
            torch.zeros(1, num, fields["embed_dim"]), requires_grad=False)
        model.decoder.decoder_pos_embed = torch.nn.Parameter(
            torch.zeros(1, num, fields["decoder_embed_dim"]), requires_grad=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pos_embed" in name or "position_embeddings" in name:
                table = official_sincos_pos_embed(param.shape[-1], grid_h, grid_w, cls_token=True)
                param.copy_(torch.from_numpy(table).float()[None])
            elif "layernorm" in name or "norm" in name.split(".")[-2]:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + torch.randn_like(param) * 0.1)
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.05)
            else:
                param.copy_(torch.randn_like(param) * 0.02)
    return model


def hf_to_flax(model: transformers.ViTMAEForPreTraining) -> dict:
    """Our {"params", "constants"} from the model's in-memory (transformers 5) state dict. Test-local mapping."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    return hf_tensors_to_flax(sd, model.config)


def hf_grads_to_flax(model: transformers.ViTMAEForPreTraining) -> dict:
    """The .grad of every trainable tensor, laid out as our params."""
    sd = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().astype(np.float32)
          for k, p in model.named_parameters()}
    return hf_tensors_to_flax(sd, model.config)["params"]


def hf_tensors_to_flax(sd: dict, config) -> dict:
    """HF (transformers 5, in memory) names -> our {"params", "constants"} layout."""

    def dense(prefix):
        return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}

    def norm(prefix):
        return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

    def block(prefix):
        qkv = [dense(f"{prefix}.attention.{n}_proj") for n in "qkv"]
        return {
            "norm1": norm(prefix + ".layernorm_before"),
            "attn": {
                "qkv": {"kernel": np.concatenate([d["kernel"] for d in qkv], axis=1),
                        "bias": np.concatenate([d["bias"] for d in qkv])},
                "proj": dense(prefix + ".attention.o_proj"),
            },
            "norm2": norm(prefix + ".layernorm_after"),
            "mlp": {"fc1": dense(prefix + ".mlp.fc1"), "fc2": dense(prefix + ".mlp.fc2")},
        }

    conv = sd["vit.embeddings.patch_embeddings.projection.weight"]  # [D, C, p, q]
    params = {
        "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                        "bias": sd["vit.embeddings.patch_embeddings.projection.bias"]},
        "cls_token": sd["vit.embeddings.cls_token"],
        "norm": norm("vit.layernorm"),
        "decoder_embed": dense("decoder.decoder_embed"),
        "mask_token": sd["decoder.mask_token"],
        "decoder_norm": norm("decoder.decoder_norm"),
        "decoder_pred": dense("decoder.decoder_pred"),
    }
    for i in range(config.num_hidden_layers):
        params[f"blocks_{i}"] = block(f"vit.layers.{i}")
    for i in range(config.decoder_num_hidden_layers):
        params[f"decoder_blocks_{i}"] = block(f"decoder.decoder_layers.{i}")
    constants = {"pos_embed": sd["vit.embeddings.position_embeddings"],
                 "decoder_pos_embed": sd["decoder.decoder_pos_embed"]}
    return {"params": params, "constants": constants}


def hf_to_official(model: transformers.ViTMAEForPreTraining, decoder: bool = True) -> dict[str, np.ndarray]:
    """The official facebookresearch/mae state dict (models_mae.py names, torch layouts, fused qkv) of an HF
    model, from its in-memory (transformers 5) names. Test-local mapping, independent of mae_jax."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
    }

    def block(official, hf):
        for kind in ("weight", "bias"):
            out[f"{official}.norm1.{kind}"] = sd[f"{hf}.layernorm_before.{kind}"]
            out[f"{official}.attn.qkv.{kind}"] = np.concatenate(
                [sd[f"{hf}.attention.{n}_proj.{kind}"] for n in "qkv"], axis=0)
            out[f"{official}.attn.proj.{kind}"] = sd[f"{hf}.attention.o_proj.{kind}"]
            out[f"{official}.norm2.{kind}"] = sd[f"{hf}.layernorm_after.{kind}"]
            out[f"{official}.mlp.fc1.{kind}"] = sd[f"{hf}.mlp.fc1.{kind}"]
            out[f"{official}.mlp.fc2.{kind}"] = sd[f"{hf}.mlp.fc2.{kind}"]

    for i in range(model.config.num_hidden_layers):
        block(f"blocks.{i}", f"vit.layers.{i}")
    if decoder:
        out["mask_token"] = sd["decoder.mask_token"]
        out["decoder_pos_embed"] = sd["decoder.decoder_pos_embed"]
        for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
            for kind in ("weight", "bias"):
                out[f"{name}.{kind}"] = sd[f"decoder.{name}.{kind}"]
        for i in range(model.config.decoder_num_hidden_layers):
            block(f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}")
    return out


def hub_names(state_dict: dict) -> dict:
    """transformers 5 in-memory names -> the Hub's transformers 4 names (what Hub checkpoints carry)."""
    renames = [(r"^vit\.layers\.", "vit.encoder.layer."),
               (r"\.attention\.q_proj\.", ".attention.attention.query."),
               (r"\.attention\.k_proj\.", ".attention.attention.key."),
               (r"\.attention\.v_proj\.", ".attention.attention.value."),
               (r"\.attention\.o_proj\.", ".attention.output.dense."),
               (r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.mlp\.fc2\.", ".output.dense.")]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def official_interpolate_pos_embed(pos_embed: np.ndarray, src_grid: tuple, dst_grid: tuple) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py `interpolate_pos_embed`, generalised to (h, w) grids."""
    table = torch.from_numpy(np.asarray(pos_embed, np.float32))
    extra, tokens = table[:, :1], table[:, 1:]
    tokens = tokens.reshape(-1, src_grid[0], src_grid[1], table.shape[-1]).permute(0, 3, 1, 2)
    tokens = torch.nn.functional.interpolate(tokens, size=tuple(dst_grid), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra, tokens), dim=1).numpy()


# ---------------------------------------------------------------------------------------------------------
# The fine-tuning model: facebookresearch/mae `models_vit.VisionTransformer`, i.e. timm 0.3.2's
# VisionTransformer (timm/models/vision_transformer.py, timm/models/layers/drop.py) plus MAE's global pool,
# transcribed (dropout layers, all rate 0 in MAE, and the hybrid backbone left out; init not needed here).
# ---------------------------------------------------------------------------------------------------------


def timm_drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """timm 0.3.2 `drop_path`: per-sample stochastic depth."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class TimmDropPath(torch.nn.Module):
    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return timm_drop_path(x, self.drop_prob, self.training)


class TimmMlp(torch.nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_features, hidden_features)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmAttention(torch.nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = torch.nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TimmBlock(torch.nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, eps: float):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=eps)
        self.attn = TimmAttention(dim, num_heads)
        self.drop_path = TimmDropPath(drop_path) if drop_path > 0.0 else torch.nn.Identity()
        self.norm2 = torch.nn.LayerNorm(dim, eps=eps)
        self.mlp = TimmMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class TimmPatchEmbed(torch.nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = torch.nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialVisionTransformer(torch.nn.Module):
    """models_vit.VisionTransformer (timm 0.3.2 VisionTransformer with qkv_bias, LayerNorm eps 1e-6 as
    models_vit's vit_*_patch* builders, and `global_pool`: mean of x[:, 1:] -> fc_norm, `norm` deleted)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, drop_path_rate=0.0, global_pool=False, eps=1e-6):
        super().__init__()
        self.patch_embed = TimmPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # stochastic depth decay rule
        self.blocks = torch.nn.ModuleList([TimmBlock(embed_dim, num_heads, mlp_ratio, dpr[i], eps)
                                           for i in range(depth)])
        self.norm = torch.nn.LayerNorm(embed_dim, eps=eps)
        self.head = torch.nn.Linear(embed_dim, num_classes) if num_classes > 0 else torch.nn.Identity()
        self.global_pool = global_pool
        if self.global_pool:
            self.fc_norm = torch.nn.LayerNorm(embed_dim, eps=eps)
            del self.norm  # remove the original norm

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            x = x[:, 1:, :].mean(dim=1)  # global pool without cls token
            outcome = self.fc_norm(x)
        else:
            x = self.norm(x)
            outcome = x[:, 0]
        return outcome

    def forward(self, x):
        return self.head(self.forward_features(x))


def official_vit(fields: dict, num_classes: int, global_pool: bool,
                 drop_path_rate: float = 0.0) -> OfficialVisionTransformer:
    """The official classifier with the sizes of our (MaskedAutoencoderViT or ViTClassifier) `fields`."""
    return OfficialVisionTransformer(
        img_size=fields["image_size"], patch_size=fields["patch_size"], in_chans=fields.get("num_channels", 3),
        num_classes=num_classes, embed_dim=fields["embed_dim"], depth=fields["depth"],
        num_heads=fields["num_heads"], mlp_ratio=fields.get("mlp_ratio", 4.0), drop_path_rate=drop_path_rate,
        global_pool=global_pool, eps=fields.get("layer_norm_eps", 1e-6))


def randomize_(model: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """Makes every tensor of `model` random (scales as `random_hf_model`); returns its state dict as numpy."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            parts = name.split(".")
            if len(parts) > 1 and "norm" in parts[-2]:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + torch.randn_like(param) * 0.1)
            elif name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.05)
            else:
                param.copy_(torch.randn_like(param) * 0.02)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def official_linprobe_vit(fields: dict, num_classes: int, global_pool: bool = False) -> OfficialVisionTransformer:
    """main_linprobe.py's model: models_vit's classifier whose head becomes
    `Sequential(BatchNorm1d(D, affine=False, eps=1e-6), head)` (keys head.0.running_mean/var/num_batches_tracked,
    head.1.weight/bias)."""
    model = official_vit(fields, num_classes, global_pool)
    # for linear prob only
    # hack: revise model's head with BN
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    return model


def randomize_batch_norm_(model: torch.nn.Module, seed: int = 0, batches: int = 7) -> dict[str, np.ndarray]:
    """Random running statistics (mean ~ N(0, 0.5), var ~ U(0.5, 2)) and counter for every BatchNorm of `model`;
    returns its state dict as numpy."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=generator))
            module.num_batches_tracked.fill_(batches)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
