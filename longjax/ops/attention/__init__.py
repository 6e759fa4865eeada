"""Softmax attention: `dot_product_attention(q, k, v, ..., impl=)` and its parts.

Layout: q `[B, T, H, D]`, k / v `[B, S, K, D]` with `H % K == 0` (GQA / MQA when K < H).
A call flows through:

- `spec`: `make_spec` validates the call once into an `AttentionSpec` (mask, soft-cap,
  scale, which side inputs) and the `SideInputs` arrays (segments, positions, ALiBi, bias);
- `planner`: which key blocks each query block skips, masks or sees whole (shared by
  the `xla` path, the Pallas kernels and ring attention);
- `per_head`: key segment ids / positions given per KV head (`[B, S, K]`, a cache that
  keeps different tokens per head), folded into the batch so every path serves them;
- `reference`: materialised scores (the test oracle), `decode`: Flash-Decoding for a few
  queries against a long cache, `blockwise`: FlashAttention in pure JAX ("xla"), and the
  Pallas kernels in `pallas_kernels.flash_attention`.

The logsumexp `lse` is `[B, H, T]` fp32; a query row that sees no key gives output 0 and
lse = -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longjax.ops import impl as impl_lib
from longjax.ops.attention import blockwise, per_head, reference
from longjax.ops.attention.decode import split_kv_attention
from longjax.ops.attention.reference import alibi_bias, attention_mask, reference_attention
from longjax.ops.attention.spec import AttentionSpec, SideInputs, make_spec

__all__ = [
    "IMPLS", "AttentionSpec", "SideInputs", "alibi_bias", "attention_backward",
    "attention_forward", "attention_mask", "attention_weights", "backward",
    "dot_product_attention", "forward", "make_spec", "merge_attention", "reference_attention",
    "split_kv_attention",
]

IMPLS = ("auto", "reference", "split_kv", "xla", "pallas", "pallas_interpret", "cudnn")
_FLOAT_DTYPES = {
    "reference": (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16),
    "split_kv": (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16),
    "xla": (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16),
    "pallas": (jnp.float32, jnp.bfloat16, jnp.float16),
    "pallas_interpret": (jnp.float32, jnp.bfloat16, jnp.float16),
    "cudnn": (jnp.bfloat16, jnp.float16),
}
# Arguments that shape the computation; the public entry points are jitted with these static.
_STATIC = ("causal", "window", "num_sinks", "softcap", "scale", "impl", "block_q", "block_k")


def _check_impl(impl, allowed, q, k, v):
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}; got {impl!r}")
    for x in (q, k, v):
        if not any(x.dtype == d for d in _FLOAT_DTYPES[impl]):
            allowed = ", ".join(jnp.dtype(d).name for d in _FLOAT_DTYPES[impl])
            raise ValueError(f"impl={impl!r} supports q/k/v dtypes {allowed}; got {x.dtype}")


def _pallas_module():
    from pallas_kernels import flash_attention

    return flash_attention


# Jitted so that a caller that runs one tile in several places (ring attention) lowers
# one copy of it.
@functools.partial(jax.jit, static_argnames=("spec", "impl", "block_q", "block_k"))
def forward(spec, q, k, v, side, *, impl="xla", block_q=None, block_k=None):
    """`(out [B, T, H, D], lse [B, H, T] fp32)` of a validated call (`make_spec`), without
    autodiff; `impl` is `"xla"`, `"reference"`, `"pallas"` or `"pallas_interpret"`."""
    _check_impl(impl, ("xla", "reference", "pallas", "pallas_interpret"), q, k, v)
    if impl == "reference":
        return reference.attention(spec, q, k, v, side)
    if impl.startswith("pallas"):
        return _pallas_module().forward(spec, q, k, v, side, block_q=block_q, block_k=block_k,
                                        interpret=impl == "pallas_interpret")
    return blockwise.forward(blockwise.Blocks(spec, q, k, v, side, block_q=block_q,
                                              block_k=block_k))


@functools.partial(jax.jit, static_argnames=("spec", "impl", "block_q", "block_k"))
def backward(spec, q, k, v, side, out, lse, dout, *, dlse=None, impl="xla", block_q=None,
             block_k=None):
    """FlashAttention-2 backward of a validated call: `(dq, dk, dv, dslopes, dbias)`, the
    last two None without ALiBi / bias. `dlse` `[B, H, T]` is the cotangent of `lse`."""
    _check_impl(impl, ("xla", "pallas", "pallas_interpret"), q, k, v)
    if impl.startswith("pallas"):  # the Pallas kernels take no dense bias
        dq, dk, dv, dslopes = _pallas_module().backward(
            spec, q, k, v, side, out, lse, dout, dlse=dlse, block_q=block_q, block_k=block_k,
            interpret=impl == "pallas_interpret")
        return dq, dk, dv, dslopes, None
    blk = blockwise.Blocks(spec, q, k, v, side, block_q=block_q, block_k=block_k)
    dq, dk, dv, dbias, dslopes = blockwise.backward(blk, out, lse, dout, dlse)
    return dq, dk, dv, dslopes, dbias


def _spec(q, k, v, causal, window, num_sinks, softcap, scale, segment_ids, kv_segment_ids,
          q_positions, kv_positions, alibi_slopes, bias):
    return make_spec(q, k, v, causal=causal, window=window, num_sinks=num_sinks,
                     softcap=softcap, scale=scale, segment_ids=segment_ids,
                     kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                     kv_positions=kv_positions, alibi_slopes=alibi_slopes, bias=bias)


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention_forward(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, bias=None, alibi_slopes=None, softcap=None, scale=None, q_positions=None,
    kv_positions=None, impl="xla", block_q=None, block_k=None,
):
    """Attention forward without autodiff: `(out [B, T, H, D], lse [B, H, T] fp32)`.

    For blockwise callers, which merge blocks with `lse` and call `attention_backward`
    themselves. `impl` is `"xla"`, `"reference"`, `"pallas"` or `"pallas_interpret"`.
    """
    spec, side = _spec(q, k, v, causal, window, num_sinks, softcap, scale, segment_ids,
                       kv_segment_ids, q_positions, kv_positions, alibi_slopes, bias)
    return forward(spec, q, k, v, side, impl=impl, block_q=block_q, block_k=block_k)


@functools.partial(jax.jit, static_argnames=_STATIC)
def attention_backward(
    q, k, v, out, lse, dout, *, causal=False, segment_ids=None, kv_segment_ids=None,
    window=None, num_sinks=0, bias=None, alibi_slopes=None, softcap=None, scale=None,
    q_positions=None, kv_positions=None, impl="xla", block_q=None, block_k=None, dlse=None,
):
    """FlashAttention-2 backward from `out`, `lse` and `dout`: `(dq, dk, dv)`.

    `dlse` `[B, H, T]` is the cotangent of `lse` when the caller differentiates through it.
    Gradients for `bias` / `alibi_slopes` come from `dot_product_attention`'s VJP.
    """
    spec, side = _spec(q, k, v, causal, window, num_sinks, softcap, scale, segment_ids,
                       kv_segment_ids, q_positions, kv_positions, alibi_slopes, bias)
    return backward(spec, q, k, v, side, out, lse, dout, dlse=dlse, impl=impl,
                    block_q=block_q, block_k=block_k)[:3]


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets, from each part's normalised output
    `[B, T, H, D]` and logsumexp `[B, H, T]`: `(output in fp32, logsumexp)`. A row that
    sees no key in either part gives 0 (ring attention merges its steps with this)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    ref = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def weighted(out, part_lse):
        return out.astype(jnp.float32) * jnp.moveaxis(jnp.exp(part_lse - ref), 1, 2)[..., None]

    return weighted(out_a, lse_a) + weighted(out_b, lse_b), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _differentiable(q, k, v, side, spec, impl, blocks):
    return forward(spec, q, k, v, side, impl=impl, block_q=blocks[0], block_k=blocks[1])


def _differentiable_fwd(q, k, v, side, spec, impl, blocks):
    out, lse = _differentiable(q, k, v, side, spec, impl, blocks)
    return (out, lse), (q, k, v, side, out, lse)


def _differentiable_bwd(spec, impl, blocks, res, cotangents):
    q, k, v, side, out, lse = res
    dout, dlse = cotangents
    dq, dk, dv, dslopes, dbias = backward(spec, q, k, v, side, out, lse, dout, dlse=dlse,
                                          impl=impl, block_q=blocks[0], block_k=blocks[1])
    # Integer side inputs get no cotangent; ALiBi slopes and bias get theirs in their dtype.
    dside = SideInputs(
        alibi_slopes=None if side.alibi_slopes is None else dslopes.astype(
            side.alibi_slopes.dtype),
        bias=None if side.bias is None else dbias.astype(side.bias.dtype))
    return dq, dk, dv, dside


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def _cudnn_supported(spec, q, return_lse):
    """True for a call cuDNN's fused attention serves (on an NVIDIA GPU)."""
    return (
        (spec.window is None or spec.window > 0) and q.dtype in (jnp.bfloat16, jnp.float16)
        and spec.softcap is None and spec.num_sinks == 0 and not spec.has_alibi
        and not spec.has_segments and not spec.has_positions and not return_lse
    )


@functools.partial(jax.jit, static_argnames=_STATIC + ("return_lse",))
def dot_product_attention(
    q, k, v, *, causal=False, segment_ids=None, kv_segment_ids=None, window=None,
    num_sinks=0, bias=None, alibi_slopes=None, softcap=None, scale=None, q_positions=None,
    kv_positions=None, return_lse=False, impl="auto", block_q=None, block_k=None,
):
    """Scaled dot-product attention with masks, GQA, soft-cap, bias and ALiBi.

    q `[B, T, H, D]`, k / v `[B, S, K, D]` -> `[B, T, H, D]` (and lse `[B, H, T]` fp32
    with `return_lse`). `impl`: `"reference"` (materialised scores), `"split_kv"` (the
    decode path), `"xla"` (blockwise, O(T) memory, custom VJP), `"pallas"` /
    `"pallas_interpret"` (flash-attention kernels), `"cudnn"` (GPU, bf16/fp16, no
    soft-cap / sinks / segments / ALiBi / positions / lse) or `"auto"`, resolved per
    lowering platform by `longjax.ops.impl.choose`. All give the same math.

    `kv_segment_ids` / `kv_positions` may be `[B, S, K]`: per KV head (a cache keeping
    different tokens per head); a KV head's keys are masked alike for its G query heads.
    """
    if per_head.is_per_head(kv_segment_ids, kv_positions):
        B = q.shape[0]
        folded = per_head.fold(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                               q_positions=q_positions, kv_positions=kv_positions, bias=bias,
                               alibi_slopes=alibi_slopes)
        result = dot_product_attention(
            **folded, causal=causal, window=window, num_sinks=num_sinks, softcap=softcap,
            scale=scale, return_lse=return_lse, impl=impl, block_q=block_q, block_k=block_k)
        if return_lse:
            return per_head.unfold_out(result[0], B), per_head.unfold_heads(result[1], B)
        return per_head.unfold_out(result, B)
    spec, side = _spec(q, k, v, causal, window, num_sinks, softcap, scale, segment_ids,
                       kv_segment_ids, q_positions, kv_positions, alibi_slopes, bias)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    cudnn_ok = _cudnn_supported(spec, q, return_lse)
    if impl != "auto":
        _check_impl(impl, IMPLS, q, k, v)
    if impl == "cudnn" and not (cudnn_ok and impl_lib.cudnn_available()):
        raise ValueError(
            "impl='cudnn' needs cuDNN (a CUDA jaxlib), bf16/fp16 inputs and no softcap, "
            "num_sinks, segment_ids, positions, alibi_slopes or return_lse")

    def run(name):
        out, lse = _attention(name, spec, q, k, v, side, (block_q, block_k))
        return (out, lse) if return_lse else out

    return impl_lib.run("attention", impl, run, query_length=q.shape[1],
                        cudnn_supported=cudnn_ok)


@functools.partial(jax.jit, static_argnames=("causal", "window", "num_sinks", "softcap",
                                             "scale"))
def attention_weights(q, k, *, causal=False, segment_ids=None, kv_segment_ids=None,
                      window=None, num_sinks=0, softcap=None, scale=None, q_positions=None,
                      kv_positions=None):
    """The attention probabilities `[B, H, T, S]` fp32 of `dot_product_attention` with
    these options (materialised, O(B H T S); 0 where masked, a row that sees no key is 0),
    for cache policies that rank keys by the attention they receive. Key arrays may be
    per KV head (`[B, S, K]`) as there."""
    B = q.shape[0]
    options = dict(causal=causal, window=window, num_sinks=num_sinks, softcap=softcap,
                   scale=scale)
    if per_head.is_per_head(kv_segment_ids, kv_positions):
        folded = per_head.fold(q, k, k, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                               q_positions=q_positions, kv_positions=kv_positions, bias=None,
                               alibi_slopes=None)
        p = attention_weights(folded["q"], folded["k"], **options, **{
            n: folded[n] for n in ("segment_ids", "kv_segment_ids", "q_positions",
                                   "kv_positions")})
        return per_head.unfold_heads(p, B)
    spec, side = make_spec(q, k, k, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                           q_positions=q_positions, kv_positions=kv_positions, **options)
    p, _ = reference.probabilities(spec, q, k, side)
    return p.reshape(B, q.shape[2], q.shape[1], k.shape[1])


def _attention(impl, spec, q, k, v, side, blocks):
    """`(out, lse)` through one named implementation (lse None for cuDNN)."""
    if impl == "cudnn":
        local = None if spec.window is None else (
            spec.window - 1, 0 if spec.causal else spec.window - 1)
        bias = side.bias
        if bias is not None:
            bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, scale=spec.scale, is_causal=spec.causal,
            local_window_size=local, implementation="cudnn"), None
    if impl == "reference":
        return reference.attention(spec, q, k, v, side)
    if impl == "split_kv":
        return split_kv_attention(spec, q, k, v, side, block_k=blocks[1])
    return _differentiable(q, k, v, side, spec, impl, blocks)
