"""Flash attention for GPUs in Pallas (Triton lowering): forward, dq and dk/dv kernels.

One program per (query block, batch, head) for the forward and dq; one per (key block,
batch, kv head) for dk/dv, which loops over the query heads of its group, so GQA / MQA
never repeats K/V in memory. Each program loops only over the blocks its mask can see
(`common.kv_blocks` / `common.q_blocks`) and applies the mask only on partial tiles.
FlashAttention-2 schedule (Dao 2023).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention import common


def head_dim(D):
    """The head dim the kernel runs at: Triton tiles are powers of two."""
    return pl.next_power_of_2(D)


def default_block(n, which):
    """Triton blocks are powers of two >= 16: up to 128 query rows and 64 keys."""
    return min(128 if which == "q" else 64, max(16, pl.next_power_of_2(n)))


def _tile_inputs(st, refs, rows, cols, q_index, k_index):
    """Positions `[bq, 1]` / `[1, bk]`, key indices and segments for tile (rows, cols)."""
    q_idx = q_index * st.bq + jnp.arange(st.bq)[:, None]
    k_idx = k_index * st.bk + jnp.arange(st.bk)[None, :]
    if st.has_positions:
        q_pos, k_pos = refs["q_pos"][rows][:, None], refs["k_pos"][cols][None, :]
    else:
        q_pos, k_pos = q_idx, k_idx
    q_seg = k_seg = None
    if st.has_segments:
        q_seg, k_seg = refs["q_seg"][rows][:, None], refs["k_seg"][cols][None, :]
    return q_pos, k_pos, k_idx, q_seg, k_seg


def _loop(st, ranges, body, carry):
    """Runs `body(j, carry, masked)` over the sink blocks and the band, masking as needed."""
    sink_hi, lo, full_lo, full_hi, hi = ranges
    masked = st.any_mask
    if sink_hi:
        carry = jax.lax.fori_loop(0, sink_hi, lambda j, c: body(j, c, True), carry)
    carry = jax.lax.fori_loop(lo, full_lo, lambda j, c: body(j, c, masked), carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, lambda j, c: body(j, c, False), carry)
    return jax.lax.fori_loop(full_hi, hi, lambda j, c: body(j, c, masked), carry)


def _forward_kernel(refs, st):
    i, h = pl.program_id(0), pl.program_id(2)
    q = refs["q"][...]
    slope = refs["slopes"][h] if st.has_alibi else None

    def body(j, carry, masked):
        cols = pl.ds(j * st.bk, st.bk)
        q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(
            st, refs, slice(None), cols, i, j)
        s, _, _ = common.scores(st, q, refs["k"][cols, :], q_pos, k_pos, slope)
        m = common.mask(st, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
        return common.softmax_step(carry, s, m, refs["v"][cols, :])

    init = (jnp.full((st.bq, 1), -jnp.inf, jnp.float32), jnp.zeros((st.bq, 1), jnp.float32),
            jnp.zeros((st.bq, st.D), jnp.float32))
    out, lse = common.finalize(*_loop(st, common.kv_blocks(st, i), body, init))
    refs["o"][...] = out.astype(refs["o"].dtype)
    refs["lse"][...] = lse[:, 0]


def _dq_kernel(refs, st):
    i, h = pl.program_id(0), pl.program_id(2)
    q, do = refs["q"][...], refs["do"][...]
    lse, delta = refs["lse"][...][:, None], refs["delta"][...][:, None]
    slope = refs["slopes"][h] if st.has_alibi else None

    def body(j, carry, masked):
        dq, dslope = carry
        cols = pl.ds(j * st.bk, st.bk)
        q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(
            st, refs, slice(None), cols, i, j)
        k = refs["k"][cols, :]
        s, tanh, dist = common.scores(st, q, k, q_pos, k_pos, slope)
        m = common.mask(st, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
        _, ds, g = common.grad_step(st, s, tanh, m, lse, delta, do, refs["v"][cols, :])
        if st.has_alibi:
            dslope = dslope - (g * dist).sum(axis=1)
        return dq + common.dot_nn(ds.astype(k.dtype), k), dslope

    init = (jnp.zeros((st.bq, st.D), jnp.float32), jnp.zeros((st.bq,), jnp.float32))
    dq, dslope = _loop(st, common.kv_blocks(st, i), body, init)
    refs["dq"][...] = dq.astype(refs["dq"].dtype)
    if st.has_alibi:
        refs["dslope"][...] = dslope


def _dkdv_kernel(refs, st):
    j, kh = pl.program_id(0), pl.program_id(2)
    k, v = refs["k"][...], refs["v"][...]
    cols = slice(None)
    lo, full_lo, full_hi, hi = common.q_blocks(st, j)
    masked = st.any_mask
    dk = jnp.zeros((st.bk, st.D), jnp.float32)
    dv = jnp.zeros((st.bk, st.D), jnp.float32)
    for g in range(st.G):  # the query heads sharing this kv head
        slope = refs["slopes"][kh * st.G + g] if st.has_alibi else None

        def body(i, carry, masked, g=g, slope=slope):
            dk, dv = carry
            rows = pl.ds(i * st.bq, st.bq)
            q = refs["q"][rows, g, :]
            do = refs["do"][rows, g, :]
            lse = refs["lse"][g, rows][:, None]
            delta = refs["delta"][g, rows][:, None]
            q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(st, refs, rows, cols, i, j)
            s, tanh, _ = common.scores(st, q, k, q_pos, k_pos, slope)
            m = common.mask(st, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
            p, ds, _ = common.grad_step(st, s, tanh, m, lse, delta, do, v)
            return (dk + common.dot_tn(ds.astype(q.dtype), q),
                    dv + common.dot_tn(p.astype(do.dtype), do))

        carry = jax.lax.fori_loop(lo, full_lo, lambda i, c: body(i, c, masked), (dk, dv))
        carry = jax.lax.fori_loop(full_lo, full_hi, lambda i, c: body(i, c, False), carry)
        dk, dv = jax.lax.fori_loop(full_hi, hi, lambda i, c: body(i, c, masked), carry)
    refs["dk"][...] = dk.astype(refs["dk"].dtype)
    refs["dv"][...] = dv.astype(refs["dv"].dtype)


def _call(kernel, st, inputs, in_specs, outputs, grid, interpret, name):
    """`pallas_call` over dicts of named inputs / outputs (`outputs`: name -> (shape, spec))."""
    names = list(inputs) + list(outputs)

    def wrapped(*refs):
        kernel(dict(zip(names, refs, strict=True)), st)

    result = pl.pallas_call(
        wrapped,
        grid=grid,
        in_specs=[in_specs[n] for n in inputs],
        out_specs=[spec for _, spec in outputs.values()],
        out_shape=[shape for shape, _ in outputs.values()],
        compiler_params=plgpu.CompilerParams(num_warps=4 if st.D <= 64 else 8, num_stages=2),
        interpret=interpret,
        name=name,
    )(*inputs.values())
    return dict(zip(outputs, result, strict=True))


def _row_specs(st, by_kv_head):
    """BlockSpecs of the integer side inputs, for a grid (block, batch, head)."""
    if by_kv_head:  # programs own a key block: see all query rows
        q_rows = pl.BlockSpec((None, st.Tp), lambda j, b, h: (b, 0))
        k_cols = pl.BlockSpec((None, st.bk), lambda j, b, h: (b, j))
    else:
        q_rows = pl.BlockSpec((None, st.bq), lambda i, b, h: (b, i))
        k_cols = pl.BlockSpec((None, st.Sp), lambda i, b, h: (b, 0))
    return dict(q_pos=q_rows, q_seg=q_rows, k_pos=k_cols, k_seg=k_cols,
                slopes=pl.BlockSpec((pl.next_power_of_2(st.H),), lambda *_: (0,)))


def _side_inputs(st, arrays):
    side = {n: arrays[n] for n in ("q_pos", "k_pos", "q_seg", "k_seg") if n in arrays}
    if st.has_alibi:  # Triton blocks are powers of two
        side["slopes"] = jnp.pad(arrays["slopes"], (0, pl.next_power_of_2(st.H) - st.H))
    return side


def forward(st, arrays, interpret):
    """Padded arrays from `common.prepare` -> out `[B, Tp, H, D]`, lse `[B, H, Tp]` fp32."""
    B, G = arrays["q"].shape[0], st.G
    q_block = pl.BlockSpec((None, st.bq, None, st.D), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, st.Sp, None, st.D), lambda i, b, h: (b, 0, h // G, 0))
    inputs = dict(q=arrays["q"], k=arrays["k"], v=arrays["v"], **_side_inputs(st, arrays))
    specs = dict(q=q_block, k=kv_full, v=kv_full, **_row_specs(st, False))
    outputs = dict(
        o=(jax.ShapeDtypeStruct(arrays["q"].shape, arrays["q"].dtype), q_block),
        lse=(jax.ShapeDtypeStruct((B, st.H, st.Tp), jnp.float32),
             pl.BlockSpec((None, None, st.bq), lambda i, b, h: (b, h, i))),
    )
    res = _call(_forward_kernel, st, inputs, specs, outputs, (st.nq, B, st.H), interpret,
                "flash_attention_fwd")
    return res["o"], res["lse"]


def backward(st, arrays, do, lse, delta, interpret):
    """dq, dk, dv (padded) and the per-row ALiBi slope gradient `[B, H, Tp]` (or None)."""
    B, G = arrays["q"].shape[0], st.G
    side = _side_inputs(st, arrays)
    q_block = pl.BlockSpec((None, st.bq, None, st.D), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, st.Sp, None, st.D), lambda i, b, h: (b, 0, h // G, 0))
    row = pl.BlockSpec((None, None, st.bq), lambda i, b, h: (b, h, i))
    inputs = dict(q=arrays["q"], k=arrays["k"], v=arrays["v"], do=do, lse=lse, delta=delta,
                  **side)
    specs = dict(q=q_block, k=kv_full, v=kv_full, do=q_block, lse=row, delta=row,
                 **_row_specs(st, False))
    outputs = dict(dq=(jax.ShapeDtypeStruct(arrays["q"].shape, arrays["q"].dtype), q_block))
    if st.has_alibi:
        outputs["dslope"] = (jax.ShapeDtypeStruct((B, st.H, st.Tp), jnp.float32), row)
    res = _call(_dq_kernel, st, inputs, specs, outputs, (st.nq, B, st.H), interpret,
                "flash_attention_dq")

    q_group = pl.BlockSpec((None, st.Tp, G, st.D), lambda j, b, h: (b, 0, h, 0))
    kv_block = pl.BlockSpec((None, st.bk, None, st.D), lambda j, b, h: (b, j, h, 0))
    rows_group = pl.BlockSpec((None, G, st.Tp), lambda j, b, h: (b, h, 0))
    specs = dict(q=q_group, k=kv_block, v=kv_block, do=q_group, lse=rows_group,
                 delta=rows_group, **_row_specs(st, True))
    outputs = dict(
        dk=(jax.ShapeDtypeStruct(arrays["k"].shape, arrays["k"].dtype), kv_block),
        dv=(jax.ShapeDtypeStruct(arrays["v"].shape, arrays["v"].dtype), kv_block),
    )
    res.update(_call(_dkdv_kernel, st, inputs, specs, outputs, (st.nk, B, st.K), interpret,
                     "flash_attention_dkdv"))
    return res["dq"], res["dk"], res["dv"], res.get("dslope")
