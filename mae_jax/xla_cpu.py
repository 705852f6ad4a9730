"""XLA:CPU performance fixes for the model: the same function, arranged so XLA's CPU backend runs it faster.

`MaskedAutoencoderViT(ops="xla_cpu")` uses them (`ops="auto"`, the default, does when JAX's default backend
is the CPU); `ops="generic"` uses plain `jax.nn` instead (tested equal within float32 round-off,
tests/test_models.py). Measured on a 2-core CPU, ViT-B/16 train step at batch 8 (benchmarks/README.md):

- `materialize_grad`: an identity on the input of each residual branch whose gradient XLA computes once.
  Without it XLA:CPU fused the chain of LayerNorm-backward additions of every later branch into each
  weight-gradient transpose and recomputed it there: about a third of the step (1.85 -> 3.1 images/s).
- `gelu`: exact GELU through erf, PyTorch's own formula; `jax.nn.gelu(approximate=False)` goes through erfc,
  which XLA expands into two approximations, an exp and a select: about 0.1 s per step less.
- `softmax_attention`: attention with a hand-written backward (the flash-attention backward, untiled) whose
  dk and dv products are computed transposed (XLA:CPU ran them as plain loops): about 0.1 s per step less;
  3.79 vs 3.40 images/s against `jax.nn.dot_product_attention` in one A/B run.

`materialize_grad` and the attention backward rely on `_keep`, `x * exp(0 * x)`: exactly x for finite x, and
an op XLA counts as expensive, so it neither duplicates its producer into consumers nor moves transposes
through it. These were measured on the CPU only; elsewhere they only add elementwise work, so nothing selects
them there unless asked: `ops="xla_cpu"` (or "auto" on the CPU), or `attention="custom_vjp"` for the attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def gelu(x: Array) -> Array:
    """Exact GELU written as PyTorch's nn.GELU computes it, x * 0.5 * (1 + erf(x / sqrt(2))).

    jax.nn.gelu(approximate=False) goes through erfc, which XLA expands into two approximations, an exp and
    a select; erf is one rational approximation (about 0.1 s less per ViT-B step at batch 8 on a 2-core CPU).
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * 0.5**0.5))


def _keep(x: Array) -> Array:
    """x (exactly, if finite), as an op that XLA computes once and keeps as it is: it neither duplicates the
    producer into consumers nor moves transposes through it (exp counts as expensive)."""
    return x * jnp.exp(x * 0.0)


@jax.custom_vjp
def materialize_grad(x: Array) -> Array:
    """Identity whose gradient XLA computes once and keeps (a performance fix; values are unchanged).

    Placed on the input of each residual branch (attention and MLP). Without it, XLA's CPU backend fuses
    the chain of LayerNorm-backward additions of every later branch into each weight-gradient transpose
    and recomputes it there: a third of the ViT-B train step. The backward is _keep(g), g * exp(0 * g):
    exactly g for finite g (NaN for non-finite g, which the train step rejects anyway), and an elementwise
    op XLA considers expensive, so it materialises the result instead of duplicating the chain.
    `optimization_barrier` does not help: XLA removes it before fusion on the CPU.
    """
    return x


def _materialize_grad_fwd(x):
    return x, None


def _materialize_grad_bwd(_, g):
    return (_keep(g),)


materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)


@jax.custom_vjp
def softmax_attention(qkv: Array) -> Array:
    """softmax(q k^T / sqrt(d)) v for qkv [N, T, 3, H, D] (rows q, k, v); returns [N, T, H, D].

    The same function as the einsum path, arranged for the CPU with a hand-written backward: q, k and v
    move to [N, H, T, D] in one copy, the forward keeps the unnormalised exp-scores and divides the
    [N, H, T, D] output rather than the [N, H, T, T] weights, and the backward uses them with the row sums
    of dout * out (the flash-attention backward without tiling) and returns dqkv in one copy. Scores, row
    maxima and sums are float32 whatever the input dtype; the kept exponentials are in the input dtype.
    """
    return _softmax_attention_fwd(qkv)[0]


def _softmax_attention_fwd(qkv):
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # [N, H, T, D] each
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("nhqd,nhkd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    exp = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    inv_sum = 1.0 / exp.sum(axis=-1, keepdims=True)  # [N, H, T, 1]
    exp = exp.astype(qkv.dtype)
    out = jnp.einsum("nhqk,nhkd->nhqd", exp, v, preferred_element_type=jnp.float32) * inv_sum
    out = out.astype(qkv.dtype)
    return out.transpose(0, 2, 1, 3), (q, k, v, exp, inv_sum, out)


def _softmax_attention_bwd(residuals, dout):
    q, k, v, exp, inv_sum, out = residuals
    row_scale = inv_sum * q.shape[-1] ** -0.5  # [N, H, T, 1]: 1 / (row sum * sqrt(d))
    dout_t = dout.transpose(0, 2, 3, 1)  # [N, H, D, T]
    dout = dout.transpose(0, 2, 1, 3)  # [N, H, T, D]
    dweights = jnp.einsum("nhqd,nhkd->nhqk", dout, v, preferred_element_type=jnp.float32)
    delta = (dout.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)  # [N, H, T, 1]
    # d loss / d logits = dscores * row_scale (per query row), applied to the small factors below.
    dscores = (exp * (dweights - delta)).astype(q.dtype)
    dq = jnp.einsum("nhqk,nhkd->nhqd", dscores, k, preferred_element_type=jnp.float32) * row_scale
    # dk and dv contract over the query rows of dscores / exp. XLA:CPU runs that transposed-left product as
    # a plain loop 2-3x slower than its matmul kernels, so they are computed transposed, [D, T] x [T, T],
    # from the small factor scaled per row into [N, H, D, T]; _keep stops XLA from folding these transposes
    # back into the products.
    q_t = _keep(q.swapaxes(-1, -2) * row_scale.swapaxes(-1, -2)).astype(q.dtype)
    dk_t = jnp.einsum("nhdq,nhqk->nhdk", q_t, dscores, preferred_element_type=jnp.float32)
    dv_t = jnp.einsum("nhdq,nhqk->nhdk", (dout_t * inv_sum.swapaxes(-1, -2)).astype(q.dtype), exp,
                      preferred_element_type=jnp.float32)
    dk_t, dv_t = (_keep(x) for x in (dk_t, dv_t))
    dqkv = jnp.stack([dq, dk_t.swapaxes(-1, -2), dv_t.swapaxes(-1, -2)])
    return (dqkv.astype(q.dtype).transpose(1, 3, 0, 2, 4),)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
