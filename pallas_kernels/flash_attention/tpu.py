"""Flash attention for TPUs in Pallas (Mosaic): forward, dq and dk/dv kernels.

Heads-major layout (`[B, H, T, D]`) so every block is a `[block, head_dim]` tile. The
key (or query) block is the innermost, sequential grid axis with accumulators in VMEM
scratch; tiles outside the mask do no work (`pl.when`) and their index maps repeat a
visited block so no DMA is issued for them. Row statistics (lse, delta) and query-side
integers are broadcast over 128 lanes, key-side integers over 8 sublanes, as Mosaic
tiles them. dk/dv loop over the query heads of a GQA group inside the grid, so K/V are
never repeated. FlashAttention-2 schedule (Dao 2023).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import common

LANES, SUBLANES = 128, 8


def head_dim(D):
    """The head dim the kernel runs at: any (a block's last axis is the whole head)."""
    return D


def compute_dtype(dtype):
    """The dtype the kernel reads q, k, v in: fp16 as fp32, since Mosaic has no fp16 vector
    loads on v5e and v6e (the compiler refuses `vector<8x128x2xf16>`); others as given."""
    return jnp.float32 if dtype == jnp.float16 else dtype


def default_block(n, which):
    """Block size for a sequence of length n: up to 512, a multiple of 128 (lanes)."""
    del which
    return min(512, -(-n // LANES) * LANES)


def _clamp(j, lo, hi, n):
    """A block index in [lo, hi) (kept in [0, n)), so skipped steps re-use a fetched block."""
    return jnp.clip(jnp.clip(j, lo, hi - 1), 0, n - 1)


def _kv_index(spec, tiling, i, j):
    sinks, lo, _, _, hi = tiling.key_blocks(spec, i)
    first = jnp.where(sinks > 0, 0, lo)
    return _clamp(j, first, jnp.maximum(hi, sinks), tiling.nk)


def _q_index(spec, tiling, j, i):
    lo, _, _, hi = tiling.query_blocks(spec, j)
    return _clamp(i, lo, hi, tiling.nq)


def _tile_inputs(spec, tiling, refs, i, j):
    q_pos = i * tiling.bq + jax.lax.broadcasted_iota(jnp.int32, (tiling.bq, 1), 0)
    k_idx = j * tiling.bk + jax.lax.broadcasted_iota(jnp.int32, (1, tiling.bk), 1)
    k_pos = k_idx
    if spec.has_positions:
        q_pos, k_pos = refs["q_pos"][:, :1], refs["k_pos"][:1, :]
    q_seg = k_seg = None
    if spec.has_segments:
        q_seg, k_seg = refs["q_seg"][:, :1], refs["k_seg"][:1, :]
    return q_pos, k_pos, k_idx, q_seg, k_seg


def _when_visited(spec, tiling, visit, full, step):
    """Runs `step(masked)` on visited tiles, unmasked on full ones."""
    if tiling.needs_mask(spec):
        pl.when(visit & ~full)(lambda: step(True))
        pl.when(visit & full)(lambda: step(False))
    else:
        pl.when(visit)(lambda: step(False))


def _forward_kernel(refs, spec, tiling):
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        refs["m"][...] = jnp.full(refs["m"].shape, -jnp.inf, jnp.float32)
        refs["l"][...] = jnp.zeros(refs["l"].shape, jnp.float32)
        refs["acc"][...] = jnp.zeros(refs["acc"].shape, jnp.float32)

    sinks, lo, full_lo, full_hi, hi = tiling.key_blocks(spec, i)

    def step(masked):
        q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(spec, tiling, refs, i, j)
        slope = refs["slopes"][h] if spec.has_alibi else None
        s, _, _ = common.scores(spec, refs["q"][...], refs["k"][...], q_pos, k_pos, slope)
        m = common.mask(spec, tiling, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
        carry = (refs["m"][...], refs["l"][...], refs["acc"][...])
        refs["m"][...], refs["l"][...], refs["acc"][...] = common.softmax_step(
            carry, s, m, refs["v"][...])

    _when_visited(spec, tiling, (j < sinks) | ((j >= lo) & (j < hi)),
                  (j >= full_lo) & (j < full_hi), step)

    @pl.when(j == tiling.nk - 1)
    def _store():
        out, lse = common.finalize(refs["m"][...], refs["l"][...], refs["acc"][...])
        refs["o"][...] = out.astype(refs["o"].dtype)
        refs["lse"][...] = jnp.broadcast_to(lse, refs["lse"].shape)


def _dq_kernel(refs, spec, tiling):
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        refs["dq_acc"][...] = jnp.zeros(refs["dq_acc"].shape, jnp.float32)
        refs["dslope_acc"][...] = jnp.zeros(refs["dslope_acc"].shape, jnp.float32)

    sinks, lo, full_lo, full_hi, hi = tiling.key_blocks(spec, i)

    def step(masked):
        q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(spec, tiling, refs, i, j)
        slope = refs["slopes"][h] if spec.has_alibi else None
        k = refs["k"][...]
        s, tanh, dist = common.scores(spec, refs["q"][...], k, q_pos, k_pos, slope)
        m = common.mask(spec, tiling, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
        _, ds, g = common.grad_step(spec, s, tanh, m, refs["lse"][:, :1],
                                    refs["delta"][:, :1], refs["do"][...], refs["v"][...])
        refs["dq_acc"][...] += common.dot_nn(ds.astype(k.dtype), k)
        if spec.has_alibi:
            refs["dslope_acc"][...] -= (g * dist).sum(axis=1, keepdims=True)

    _when_visited(spec, tiling, (j < sinks) | ((j >= lo) & (j < hi)),
                  (j >= full_lo) & (j < full_hi), step)

    @pl.when(j == tiling.nk - 1)
    def _store():
        refs["dq"][...] = refs["dq_acc"][...].astype(refs["dq"].dtype)
        if spec.has_alibi:
            refs["dslope"][...] = jnp.broadcast_to(refs["dslope_acc"][...], refs["dslope"].shape)


def _dkdv_kernel(refs, spec, tiling):
    kh, j, n = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    g, i = n // tiling.nq, n % tiling.nq  # n runs over (query head in the group, query block)
    G = pl.num_programs(3) // tiling.nq

    @pl.when(n == 0)
    def _init():
        refs["dk_acc"][...] = jnp.zeros(refs["dk_acc"].shape, jnp.float32)
        refs["dv_acc"][...] = jnp.zeros(refs["dv_acc"].shape, jnp.float32)

    lo, full_lo, full_hi, hi = tiling.query_blocks(spec, j)

    def step(masked):
        q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(spec, tiling, refs, i, j)
        slope = refs["slopes"][kh * G + g] if spec.has_alibi else None
        q, do = refs["q"][...], refs["do"][...]
        s, tanh, _ = common.scores(spec, q, refs["k"][...], q_pos, k_pos, slope)
        m = common.mask(spec, tiling, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
        p, ds, _ = common.grad_step(spec, s, tanh, m, refs["lse"][:, :1],
                                    refs["delta"][:, :1], do, refs["v"][...])
        refs["dk_acc"][...] += common.dot_tn(ds.astype(q.dtype), q)
        refs["dv_acc"][...] += common.dot_tn(p.astype(do.dtype), do)

    _when_visited(spec, tiling, (i >= lo) & (i < hi), (i >= full_lo) & (i < full_hi), step)

    @pl.when(n == pl.num_programs(3) - 1)
    def _store():
        refs["dk"][...] = refs["dk_acc"][...].astype(refs["dk"].dtype)
        refs["dv"][...] = refs["dv_acc"][...].astype(refs["dv"].dtype)


def _call(kernel, spec, tiling, inputs, specs, outputs, scratch, grid, interpret, name):
    """`pallas_call` over dicts of named inputs, outputs `(shape, spec)` and VMEM scratch."""
    names = list(inputs) + list(outputs) + list(scratch)

    def wrapped(*refs):
        kernel(dict(zip(names, refs, strict=True)), spec, tiling)

    result = pl.pallas_call(
        wrapped,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=grid, in_specs=[specs[n] for n in inputs],
            out_specs=[spec for _, spec in outputs.values()],
            scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch.values()],
        ),
        out_shape=[shape for shape, _ in outputs.values()],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )(*inputs.values())
    return dict(zip(outputs, result, strict=True))


def _side(tiling, arrays, q_index, k_index):
    """Integer side inputs (lane / sublane broadcast) and their specs, given block maps."""
    inputs, specs = {}, {}
    B = arrays["q"].shape[0]
    for name in ("q_pos", "q_seg"):
        if name in arrays:
            inputs[name] = jnp.broadcast_to(arrays[name][:, :, None], (B, tiling.Tp, LANES))
            specs[name] = pl.BlockSpec((None, tiling.bq, LANES),
                                       lambda b, h, x, y: (b, q_index(x, y), 0))
    for name in ("k_pos", "k_seg"):
        if name in arrays:
            inputs[name] = jnp.broadcast_to(arrays[name][:, None, :], (B, SUBLANES, tiling.Sp))
            specs[name] = pl.BlockSpec((None, SUBLANES, tiling.bk),
                                       lambda b, h, x, y: (b, 0, k_index(x, y)))
    if "slopes" in arrays:
        inputs["slopes"] = arrays["slopes"]
        specs["slopes"] = pl.BlockSpec(memory_space=pltpu.SMEM)
    return inputs, specs


def _heads_major(x):
    return x.transpose(0, 2, 1, 3)


def _rows(x):
    """`[B, H, Tp]` -> lane-broadcast `[B, H, Tp, 128]`."""
    return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def forward(spec, tiling, arrays, interpret):
    """Padded arrays from `common.prepare` -> out `[B, Tp, H, D]`, lse `[B, H, Tp]` fp32."""
    B, _, H, D = arrays["q"].shape
    G = H // arrays["k"].shape[2]
    bq, bk = tiling.bq, tiling.bk
    kv_index = lambda i, j: _kv_index(spec, tiling, i, j)  # noqa: E731
    q, k, v = (_heads_major(arrays[n]) for n in ("q", "k", "v"))
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, i, j: (b, h // G, kv_index(i, j), 0))
    row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    inputs, specs = _side(tiling, arrays, lambda i, j: i, kv_index)
    inputs = dict(q=q, k=k, v=v, **inputs)
    specs.update(q=q_spec, k=kv_spec, v=kv_spec)
    outputs = dict(o=(jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec),
                   lse=(jax.ShapeDtypeStruct((B, H, tiling.Tp, LANES), jnp.float32), row_spec))
    scratch = dict(m=(bq, 1), l=(bq, 1), acc=(bq, D))
    res = _call(_forward_kernel, spec, tiling, inputs, specs, outputs, scratch,
                (B, H, tiling.nq, tiling.nk), interpret, "flash_attention_fwd")
    return _heads_major(res["o"]), res["lse"][..., 0]


def backward(spec, tiling, arrays, do, lse, delta, interpret):
    """dq, dk, dv (padded, `[B, T, *, D]`) and the per-row ALiBi slope gradient or None."""
    B, _, H, D = arrays["q"].shape
    K = arrays["k"].shape[2]
    G = H // K
    bq, bk, nq = tiling.bq, tiling.bk, tiling.nq
    kv_index = lambda i, j: _kv_index(spec, tiling, i, j)  # noqa: E731
    q, k, v, do = (_heads_major(x) for x in (arrays["q"], arrays["k"], arrays["v"], do))
    lse, delta = _rows(lse), _rows(delta)

    # dq: grid (B, H, query block, key block).
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, i, j: (b, h // G, kv_index(i, j), 0))
    row_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    inputs, specs = _side(tiling, arrays, lambda i, j: i, kv_index)
    inputs = dict(q=q, k=k, v=v, do=do, lse=lse, delta=delta, **inputs)
    specs.update(q=q_spec, k=kv_spec, v=kv_spec, do=q_spec, lse=row_spec, delta=row_spec)
    outputs = dict(dq=(jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec))
    if spec.has_alibi:
        outputs["dslope"] = (jax.ShapeDtypeStruct(lse.shape, jnp.float32), row_spec)
    scratch = dict(dq_acc=(bq, D), dslope_acc=(bq, 1))
    res = _call(_dq_kernel, spec, tiling, inputs, specs, outputs, scratch,
                (B, H, nq, tiling.nk), interpret, "flash_attention_dq")

    # dk / dv: grid (B, kv head, key block, group head x query block).
    def q_block(j, n):
        return _q_index(spec, tiling, j, n % nq)

    q_spec = pl.BlockSpec((None, None, bq, D),
                          lambda b, h, j, n: (b, h * G + n // nq, q_block(j, n), 0))
    kv_spec = pl.BlockSpec((None, None, bk, D), lambda b, h, j, n: (b, h, j, 0))
    row_spec = pl.BlockSpec((None, None, bq, LANES),
                            lambda b, h, j, n: (b, h * G + n // nq, q_block(j, n), 0))
    side, side_specs = _side(tiling, arrays, lambda j, n: q_block(j, n), lambda j, n: j)
    inputs = dict(q=q, k=k, v=v, do=do, lse=lse, delta=delta, **side)
    specs = dict(q=q_spec, k=kv_spec, v=kv_spec, do=q_spec, lse=row_spec, delta=row_spec,
                 **side_specs)
    outputs = dict(dk=(jax.ShapeDtypeStruct(k.shape, k.dtype), kv_spec),
                   dv=(jax.ShapeDtypeStruct(v.shape, v.dtype), kv_spec))
    scratch = dict(dk_acc=(bk, D), dv_acc=(bk, D))
    res.update(_call(_dkdv_kernel, spec, tiling, inputs, specs, outputs, scratch,
                     (B, K, tiling.nk, G * nq), interpret, "flash_attention_dkdv"))
    dslope = res["dslope"][..., 0] if spec.has_alibi else None
    return (_heads_major(res["dq"]), _heads_major(res["dk"]), _heads_major(res["dv"]), dslope)
