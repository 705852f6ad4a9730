"""The reference side of the variant parity tests: facebookresearch/mae `models_mae.MaskedAutoencoderViT`,
transcribed on the official (timm 0.3.2) blocks of torch_reference, with the paper's ablation switches added
the way the paper describes them. Nothing here imports mae_jax.

- `encoder_mask_tokens` (Table 1c, "w/ [M]"): the encoder runs on all L patches, the masked ones replaced by a
  learned `encoder_mask_token` before the position embedding is added; the decoder embeds every encoder token
  and adds its position embedding: no decoder mask token, no unshuffle.
- `loss_on_all` (Sec. 3): `forward_loss` without the mask weighting, the mean over every patch.

`random_masking` takes the noise (as Hugging Face's ViTMAE does) instead of drawing `torch.rand`; the rest is
the official code (patchify generalised to our (p, q, c) order, which is the official one).
"""

from __future__ import annotations

import numpy as np
import torch

import torch_reference


class OfficialMAE(torch.nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=False,
                 eps=1e-6, encoder_mask_tokens=False, loss_on_all=False):
        super().__init__()
        self.patch_embed = torch_reference.TimmPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.patch_size = patch_size
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = torch.nn.ModuleList([torch_reference.TimmBlock(embed_dim, num_heads, mlp_ratio, 0.0, eps)
                                           for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(embed_dim, eps=eps)
        self.decoder_embed = torch.nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        if encoder_mask_tokens:
            self.encoder_mask_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = torch.nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                                    requires_grad=False)
        self.decoder_blocks = torch.nn.ModuleList([
            torch_reference.TimmBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio, 0.0, eps)
            for _ in range(decoder_depth)])
        self.decoder_norm = torch.nn.LayerNorm(decoder_embed_dim, eps=eps)
        self.decoder_pred = torch.nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.encoder_mask_tokens = encoder_mask_tokens
        self.loss_on_all = loss_on_all

    def patchify(self, imgs):
        p = self.patch_size
        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], imgs.shape[1], h, p, w, p))
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(shape=(imgs.shape[0], h * w, p**2 * imgs.shape[1]))

    def random_masking(self, x, mask_ratio, noise):
        N, L, D = x.shape  # batch, length, dim
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise):
        x = self.patch_embed(x)
        if self.encoder_mask_tokens:
            # w/ [M]: every patch stays; the removed ones become the encoder's mask token, then positions.
            _, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            m = mask.unsqueeze(-1)
            x = x * (1 - m) + self.encoder_mask_token * m
            x = x + self.pos_embed[:, 1:, :]
        else:
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        if not self.encoder_mask_tokens:  # w/ [M]: the encoder's tokens are already all there, in order
            mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
            x = torch.cat([x[:, :1, :], x_], dim=1)  # append cls token
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6)**.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
        if self.loss_on_all:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()  # mean loss on removed patches

    def forward(self, imgs, noise, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask, latent


def official_mae(fields: dict, encoder_mask_tokens: bool = False, loss_on_all: bool = False,
                 seed: int = 0) -> OfficialMAE:
    """An OfficialMAE of our constructor `fields`' sizes (square images), every trainable tensor random
    (torch_reference.randomize_ scales) and the official sin-cos tables."""
    size = fields["image_size"]
    size = size if isinstance(size, int) else size[0]
    model = OfficialMAE(size, fields["patch_size"], fields.get("num_channels", 3), fields["embed_dim"],
                        fields["depth"], fields["num_heads"], fields["decoder_embed_dim"], fields["decoder_depth"],
                        fields["decoder_num_heads"], fields.get("mlp_ratio", 4.0), fields.get("norm_pix_loss", False),
                        fields.get("layer_norm_eps", 1e-6), encoder_mask_tokens, loss_on_all)
    torch_reference.randomize_(model, seed)
    grid = size // fields["patch_size"]
    with torch.no_grad():
        for name in ("pos_embed", "decoder_pos_embed"):
            param = getattr(model, name)
            table = torch_reference.official_sincos_pos_embed(param.shape[-1], grid, grid, cls_token=True)
            param.copy_(torch.from_numpy(table).float()[None])
    return model


def to_flax(tensors: dict, depth: int, decoder_depth: int) -> dict:
    """Official names (a state dict, or the grads by parameter name) -> our {"params", "constants"} layout.
    Test-local mapping, independent of mae_jax."""
    sd = {k: (v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.float32)
          for k, v in tensors.items()}

    def dense(prefix):
        return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}

    def norm(prefix):
        return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

    def block(prefix):
        return {"norm1": norm(prefix + ".norm1"), "norm2": norm(prefix + ".norm2"),
                "attn": {"qkv": dense(prefix + ".attn.qkv"), "proj": dense(prefix + ".attn.proj")},
                "mlp": {"fc1": dense(prefix + ".mlp.fc1"), "fc2": dense(prefix + ".mlp.fc2")}}

    conv = sd["patch_embed.proj.weight"]  # [D, C, p, q] -> [(p, q, c), D]
    params = {"patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                              "bias": sd["patch_embed.proj.bias"]},
              "cls_token": sd["cls_token"], "norm": norm("norm"), "decoder_embed": dense("decoder_embed"),
              "decoder_norm": norm("decoder_norm"), "decoder_pred": dense("decoder_pred")}
    for token in ("mask_token", "encoder_mask_token"):
        if token in sd:
            params[token] = sd[token]
    for i in range(depth):
        params[f"blocks_{i}"] = block(f"blocks.{i}")
    for i in range(decoder_depth):
        params[f"decoder_blocks_{i}"] = block(f"decoder_blocks.{i}")
    out = {"params": params}
    if "pos_embed" in sd:
        out["constants"] = {"pos_embed": sd["pos_embed"], "decoder_pos_embed": sd["decoder_pos_embed"]}
    return out


def grads(model: OfficialMAE) -> dict:
    """The .grad of every trainable tensor by official name (zeros where no gradient flowed)."""
    return {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()
            if p.requires_grad}
