"""Softmax attention whose backward keeps one [N, H, T, T] tensor, in the compute dtype: what TPUs and GPUs run.

`jax.nn.dot_product_attention`'s XLA path, differentiated by JAX, keeps the float32 logits and softmax of every
block for the backward: two float32 [N, H, T, T] tensors a block. For the MAE's 197-token decoder at a pod's
batch per chip that is most of the step's memory (`python -m mae_jax.plan` on v5e:4x4, ViT-B/16 bfloat16, 256
images per chip: 16 such tensors of 0.78 GiB in 13.4 GiB of temporaries). Here the forward keeps the
probabilities once, in the compute dtype (bfloat16 under mixed precision, as they enter the probabilities x values
product anyway), and the backward is the usual one:

    p = softmax(q k^T / sqrt(d)),   out = p v
    dv = p^T dout,   dp = dout v^T,   ds = p * (dp - rowsum(dout * out)),   dq = ds k / sqrt(d),   dk = ds^T q / sqrt(d)

Logits, row maxima and sums are float32 whatever the inputs; products accumulate in float32. The same function as
the einsum formulation (tested to round-off); `mae_jax/xla_cpu.py` has the CPU's arrangement of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def attention(q: Array, k: Array, v: Array) -> Array:
    """softmax(q k^T / sqrt(D)) v for q, k, v [N, T, H, D]; returns [N, T, H, D] in their dtype."""
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    probabilities = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probabilities, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return out, (q, k, v, probabilities, out)


def _attention_bwd(residuals, dout):
    q, k, v, probabilities, out = residuals
    scale = q.shape[-1] ** -0.5
    dv = jnp.einsum("nhqk,nqhd->nkhd", probabilities, dout, preferred_element_type=jnp.float32)
    dprobabilities = jnp.einsum("nqhd,nkhd->nhqk", dout, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("nqhd,nqhd->nhq", dout.astype(jnp.float32), out.astype(jnp.float32))[..., None]
    dlogits = (probabilities.astype(jnp.float32) * (dprobabilities - delta) * scale).astype(q.dtype)
    dq = jnp.einsum("nhqk,nkhd->nqhd", dlogits, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("nhqk,nqhd->nkhd", dlogits, q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


attention.defvjp(_attention_fwd, _attention_bwd)
