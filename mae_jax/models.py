"""Masked Autoencoder ViT (He et al. 2022) in Flax, numerically identical to the reference.

The reference is facebookresearch/mae `models_mae.py` (and Hugging Face's `ViTMAEForPreTraining`, which
ports it). Parameter names follow the official PyTorch module names (`patch_embed`, `blocks_{i}/attn/qkv`,
`decoder_pred`, ...) so that weight conversion is a rename plus a transpose.

Variables of a `MaskedAutoencoderViT`:
  params: everything the optimizer trains.
  constants: the two fixed sin-cos position tables, `pos_embed` [1, 1 + L, D] and `decoder_pos_embed`
    [1, 1 + L, D_dec]. They live outside `params` so that no optimizer can ever update them; checkpoints
    carry them so that interpolated or converted tables survive.

Usage:
  model = MaskedAutoencoderViT(**variant("B/16"))
  variables = model.init({"params": k1, "masking": k2}, images)   # images [N, H, W, C], normalised
  out = model.apply(variables, images, noise=noise)              # or rngs={"masking": key}
  noise = masking_noise(key, n, model)       # the noise of model.mask_sampling; mask_to_noise(mask): your own
  out.loss, out.pred, out.mask, out.ids_restore, out.latent
  features = model.apply(variables, images, method=model.features)  # [N, 1 + L, D], no masking

Fine-tuning uses `ViTClassifier` (the official `models_vit.VisionTransformer`: the same encoder over all
patches, a trainable `pos_embed`, global pool + `fc_norm` or cls token + `norm`, `head`, stochastic depth):
  classifier = ViTClassifier(**classifier_fields(variant("B/16"), num_classes=1000, drop_path_rate=0.1))
  variables = convert.load_variables("mae_pretrain_vit_base.pth", classifier)  # {"params"}, head fresh
  logits = classifier.apply(variables, images, train=True, rngs={"drop_path": key})  # [N, num_classes]
Linear probing: the same with `global_pool=False, head_batch_norm=True, head_init_std=0.01, frozen_encoder=True`;
variables are then {"params", "batch_stats"}, and train mode returns the updated statistics:
  logits, updates = classifier.apply(variables, images, train=True, mutable=["batch_stats"])

The transformer blocks of the encoder and the decoder are each one `Encoder` module (unrolled or `nn.scan`,
with optional remat and stochastic depth), which both models build through their shared base `_ViT`. Speed
work for XLA's CPU backend lives in `mae_jax/xla_cpu.py`; the `ops` field chooses it ("auto": on the CPU only)
or plain `jax.nn` ("generic"); both compute the same function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import attention as attention_lib
from mae_jax import masking, parallel, xla_cpu

Array = jax.Array
PyTree = Any

# ---------------------------------------------------------------------------------------------------------
# Variants, decoded in one place.
# ---------------------------------------------------------------------------------------------------------

# name -> (embed_dim, depth, num_heads). The patch size comes from the "/16" suffix.
_ENCODERS = {
    "test": (32, 2, 4),  # for unit tests: compiles and runs in a second
    "S": (384, 12, 6),
    "Ti": (192, 12, 3),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}
# The paper's light decoder, shared by every released model.
_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_DECODERS = {"test": dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)}

VARIANTS = tuple(f"{name}/{{patch}}" for name in _ENCODERS)


def variant(name: str, **overrides: Any) -> dict[str, Any]:
    """Every constructor field of a named variant such as "B/16", "L/16", "H/14" or "test/8".

    Returns a dict for `MaskedAutoencoderViT(**fields)` (defaults included, so that a config holding it
    can override any field); `overrides` replace any field.
    """
    try:
        size, patch = name.split("/")
        embed_dim, depth, num_heads = _ENCODERS[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        raise ValueError(
            f"variant {name!r} is not known: use '<size>/<patch>' with size one of {sorted(_ENCODERS)}, "
            "e.g. 'B/16', 'L/16', 'H/14'") from None
    fields = dict(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        **_DECODERS.get(size, _PAPER_DECODER),
    )
    fields.update(overrides)
    unknown = set(fields) - {f.name for f in dataclasses.fields(MaskedAutoencoderViT)}
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not fields of MaskedAutoencoderViT")
    return constructor_fields(MaskedAutoencoderViT(**fields))


# ---------------------------------------------------------------------------------------------------------
# Pure helpers.
# ---------------------------------------------------------------------------------------------------------


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def patchify(images: Array, patch_size: int) -> Array:
    """[N, H, W, C] images -> [N, L, p*p*C] patches in (p, q, c) order, patches row-major over the grid."""
    n, height, width, c = images.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size ({height}, {width}) is not divisible by patch_size {p}")
    h, w = height // p, width // p
    x = images.reshape(n, h, p, w, p, c)
    x = jnp.einsum("nhpwqc->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(patches: Array, patch_size: int, image_size: int | Sequence[int]) -> Array:
    """[N, L, p*p*C] patches -> [N, H, W, C] images; the inverse of `patchify`."""
    height, width = _pair(image_size)
    p = patch_size
    h, w = height // p, width // p
    n, length, dim = patches.shape
    if length != h * w or dim % (p * p):
        raise ValueError(
            f"patches of shape {patches.shape} do not tile an image of size {(height, width)} "
            f"with patch_size {p}: expected L = {h * w} and a multiple of {p * p} values per patch")
    c = dim // (p * p)
    x = patches.reshape(n, h, w, p, p, c)
    x = jnp.einsum("nhwpqc->nhpwqc", x)
    return x.reshape(n, height, width, c)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int],
                            cls_token: bool = False) -> np.ndarray:
    """The official fixed 2-D sin-cos position table, [(1 if cls_token) + h*w, embed_dim] float32.

    Layout as facebookresearch/mae `util/pos_embed.py`: the first half of the channels encodes the
    column (w) index as [sin, cos], the second half the row (h) index; rows run row-major over the grid.
    With `cls_token`, a zero row comes first. Computed in float64 like the reference, then cast.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} of a 2-D sin-cos position table must be divisible by 4")
    gh, gw = _pair(grid_size)
    omega = np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega  # [D/4]
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")

    def embed_1d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros([1, embed_dim]), table], axis=0)
    return table.astype(np.float32)


def position_tables(model: "MaskedAutoencoderViT") -> dict[str, np.ndarray]:
    """The exact sin-cos tables of `model`'s patch grid, as its "constants" collection holds them: `pos_embed`
    [1, 1 + L, D] and `decoder_pos_embed` [1, 1 + L, D_dec] (`get_2d_sincos_pos_embed`, cls row first). What a
    pretraining step at another image size uses: `position_tables(model.clone(image_size=(S, S)))`."""
    return {name: get_2d_sincos_pos_embed(dim, model.grid_size, cls_token=True)[None]
            for name, dim in (("pos_embed", model.embed_dim), ("decoder_pos_embed", model.decoder_embed_dim))}


def per_example_uniform(rng: Array, batch_size: int, length: int, offset: Array | int = 0) -> Array:
    """Masking noise [N, L] in [0, 1): example i draws from `fold_in(rng, offset + i)`.

    An example's noise depends only on its global index, never on the batch size, the number of devices
    or processes, so the same data gives the same masks however the batch is split.
    """
    index = jnp.arange(batch_size) + offset
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i), (length,)))(index)


def masking_noise(rng: Array, batch_size: int, model: "MaskedAutoencoderViT", offset: Array | int = 0) -> Array:
    """The masking noise [N, L] of `model`'s `mask_sampling` (what the train step and `__call__` without `noise`
    use): example i draws from `fold_in(rng, offset + i)`, as `per_example_uniform` (which "random" is).

    "block": BEiT's block-wise mask of `L - len_keep` patches (`masking.block_mask`), completed with uniformly
    random patches where its blocks fall short, so that exactly `len_keep` patches stay visible. "grid": one
    patch of every s x s cell visible (s = 2 at mask ratio 0.75), at a random offset per example.
    """
    if model.mask_sampling == "random":
        return per_example_uniform(rng, batch_size, model.num_patches, offset)
    if model.mask_sampling == "block":
        sample = functools.partial(masking.block_noise, grid_size=model.grid_size,
                                   num_masking_patches=model.num_patches - model.len_keep)
    else:
        sample = functools.partial(masking.grid_noise, grid_size=model.grid_size,
                                   cell=masking.grid_cell(model.mask_ratio))
    index = jnp.arange(batch_size) + offset
    return jax.vmap(lambda i: sample(jax.random.fold_in(rng, i)))(index)


mask_to_noise = masking.mask_to_noise  # a user's boolean mask [N, L] (True = removed) -> noise for `noise=`


def random_masking(x: Array, noise: Array, mask_ratio: float) -> tuple[Array, Array, Array]:
    """Per-example random masking by argsort of `noise`, as the official `random_masking`.

    Args:
      x: [N, L, D] tokens.
      noise: [N, L] values; the `len_keep = int(L * (1 - mask_ratio))` smallest are kept.
      mask_ratio: fraction of tokens removed.
    Returns:
      x_masked [N, len_keep, D], mask [N, L] (1 removed, 0 kept, original order), ids_restore [N, L].
    """
    n, length, _ = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
    mask = jnp.ones((n, length), jnp.float32).at[:, :len_keep].set(0.0)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return x_masked, mask, ids_restore


def patch_mean_std(patches: Array) -> tuple[Array, Array]:
    """Per-patch statistics of the norm-pix loss, [N, L, 1] each: the mean, and sqrt(var + 1e-6) with the
    unbiased variance (torch `.var()`), as the reference."""
    mean = patches.mean(axis=-1, keepdims=True)
    return mean, (patches.var(axis=-1, ddof=1, keepdims=True) + 1.0e-6) ** 0.5


def patch_targets(images: Array, patch_size: int, norm_pix_loss: bool) -> Array:
    """Reconstruction targets [N, L, p*p*C]: the patches, per-patch normalised (`patch_mean_std`) if
    `norm_pix_loss`."""
    target = patchify(images.astype(jnp.float32), patch_size)
    if norm_pix_loss:
        mean, std = patch_mean_std(target)
        target = (target - mean) / std
    return target


def mae_loss(pred: Array, target: Array, mask: Array, loss_on: str = "masked") -> Array:
    """Mean squared error per patch, averaged over removed patches (`mask` == 1), or over all patches with
    `loss_on="all"` (the official loss without the mask weighting).

    When nothing is removed (mask ratio 0), the reference divides 0 by 0; here the loss is then defined
    as the mean over all patches.
    """
    loss = ((pred.astype(jnp.float32) - target) ** 2).mean(axis=-1)  # [N, L]
    if loss_on == "all":
        return loss.mean()
    removed = mask.sum()
    return jnp.where(removed > 0, (loss * mask).sum() / jnp.maximum(removed, 1.0), loss.mean())


# ---------------------------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------------------------

xavier_uniform = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)
OPS = ("auto", "xla_cpu", "generic")
ATTENTION_IMPLEMENTATIONS = ("auto", "lean", "custom_vjp", "einsum", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LOSS_ON = ("masked", "all")


def uniform_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv2d / Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def resolve_ops(ops: str, platform: str | None = None) -> str:
    """"auto" -> "xla_cpu" for programs compiled for the CPU, else "generic"; other values unchanged.

    `platform` is the one the program is compiled for ("cpu", "tpu", "gpu"; the trainer passes its mesh's, which
    may be a TPU topology compiled on a CPU host); None: JAX's default backend, for a model called directly.
    """
    if ops == "auto":
        return "xla_cpu" if (platform or jax.default_backend()) == "cpu" else "generic"
    return ops


def _matmul_dimensions(ndim: int) -> tuple:
    return (((ndim - 1,), (0,)), ((), ()))


@jax.custom_vjp
def _low_precision_matmul(x: Array, kernel: Array) -> Array:
    return jax.lax.dot_general(x, kernel.astype(x.dtype), _matmul_dimensions(x.ndim))


def _low_precision_matmul_fwd(x, kernel):
    return _low_precision_matmul(x, kernel), (x, kernel)  # the float32 kernel: under FSDP a shard, not a copy


def _low_precision_matmul_bwd(residuals, g):
    x, kernel = residuals
    dx = jax.lax.dot_general(g, kernel.astype(g.dtype), (((g.ndim - 1,), (1,)), ((), ())))
    rows = tuple(range(x.ndim - 1))
    # The kernel's gradient contracts the batch: accumulated and returned in float32, so the sum over the
    # devices' batch shards that XLA appends to it (all-reduce, or reduce-scatter under FSDP) runs in float32.
    dkernel = jax.lax.dot_general(x, g, ((rows, rows), ((), ())), preferred_element_type=jnp.float32)
    return dx, dkernel


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


class Dense(nn.Module):
    """`nn.Dense` (same parameters, initialisers and float32 arithmetic) that keeps gradients in float32 when it
    computes in a 16-bit `dtype`: the mixed precision of the reference (PyTorch AMP + DDP sums float32
    gradients), where flax's Dense casts the float32 kernel and bias to 16 bits, so their gradients, and the
    sums over devices of them, come out in 16 bits.

    16-bit: x @ kernel in `dtype` (the MXU's bfloat16), the kernel's gradient accumulated in float32
    (`_low_precision_matmul`), the bias added in float32 before the output is rounded to `dtype`.
    """

    features: int
    dtype: Any = jnp.float32  # compute dtype; parameters are float32
    kernel_init: nn.initializers.Initializer = xavier_uniform
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = parallel.sharded_gradient(self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                                                      jnp.float32))
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        dtype = jnp.dtype(self.dtype)
        if dtype == jnp.float32:  # flax's nn.Dense, operation for operation
            y = jax.lax.dot_general(jnp.asarray(x, dtype), kernel, _matmul_dimensions(x.ndim))
            return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return (_low_precision_matmul(jnp.asarray(x, dtype), kernel) + bias).astype(dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows q, k, v as the official `attn.qkv`)."""

    num_heads: int
    dtype: Any = jnp.float32
    implementation: str = "auto"  # see MaskedAutoencoderViT.attention
    ops: str = "auto"  # see MaskedAutoencoderViT.ops

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, t, d = x.shape
        head_dim = d // self.num_heads
        dense = functools.partial(Dense, dtype=self.dtype, kernel_init=xavier_uniform)
        qkv = dense(3 * d, name="qkv")(x).reshape(n, t, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, H, Dh]
        if self.implementation == "custom_vjp" or (self.implementation == "auto"
                                                  and resolve_ops(self.ops) == "xla_cpu"):
            out = xla_cpu.softmax_attention(qkv)
        elif self.implementation == "einsum":
            logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) * head_dim**-0.5
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
            out = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
        elif self.implementation in ("xla", "cudnn"):
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        else:  # "lean", or "auto" off the CPU
            out = attention_lib.attention(q, k, v)
        return dense(d, name="proj")(out.reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    hidden_dim: int
    dtype: Any = jnp.float32
    ops: str = "auto"  # see MaskedAutoencoderViT.ops

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = functools.partial(Dense, dtype=self.dtype, kernel_init=xavier_uniform)
        if resolve_ops(self.ops) == "xla_cpu":
            gelu = xla_cpu.gelu
        else:
            gelu = functools.partial(jax.nn.gelu, approximate=False)
        y = gelu(dense(self.hidden_dim, name="fc1")(x))
        return dense(x.shape[-1], name="fc2")(y)


def drop_path_rates(drop_path_rate: float, depth: int) -> np.ndarray:
    """Stochastic depth rate of each of `depth` blocks, [depth] float32: timm's decay rule
    `torch.linspace(0, drop_path_rate, depth)`, so the first block is never dropped."""
    return np.linspace(0.0, drop_path_rate, depth, dtype=np.float32)


def drop_path(x: Array, rate: float | Array, rng: Array) -> Array:
    """Stochastic depth per example, as timm's `drop_path`: each example of x [N, ...] is zeroed with
    probability `rate`, else scaled by 1 / (1 - rate), so the expected value is x."""
    # In float32 whatever x's dtype: a bfloat16 keep probability (0.9 -> 0.8984) would bias the expectation.
    keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jnp.floor(keep_prob + jax.random.uniform(rng, shape, jnp.float32))  # 1 with probability keep_prob
    return (x.astype(jnp.float32) / keep_prob * mask).astype(x.dtype)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

    Called with `train=True`, each residual branch goes through `drop_path` at `drop_path_rate` with its own
    per-example mask (timm's Block), drawn from the "drop_path" rng stream. The rate is a call argument, not a
    field, because blocks under `nn.scan` are one module whose per-block rates are scanned over.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    attention: str = "auto"  # see MaskedAutoencoderViT.attention
    ops: str = "auto"  # see MaskedAutoencoderViT.ops

    @nn.compact
    def __call__(self, x: Array, drop_path_rate: float | Array = 0.0, train: bool = False) -> Array:
        norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                                 use_fast_variance=False)
        # Identity in value; on XLA:CPU it stops the backward of later branches being recomputed (xla_cpu).
        branch_input = xla_cpu.materialize_grad if resolve_ops(self.ops) == "xla_cpu" else lambda y: y

        def residual(branch: Array) -> Array:
            return drop_path(branch, drop_path_rate, self.make_rng("drop_path")) if train else branch

        x = branch_input(x)
        x = x + residual(Attention(self.num_heads, self.dtype, self.attention, self.ops, name="attn")(
            norm(name="norm1")(x)))
        x = branch_input(x)
        x = x + residual(Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.ops, name="mlp")(
            norm(name="norm2")(x)))
        return x


def _scan_body(block: Block, x: Array, drop_path_rate: Array, train: bool) -> tuple[Array, None]:
    return block(parallel.constrain_batch(x), drop_path_rate, train), None


class Encoder(nn.Module):
    """`depth` transformer blocks, unrolled or under `nn.scan` (big_vision's Encoder, without the final norm).

    The blocks' parameters sit directly in the parent module, as the official `blocks.{i}`: `{block_name}_{i}`
    unrolled, or one `{block_name}` whose parameters carry a leading [depth] axis when scanned. Checkpoints,
    weight conversion and sharding rules see the same tree whichever module builds the blocks.
    """

    depth: int  # number of blocks
    num_heads: int  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width / embedding width
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon (the official 1e-6)
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    attention: str = "auto"  # attention implementation, see MaskedAutoencoderViT.attention
    ops: str = "auto"  # "auto", "xla_cpu" or "generic", see MaskedAutoencoderViT.ops
    scan: bool = False  # nn.scan over the blocks: stacked parameters, compile time independent of depth
    remat: str = "none"  # per-block rematerialisation policy, one of REMAT_POLICIES
    block_name: str = "blocks"  # parameter name prefix of the blocks ("blocks", "decoder_blocks")
    # Stochastic depth when called with train=True: block i drops each branch per example with probability
    # drop_path_rates(drop_path_rate, depth)[i] (fine-tuning; 0 in pretraining).
    drop_path_rate: float = 0.0

    def setup(self):
        if isinstance(self.parent, nn.Module):
            nn.share_scope(self.parent, self)  # no scope level of our own: see the class docstring
        block_cls = Block
        if self.remat != "none":
            policy = {
                "full": None,
                "dots": jax.checkpoint_policies.checkpoint_dots,
                "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            }[self.remat]
            # prevent_cse stops XLA from merging the recomputation with the forward pass; a scan's loop body
            # cannot be merged anyway, so it is dropped there (as jax.checkpoint's docs advise).
            # `train` (argument 3, counting the module) is a Python bool that selects code: static.
            block_cls = nn.remat(Block, policy=policy, prevent_cse=not self.scan, static_argnums=(3,))
        block = functools.partial(block_cls, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                  layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
                                  attention=self.attention, ops=self.ops)
        if self.scan:
            self.blocks = block(name=self.block_name)
        else:
            self.blocks = [block(name=f"{self.block_name}_{i}") for i in range(self.depth)]

    def __call__(self, x: Array, train: bool = False) -> Array:
        """[N, T, D] tokens -> [N, T, D] after every block; `train` enables stochastic depth (if its rate > 0)."""
        train = train and self.drop_path_rate > 0  # no "drop_path" rng needed otherwise
        rates = drop_path_rates(self.drop_path_rate, self.depth)
        if self.scan:
            scan = nn.scan(functools.partial(_scan_body, train=train), variable_axes={"params": 0},
                           split_rngs={"params": True, "drop_path": True}, length=self.depth)
            return scan(self.blocks, x, jnp.asarray(rates))[0]
        for block, rate in zip(self.blocks, rates):
            x = block(parallel.constrain_batch(x), float(rate), train)
        return x


@flax.struct.dataclass
class MAEOutput:
    """What `MaskedAutoencoderViT.__call__` returns."""

    loss: Array  # scalar: mean squared error per patch, averaged over removed patches (loss_on "all": all)
    pred: Array  # [N, L, p*p*C] predicted patches, (p, q, c) order
    mask: Array  # [N, L] 1 = removed, 0 = kept, original patch order
    ids_restore: Array  # [N, L] int32
    latent: Array  # [N, 1 + len_keep, D] encoder output, cls first ([N, 1 + L, D] with encoder_mask_tokens)


class _ViT(nn.Module):
    """What MaskedAutoencoderViT and ViTClassifier share: the encoder's fields and their checks, the patch
    grid, and the embedding in front of the blocks (patch embed Dense, cls token, position table `pos_embed`).
    """

    image_size: int | Sequence[int] = 224  # input image size in pixels: an int (square) or (H, W)
    patch_size: int = 16  # side of the square patches in pixels (16: "/16" of ViT-B/16)
    num_channels: int = 3  # image channels (3: RGB)
    embed_dim: int = 1024  # width of the encoder's tokens
    depth: int = 24  # transformer blocks of the encoder
    num_heads: int = 16  # attention heads of each encoder block (embed_dim must be a multiple of them)
    mlp_ratio: float = 4.0  # MLP hidden width / token width, encoder and decoder
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon (the official models' 1e-6)
    dtype: Any = "float32"  # compute dtype ("float32", "bfloat16" or "float16"); params stay float32
    # "auto": with the xla_cpu ops "custom_vjp" (xla_cpu.softmax_attention: hand-written backward, fewest passes
    # over the score tensors), otherwise "lean" (mae_jax/attention.py: the backward keeps one score tensor, in the
    # compute dtype, where differentiating XLA's attention keeps two in float32); "xla", "cudnn":
    # jax.nn.dot_product_attention with that implementation; "einsum": the reference's order of operations.
    attention: str = "auto"
    # Backend-specific implementations of the same function (mae_jax/xla_cpu.py): "xla_cpu" uses xla_cpu.gelu,
    # xla_cpu.materialize_grad on each residual branch input and (attention "auto") xla_cpu.softmax_attention;
    # "generic" uses jax.nn.gelu(approximate=False), no gradient barrier and (attention "auto") attention.attention;
    # "auto" is "xla_cpu" for programs compiled for the CPU (the trainer: its mesh's platform; a model called
    # directly: jax.default_backend()), else "generic". Set it to override that.
    ops: str = "auto"
    remat: str = "none"  # per-block rematerialisation: "none", "full", "dots", "dots_no_batch"
    scan_blocks: bool = False  # nn.scan over blocks (stacked params, fast compile for deep models)

    def _validate_encoder(self, prefixes: Sequence[str] = ("",)) -> None:
        """One-line ValueErrors for the encoder fields (and the `{prefix}embed_dim` / `num_heads` pairs)."""
        try:
            height, width = _pair(self.image_size)
        except (TypeError, ValueError):
            raise ValueError(f"image_size {self.image_size!r} must be an int or a pair (H, W)") from None
        p = self.patch_size
        if p <= 0:
            raise ValueError(f"patch_size {p} must be a positive number of pixels")
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size {(height, width)} must be positive (pixels): an int for a square "
                             "image or a pair (H, W), each a multiple of patch_size")
        if height % p or width % p:
            raise ValueError(
                f"image_size {(height, width)} is not divisible by patch_size {p}: "
                "both sides must be positive multiples of the patch size")
        for prefix in prefixes:
            dim, heads = getattr(self, f"{prefix}embed_dim"), getattr(self, f"{prefix}num_heads")
            if dim <= 0 or dim % 4:
                raise ValueError(f"{prefix}embed_dim {dim} must be a positive multiple of 4 "
                                 "(2-D sin-cos position embedding)")
            if heads <= 0 or dim % heads:
                raise ValueError(f"{prefix}embed_dim {dim} is not divisible by {prefix}num_heads {heads}")
        if self.ops not in OPS:
            raise ValueError(f"ops {self.ops!r} is not one of {OPS}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"dtype {self.dtype!r} must be 'float32', 'bfloat16' or 'float16'")

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w): the patch grid."""
        height, width = _pair(self.image_size)
        return height // self.patch_size, width // self.patch_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the model takes."""
        return (*_pair(self.image_size), self.num_channels)

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def _check_images(self, images: Array) -> None:
        expected = self.image_shape
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images of shape {tuple(images.shape)} do not match the model: expected [N, H, W, C] = "
                f"[N, {expected[0]}, {expected[1]}, {expected[2]}] (image_size {self.image_size!r}, "
                f"num_channels {self.num_channels})")

    def _norm(self, **kwargs: Any) -> nn.LayerNorm:
        # Two-pass variance, as torch (flax's fast variance E[x^2] - E[x]^2 differs).
        return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.compute_dtype, use_fast_variance=False,
                            **kwargs)

    def _blocks(self, depth: int, num_heads: int, block_name: str, drop_path_rate: float = 0.0) -> Encoder:
        return Encoder(depth, num_heads, mlp_ratio=self.mlp_ratio, layer_norm_eps=self.layer_norm_eps,
                       dtype=self.compute_dtype, attention=self.attention, ops=self.ops, scan=self.scan_blocks,
                       remat=self.remat, block_name=block_name, drop_path_rate=drop_path_rate)

    def _setup_embedding(self, pos_embed_collection: str) -> None:
        """Creates `patch_embed`, `cls_token` and `pos_embed` (the sin-cos table, in the given collection)."""
        # The patch embedding is a Dense on (p, q, c) patch vectors: the official conv with kernel = stride =
        # patch. Official init: xavier on its flattened [D, p*p*C] weight; the bias keeps PyTorch's Conv2d
        # default, U(+-1/sqrt(p*p*C)).
        patch_dim = self.patch_size**2 * self.num_channels
        self.patch_embed = Dense(self.embed_dim, dtype=self.compute_dtype, kernel_init=xavier_uniform,
                                    bias_init=uniform_bias_init(patch_dim))
        self.cls_token = self.param("cls_token", token_init, (1, 1, self.embed_dim))
        self.pos_embed = self.variable(
            pos_embed_collection, "pos_embed",
            lambda: jnp.asarray(get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=True))[None])

    def _patch_tokens(self, images: Array) -> Array:
        """[N, H, W, C] -> patch embeddings [N, L, D], before position embeddings."""
        self._check_images(images)
        return self.patch_embed(patchify(images.astype(self.compute_dtype), self.patch_size))

    def _add_pos(self, x: Array) -> Array:
        # Added in float32, then rounded: a trainable table's gradient (ViTClassifier) is summed in float32.
        return (x + self.pos_embed.value[:, 1:, :]).astype(x.dtype)

    def _embed(self, images: Array) -> Array:
        """[N, H, W, C] -> patch tokens [N, L, D] with position embeddings (no cls)."""
        return self._add_pos(self._patch_tokens(images))

    def _prepend_cls(self, x: Array) -> Array:
        """[N, T, D] -> [N, 1 + T, D] with cls + pos[0] first."""
        # Broadcast, then rounded: the token's gradient is summed over the batch in float32.
        cls = jnp.broadcast_to(self.cls_token + self.pos_embed.value[:, :1, :], (x.shape[0], 1, x.shape[2]))
        return jnp.concatenate([cls.astype(x.dtype), x], axis=1)


class MaskedAutoencoderViT(_ViT):
    """MAE with a ViT encoder over visible patches only and a light decoder with mask tokens.

    The encoder's fields (image_size, patch_size, num_channels, embed_dim, depth, num_heads, mlp_ratio,
    layer_norm_eps, dtype, attention, ops, remat, scan_blocks) are declared and documented in `_ViT`.
    The paper's ablation switches default to its method: `mask_sampling`, `encoder_mask_tokens` (Table 1c's
    "w/ [M]": the encoder runs on all L patches, masked ones replaced by a learned `encoder_mask_token`
    before the position embedding is added; the decoder takes every token as it is, and the model has no
    decoder `mask_token`), `loss_on` (Sec. 3: the loss on all patches is 0.5% worse).
    """

    decoder_embed_dim: int = 512  # width of the decoder's tokens (the paper's 512)
    decoder_depth: int = 8  # transformer blocks of the decoder (the paper's 8)
    decoder_num_heads: int = 16  # attention heads of each decoder block
    mask_ratio: float = 0.75  # fraction of the patches removed from each image (the paper's 0.75)
    norm_pix_loss: bool = False  # True: the target is each patch normalised by its own mean and variance
    mask_sampling: str = "random"  # "random" (the paper's), "block" (BEiT's blocks), "grid" (one per s x s cell)
    encoder_mask_tokens: bool = False  # True: the encoder sees all patches, masked ones as a learned token
    loss_on: str = "masked"  # "masked": the loss over removed patches (the paper's); "all": over every patch

    def __post_init__(self):
        self.validate()
        super().__post_init__()

    # -- configuration -----------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raises a one-line ValueError for impossible settings, before anything is traced or compiled."""
        self._validate_encoder(("", "decoder_"))
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {self.mask_ratio} must be in [0, 1)")
        if int(self.num_patches * (1 - self.mask_ratio)) < 1:
            raise ValueError(
                f"mask_ratio {self.mask_ratio} leaves no visible patch out of {self.num_patches}: "
                f"at most {1 - 1 / self.num_patches:.4f} is allowed for this image and patch size")
        if self.mask_sampling not in masking.MASK_SAMPLING:
            raise ValueError(f"mask_sampling {self.mask_sampling!r} is not one of {masking.MASK_SAMPLING}")
        if self.mask_sampling == "grid":
            cell = masking.grid_cell(self.mask_ratio)
            if cell is None:
                raise ValueError(
                    f"mask_ratio {self.mask_ratio} cannot be sampled by mask_sampling 'grid', which keeps one "
                    "patch of every s x s cell: use 1 - 1/s^2, e.g. 0.75 (s = 2) or 0.8889 (s = 3)")
            if self.grid_size[0] % cell or self.grid_size[1] % cell:
                raise ValueError(
                    f"mask_sampling 'grid' with mask_ratio {self.mask_ratio} needs a patch grid divisible into "
                    f"{cell} x {cell} cells; the grid is {self.grid_size} (image_size {self.image_size!r}, "
                    f"patch_size {self.patch_size})")
        if self.mask_sampling == "block" and min(self.grid_size) < 2:
            raise ValueError(f"mask_sampling 'block' needs a patch grid of at least 2 x 2 (BEiT's blocks are "
                             f"smaller than the grid); the grid is {self.grid_size}")
        if not isinstance(self.encoder_mask_tokens, (bool, np.bool_)):
            raise ValueError(f"encoder_mask_tokens {self.encoder_mask_tokens!r} must be True or False")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on {self.loss_on!r} is not one of {LOSS_ON}")

    @property
    def len_keep(self) -> int:
        """Visible patches per example."""
        return int(self.num_patches * (1 - self.mask_ratio))

    # -- submodules --------------------------------------------------------------------------------------

    def setup(self):
        # Encoder.
        self._setup_embedding("constants")
        self.encoder = self._blocks(self.depth, self.num_heads, "blocks")
        self.norm = self._norm()
        # Decoder.
        self.decoder_embed = Dense(self.decoder_embed_dim, dtype=self.compute_dtype, kernel_init=xavier_uniform)
        if self.encoder_mask_tokens:  # the decoder then gets every token from the encoder: no mask token of its own
            self.encoder_mask_token = self.param("encoder_mask_token", token_init, (1, 1, self.embed_dim))
        else:
            self.mask_token = self.param("mask_token", token_init, (1, 1, self.decoder_embed_dim))
        self.decoder_pos_embed = self.variable(
            "constants", "decoder_pos_embed",
            lambda: jnp.asarray(get_2d_sincos_pos_embed(self.decoder_embed_dim, self.grid_size,
                                                        cls_token=True))[None])
        self.decoder = self._blocks(self.decoder_depth, self.decoder_num_heads, "decoder_blocks")
        self.decoder_norm = self._norm()
        self.decoder_pred = Dense(self.patch_size**2 * self.num_channels, dtype=self.compute_dtype,
                                     kernel_init=xavier_uniform)

    # -- forward -----------------------------------------------------------------------------------------

    def _encode_tokens(self, x: Array) -> Array:
        """Prepends cls + pos[0] to [N, T, D] tokens, runs the blocks and the final norm."""
        return self.norm(self.encoder(self._prepend_cls(x)))

    def encode(self, images: Array, noise: Array | None = None) -> tuple[Array, Array, Array]:
        """Masks and encodes: returns latent [N, 1 + len_keep, D] ([N, 1 + L, D] with encoder_mask_tokens),
        mask [N, L], ids_restore [N, L]."""
        x = self._patch_tokens(images)
        if noise is None:
            noise = masking_noise(self.make_rng("masking"), x.shape[0], self)
        elif noise.shape != x.shape[:2]:
            raise ValueError(f"noise of shape {tuple(noise.shape)} must be [N, L] = {tuple(x.shape[:2])}")
        if self.encoder_mask_tokens:  # all L patches in order, the removed ones replaced before the positions
            _, mask, ids_restore = random_masking(x, noise, self.mask_ratio)
            token = jnp.broadcast_to(self.encoder_mask_token, x.shape).astype(x.dtype)  # its gradient summed in f32
            x = self._add_pos(jnp.where(mask[:, :, None] > 0, token, x))
        else:
            x, mask, ids_restore = random_masking(self._add_pos(x), noise, self.mask_ratio)
        return self._encode_tokens(x), mask, ids_restore

    def features(self, images: Array) -> Array:
        """Encoder features of the whole image, no masking: [N, 1 + L, D] (cls first, patches in order).

        These are the output of the final `norm`: the cls token here is what linear probing uses. Fine-tuning's
        global pool (official `models_vit`) is different: the mean of the patch tokens *before* the final norm,
        followed by a fresh `fc_norm`. Call as `model.apply(variables, images, method=model.features)`.
        """
        return self._encode_tokens(self._embed(images))

    def decode(self, latent: Array, ids_restore: Array) -> Array:
        """latent [N, 1 + len_keep, D] -> predicted patches [N, L, p*p*C] (float32). With encoder_mask_tokens
        the latent [N, 1 + L, D] already holds every patch in order: no mask tokens, no unshuffle."""
        x = self.decoder_embed(latent)
        if not self.encoder_mask_tokens:
            n, length = ids_restore.shape
            # Broadcast, then rounded: the token's gradient is summed over the batch in float32.
            mask_tokens = jnp.broadcast_to(self.mask_token, (n, length + 1 - x.shape[1], x.shape[2])).astype(x.dtype)
            tokens = jnp.concatenate([x[:, 1:, :], mask_tokens], axis=1)
            tokens = jnp.take_along_axis(tokens, ids_restore[:, :, None], axis=1)  # unshuffle
            x = jnp.concatenate([x[:, :1, :], tokens], axis=1)
        x = x + self.decoder_pos_embed.value.astype(x.dtype)
        x = self.decoder_norm(self.decoder(x))
        return self.decoder_pred(x)[:, 1:, :].astype(jnp.float32)

    def __call__(self, images: Array, noise: Array | None = None) -> MAEOutput:
        """Masks, encodes, decodes and scores `images` [N, H, W, C].

        `noise` [N, L] in [0, 1) fixes the masks (the smallest `len_keep` values are kept; `mask_to_noise`
        turns a boolean mask into noise); without it the noise of `mask_sampling` is drawn from the "masking"
        rng, one stream per example (see `masking_noise`).
        """
        latent, mask, ids_restore = self.encode(images, noise)
        pred = self.decode(latent, ids_restore)
        target = patch_targets(images, self.patch_size, self.norm_pix_loss)
        loss = mae_loss(pred, target, mask, self.loss_on)
        return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore, latent=latent)


def torch_trunc_normal(stddev: float, lower: float = -2.0, upper: float = 2.0) -> nn.initializers.Initializer:
    """timm's `trunc_normal_(std=stddev, a=lower, b=upper)`: N(0, stddev) truncated at ABSOLUTE bounds.

    flax's truncated_normal truncates at +-2 standard deviations instead; with the official head's std 2e-5
    the absolute bounds +-2 are 1e5 standard deviations away, so this is in effect a plain normal.
    """

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.truncated_normal(key, lower / stddev, upper / stddev, shape, dtype) * stddev

    return init


class HeadBatchNorm(nn.Module):
    """torch's `BatchNorm1d(D, affine=False, eps, momentum)` over features [N, D]: the linear probe's head norm
    (official main_linprobe.py puts it in front of the head).

    Written here rather than using flax's nn.BatchNorm because that keeps the *biased* batch variance in its
    running average, while torch keeps the unbiased one (N / (N - 1) times larger); the exported `running_var`
    must be torch's for the official model to compute the same eval logits. What it does, as torch:
      train: normalise with the batch mean and the biased batch variance (gradients flow through both);
        mean <- (1 - momentum) * mean + momentum * batch mean,
        var <- (1 - momentum) * var + momentum * unbiased batch variance, num_batches_tracked += 1;
      eval: normalise with the running `mean` and `var`.
    The statistics are over the whole batch axis: under jit with the batch sharded, XLA reduces over the global
    batch (the official DDP run, which has no SyncBatchNorm, uses each GPU's share instead).
    Variables, collection "batch_stats": mean [D] (init 0), var [D] (init 1), num_batches_tracked [] int32
    (init 0; torch's counter, exported as `num_batches_tracked`). Computed in float32 whatever the input dtype.
    """

    epsilon: float = 1e-6  # official: BatchNorm1d(..., eps=1e-6)
    momentum: float = 0.1  # torch's default

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """[N, D] -> [N, D] float32; train=True needs `mutable=["batch_stats"]` (the running statistics update)."""
        dim = x.shape[-1]
        mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((dim,), jnp.float32))
        var = self.variable("batch_stats", "var", lambda: jnp.ones((dim,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        x = x.astype(jnp.float32)
        if not train:
            return (x - mean.value) * jax.lax.rsqrt(var.value + self.epsilon)
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"batch norm in train mode needs more than 1 example per batch, got {n} "
                             "(torch raises too: the unbiased variance of one value is undefined)")
        batch_mean = x.mean(axis=0)
        batch_var = jnp.square(x - batch_mean).mean(axis=0)  # biased, two-pass (as torch)
        if not self.is_initializing():
            if not self.is_mutable_collection("batch_stats"):
                raise ValueError("train=True updates the batch norm's running statistics: call "
                                 "model.apply(variables, images, train=True, mutable=['batch_stats'])")
            stop = jax.lax.stop_gradient
            mean.value = (1 - self.momentum) * mean.value + self.momentum * stop(batch_mean)
            var.value = (1 - self.momentum) * var.value + self.momentum * stop(batch_var) * (n / (n - 1))
            count.value = count.value + 1
        return (x - batch_mean) * jax.lax.rsqrt(batch_var + self.epsilon)


class ViTClassifier(_ViT):
    """ViT image classifier for fine-tuning an MAE encoder: the official `models_vit.VisionTransformer` (timm
    0.3.2's ViT with MAE's global pool), in eval mode equal to it within float32 round-off.

    The encoder is MaskedAutoencoderViT's (fields declared in `_ViT`, parameter names, initialisers), over all
    patches; `pos_embed` [1, 1 + L, D] is a trainable parameter here (timm's is), initialised to the sin-cos
    table. Global pool: mean of the patch tokens of the last block (before any norm) -> `fc_norm` -> `head`; there is
    no `norm`. Otherwise the cls token of `norm(x)` -> `head`. Stochastic depth (train=True) needs the
    "drop_path" rng: `model.apply(variables, images, train=True, rngs={"drop_path": key})`.

    Linear probing (official main_linprobe.py: cls token, `head = Sequential(BatchNorm1d(D, affine=False,
    eps=1e-6), Linear)`, head weight trunc_normal std 0.01, encoder frozen): `global_pool=False,
    head_batch_norm=True, head_init_std=0.01, frozen_encoder=True`. The batch norm (`HeadBatchNorm`, variables in
    "batch_stats") updates its running statistics in train mode:
    `logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])`.
    """

    num_classes: int = 1000  # outputs of `head`
    global_pool: bool = True  # mean of the patch tokens + fc_norm (fine-tuning); False: cls token of `norm`
    drop_path_rate: float = 0.0  # stochastic depth of the last block; block i: linspace(0, rate, depth)[i]
    head_batch_norm: bool = False  # linear probe: BatchNorm1d(D, affine=False, eps=1e-6) on the features first
    head_init_std: float = 2e-5  # head kernel ~ trunc_normal(std): 2e-5 fine-tuning, 0.01 linear probing
    frozen_encoder: bool = False  # stop_gradient on the features: only the head trains, no encoder backward

    def __post_init__(self):
        self.validate()
        super().__post_init__()

    def validate(self) -> None:
        """Raises a one-line ValueError for impossible settings, before anything is traced or compiled."""
        self._validate_encoder()
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) \
                or self.num_classes < 1:
            raise ValueError(f"num_classes {self.num_classes!r} must be a positive integer")
        if not isinstance(self.global_pool, (bool, np.bool_)):
            raise ValueError(f"global_pool {self.global_pool!r} must be True (mean pool + fc_norm) or False "
                             "(cls token + norm)")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate {self.drop_path_rate} must be in [0, 1)")
        for name in ("head_batch_norm", "frozen_encoder"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} {getattr(self, name)!r} must be True or False")
        std = self.head_init_std
        if isinstance(std, bool) or not isinstance(std, (int, float, np.integer, np.floating)) \
                or not 0.0 < std < float("inf"):
            raise ValueError(f"head_init_std {std!r} must be a positive number (2e-5 fine-tuning, 0.01 linear "
                             "probing)")

    def setup(self):
        self._setup_embedding("params")
        self.encoder = self._blocks(self.depth, self.num_heads, "blocks", self.drop_path_rate)
        if self.global_pool:
            self.fc_norm = self._norm()
        else:
            self.norm = self._norm()
        if self.head_batch_norm:
            self.head_bn = HeadBatchNorm(epsilon=1e-6)
        # main_finetune.py: trunc_normal_(head.weight, std=2e-5), main_linprobe.py: std=0.01; timm's zero bias.
        self.head = Dense(self.num_classes, dtype=self.compute_dtype,
                             kernel_init=torch_trunc_normal(float(self.head_init_std)),
                             bias_init=nn.initializers.zeros)

    def features(self, images: Array, train: bool = False) -> Array:
        """[N, H, W, C] -> [N, D], what the head sees (official `forward_features`); train as `__call__`."""
        x = self.encoder(self._prepend_cls(self._embed(images)), train)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(axis=1))
        return self.norm(x)[:, 0]

    def __call__(self, images: Array, train: bool = False) -> Array:
        """Logits [N, num_classes] (float32) of `images` [N, H, W, C]; `train` enables stochastic depth and,
        with `head_batch_norm`, batch statistics (then pass `mutable=["batch_stats"]`)."""
        x = self.features(images, train)
        if self.frozen_encoder:
            x = jax.lax.stop_gradient(x)
        if self.head_batch_norm:
            x = self.head_bn(x, train)
        return self.head(x).astype(jnp.float32)


def classifier_fields(mae_fields: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """ViTClassifier fields from MaskedAutoencoderViT fields (e.g. `variant("B/16")` or a checkpoint's
    record): the encoder's fields, then `overrides` (num_classes, global_pool, drop_path_rate, ...)."""
    names = {f.name for f in dataclasses.fields(ViTClassifier) if f.init and f.name not in ("parent", "name")}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not fields of ViTClassifier (allowed: {sorted(names)})")
    fields = {k: v for k, v in mae_fields.items() if k in names}
    fields.update(overrides)
    return constructor_fields(ViTClassifier(**fields))


# ---------------------------------------------------------------------------------------------------------
# Parameter utilities.
# ---------------------------------------------------------------------------------------------------------


def init_variables(model: MaskedAutoencoderViT | ViTClassifier, rng: Array, batch_size: int = 1) -> PyTree:
    """Initialises the variables from `rng` with a dummy batch (no data needed): {"params", "constants"} for
    MaskedAutoencoderViT, {"params"} for ViTClassifier ({"params", "batch_stats"} with `head_batch_norm`)."""
    images = jnp.zeros((batch_size, *model.image_shape), jnp.float32)
    params_rng, masking_rng = jax.random.split(rng)
    # Jitted: op-by-op initialisation is several times slower, even for a tiny model.
    return jax.jit(model.init)({"params": params_rng, "masking": masking_rng}, images)


def constructor_fields(model: nn.Module) -> dict[str, Any]:
    """Every constructor field of `model`: `type(model)(**constructor_fields(model))` rebuilds it."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}


def model_class(fields: Mapping[str, Any]) -> type[MaskedAutoencoderViT] | type[ViTClassifier]:
    """The model class that constructor `fields` describe: ViTClassifier if they hold num_classes."""
    return ViTClassifier if "num_classes" in fields else MaskedAutoencoderViT


def count_params(tree: PyTree) -> int:
    """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
