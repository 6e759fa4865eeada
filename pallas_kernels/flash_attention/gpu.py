"""Flash attention for GPUs in Pallas (Triton lowering): forward, dq and dk/dv kernels.

One program per (query block, batch, head) for the forward and dq; one per (key block,
batch, kv head) for dk/dv, which loops over the query heads of its group, so GQA / MQA
never repeats K/V in memory. Each program loops only over the blocks its mask can see
(`Tiling.key_blocks` / `Tiling.query_blocks` of the block planner) and applies the mask
only on partial tiles.
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


def compute_dtype(dtype):
    """The dtype the kernel reads q, k, v in: as given."""
    return dtype


def default_block(n, which):
    """Triton blocks are powers of two >= 16: up to 128 query rows and 64 keys."""
    return min(128 if which == "q" else 64, max(16, pl.next_power_of_2(n)))


def _tile_inputs(spec, tiling, refs, rows, cols, q_index, k_index):
    """Positions `[bq, 1]` / `[1, bk]`, key indices and segments for tile (rows, cols)."""
    q_idx = q_index * tiling.bq + jnp.arange(tiling.bq)[:, None]
    k_idx = k_index * tiling.bk + jnp.arange(tiling.bk)[None, :]
    if spec.has_positions:
        q_pos, k_pos = refs["q_pos"][rows][:, None], refs["k_pos"][cols][None, :]
    else:
        q_pos, k_pos = q_idx, k_idx
    q_seg = k_seg = None
    if spec.has_segments:
        q_seg, k_seg = refs["q_seg"][rows][:, None], refs["k_seg"][cols][None, :]
    return q_pos, k_pos, k_idx, q_seg, k_seg


def _loop(spec, tiling, i, body, carry):
    """Runs `body(j, carry, masked)` over the key blocks query block `i` sees: the sink
    blocks and the band, masking as needed."""
    sinks, lo, full_lo, full_hi, hi = tiling.key_blocks(spec, i)
    masked = tiling.needs_mask(spec)
    if spec.sinks:
        carry = jax.lax.fori_loop(0, sinks, lambda j, c: body(j, c, True), carry)
    carry = jax.lax.fori_loop(lo, full_lo, lambda j, c: body(j, c, masked), carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, lambda j, c: body(j, c, False), carry)
    return jax.lax.fori_loop(full_hi, hi, lambda j, c: body(j, c, masked), carry)


def _forward_kernel(refs, spec, tiling):
    i, h = pl.program_id(0), pl.program_id(2)
    q = refs["q"][...]
    slope = refs["slopes"][h] if spec.has_alibi else None

    def body(j, carry, masked):
        cols = pl.ds(j * tiling.bk, tiling.bk)
        q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(
            spec, tiling, refs, slice(None), cols, i, j)
        s, _, _ = common.scores(spec, q, refs["k"][cols, :], q_pos, k_pos, slope)
        m = common.mask(spec, tiling, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
        return common.softmax_step(carry, s, m, refs["v"][cols, :])

    bq, D = q.shape
    init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, D), jnp.float32))
    out, lse = common.finalize(*_loop(spec, tiling, i, body, init))
    refs["o"][...] = out.astype(refs["o"].dtype)
    refs["lse"][...] = lse[:, 0]


def _dq_kernel(refs, spec, tiling):
    i, h = pl.program_id(0), pl.program_id(2)
    q, do = refs["q"][...], refs["do"][...]
    lse, delta = refs["lse"][...][:, None], refs["delta"][...][:, None]
    slope = refs["slopes"][h] if spec.has_alibi else None

    def body(j, carry, masked):
        dq, dslope = carry
        cols = pl.ds(j * tiling.bk, tiling.bk)
        q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(
            spec, tiling, refs, slice(None), cols, i, j)
        k = refs["k"][cols, :]
        s, tanh, dist = common.scores(spec, q, k, q_pos, k_pos, slope)
        m = common.mask(spec, tiling, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
        _, ds, g = common.grad_step(spec, s, tanh, m, lse, delta, do, refs["v"][cols, :])
        if spec.has_alibi:
            dslope = dslope - (g * dist).sum(axis=1)
        return dq + common.dot_nn(ds.astype(k.dtype), k), dslope

    bq, D = q.shape
    init = (jnp.zeros((bq, D), jnp.float32), jnp.zeros((bq,), jnp.float32))
    dq, dslope = _loop(spec, tiling, i, body, init)
    refs["dq"][...] = dq.astype(refs["dq"].dtype)
    if spec.has_alibi:
        refs["dslope"][...] = dslope


def _dkdv_kernel(refs, spec, tiling):
    j, kh = pl.program_id(0), pl.program_id(2)
    k, v = refs["k"][...], refs["v"][...]
    G = refs["q"].shape[1]  # the query block is [Tp, G, D]
    cols = slice(None)
    lo, full_lo, full_hi, hi = tiling.query_blocks(spec, j)
    masked = tiling.needs_mask(spec)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(G):  # the query heads sharing this kv head
        slope = refs["slopes"][kh * G + g] if spec.has_alibi else None

        def body(i, carry, masked, g=g, slope=slope):
            dk, dv = carry
            rows = pl.ds(i * tiling.bq, tiling.bq)
            q = refs["q"][rows, g, :]
            do = refs["do"][rows, g, :]
            lse = refs["lse"][g, rows][:, None]
            delta = refs["delta"][g, rows][:, None]
            q_pos, k_pos, k_idx, q_seg, k_seg = _tile_inputs(
                spec, tiling, refs, rows, cols, i, j)
            s, tanh, _ = common.scores(spec, q, k, q_pos, k_pos, slope)
            m = common.mask(spec, tiling, q_pos, k_pos, k_idx, q_seg, k_seg) if masked else None
            p, ds, _ = common.grad_step(spec, s, tanh, m, lse, delta, do, v)
            return (dk + common.dot_tn(ds.astype(q.dtype), q),
                    dv + common.dot_tn(p.astype(do.dtype), do))

        carry = jax.lax.fori_loop(lo, full_lo, lambda i, c: body(i, c, masked), (dk, dv))
        carry = jax.lax.fori_loop(full_lo, full_hi, lambda i, c: body(i, c, False), carry)
        dk, dv = jax.lax.fori_loop(full_hi, hi, lambda i, c: body(i, c, masked), carry)
    refs["dk"][...] = dk.astype(refs["dk"].dtype)
    refs["dv"][...] = dv.astype(refs["dv"].dtype)


def _call(kernel, spec, tiling, inputs, in_specs, outputs, grid, interpret, name):
    """`pallas_call` over dicts of named inputs / outputs (`outputs`: name -> (shape, spec))."""
    names = list(inputs) + list(outputs)
    D = inputs["q"].shape[-1]

    def wrapped(*refs):
        kernel(dict(zip(names, refs, strict=True)), spec, tiling)

    result = pl.pallas_call(
        wrapped,
        grid=grid,
        in_specs=[in_specs[n] for n in inputs],
        out_specs=[spec for _, spec in outputs.values()],
        out_shape=[shape for shape, _ in outputs.values()],
        compiler_params=plgpu.CompilerParams(num_warps=4 if D <= 64 else 8, num_stages=2),
        interpret=interpret,
        name=name,
    )(*inputs.values())
    return dict(zip(outputs, result, strict=True))


def _row_specs(tiling, H, by_kv_head):
    """BlockSpecs of the integer side inputs, for a grid (block, batch, head)."""
    if by_kv_head:  # programs own a key block: see all query rows
        q_rows = pl.BlockSpec((None, tiling.Tp), lambda j, b, h: (b, 0))
        k_cols = pl.BlockSpec((None, tiling.bk), lambda j, b, h: (b, j))
    else:
        q_rows = pl.BlockSpec((None, tiling.bq), lambda i, b, h: (b, i))
        k_cols = pl.BlockSpec((None, tiling.Sp), lambda i, b, h: (b, 0))
    return dict(q_pos=q_rows, q_seg=q_rows, k_pos=k_cols, k_seg=k_cols,
                slopes=pl.BlockSpec((pl.next_power_of_2(H),), lambda *_: (0,)))


def _side_inputs(arrays):
    side = {n: arrays[n] for n in ("q_pos", "k_pos", "q_seg", "k_seg") if n in arrays}
    if "slopes" in arrays:  # Triton blocks are powers of two
        H = arrays["slopes"].shape[0]
        side["slopes"] = jnp.pad(arrays["slopes"], (0, pl.next_power_of_2(H) - H))
    return side


def forward(spec, tiling, arrays, interpret):
    """Padded arrays from `common.prepare` -> out `[B, Tp, H, D]`, lse `[B, H, Tp]` fp32."""
    B, _, H, D = arrays["q"].shape
    G = H // arrays["k"].shape[2]
    q_block = pl.BlockSpec((None, tiling.bq, None, D), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, tiling.Sp, None, D), lambda i, b, h: (b, 0, h // G, 0))
    inputs = dict(q=arrays["q"], k=arrays["k"], v=arrays["v"], **_side_inputs(arrays))
    specs = dict(q=q_block, k=kv_full, v=kv_full, **_row_specs(tiling, H, False))
    outputs = dict(
        o=(jax.ShapeDtypeStruct(arrays["q"].shape, arrays["q"].dtype), q_block),
        lse=(jax.ShapeDtypeStruct((B, H, tiling.Tp), jnp.float32),
             pl.BlockSpec((None, None, tiling.bq), lambda i, b, h: (b, h, i))),
    )
    res = _call(_forward_kernel, spec, tiling, inputs, specs, outputs, (tiling.nq, B, H),
                interpret, "flash_attention_fwd")
    return res["o"], res["lse"]


def backward(spec, tiling, arrays, do, lse, delta, interpret):
    """dq, dk, dv (padded) and the per-row ALiBi slope gradient `[B, H, Tp]` (or None)."""
    B, _, H, D = arrays["q"].shape
    K = arrays["k"].shape[2]
    G = H // K
    side = _side_inputs(arrays)
    q_block = pl.BlockSpec((None, tiling.bq, None, D), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, tiling.Sp, None, D), lambda i, b, h: (b, 0, h // G, 0))
    row = pl.BlockSpec((None, None, tiling.bq), lambda i, b, h: (b, h, i))
    inputs = dict(q=arrays["q"], k=arrays["k"], v=arrays["v"], do=do, lse=lse, delta=delta,
                  **side)
    specs = dict(q=q_block, k=kv_full, v=kv_full, do=q_block, lse=row, delta=row,
                 **_row_specs(tiling, H, False))
    outputs = dict(dq=(jax.ShapeDtypeStruct(arrays["q"].shape, arrays["q"].dtype), q_block))
    if spec.has_alibi:
        outputs["dslope"] = (jax.ShapeDtypeStruct((B, H, tiling.Tp), jnp.float32), row)
    res = _call(_dq_kernel, spec, tiling, inputs, specs, outputs, (tiling.nq, B, H), interpret,
                "flash_attention_dq")

    q_group = pl.BlockSpec((None, tiling.Tp, G, D), lambda j, b, h: (b, 0, h, 0))
    kv_block = pl.BlockSpec((None, tiling.bk, None, D), lambda j, b, h: (b, j, h, 0))
    rows_group = pl.BlockSpec((None, G, tiling.Tp), lambda j, b, h: (b, h, 0))
    specs = dict(q=q_group, k=kv_block, v=kv_block, do=q_group, lse=rows_group,
                 delta=rows_group, **_row_specs(tiling, H, True))
    outputs = dict(
        dk=(jax.ShapeDtypeStruct(arrays["k"].shape, arrays["k"].dtype), kv_block),
        dv=(jax.ShapeDtypeStruct(arrays["v"].shape, arrays["v"].dtype), kv_block),
    )
    res.update(_call(_dkdv_kernel, spec, tiling, inputs, specs, outputs, (tiling.nk, B, K),
                     interpret, "flash_attention_dkdv"))
    return res["dq"], res["dk"], res["dv"], res.get("dslope")
