"""S4 and S4D: structured state space kernels, discretisation, convolution and recurrence.

Continuous system per channel: `x'(t) = A x(t) + B u(t)`, `y = C x + D u`, discretised with
step `dt` by zero-order hold or the bilinear transform, then run either as a causal
convolution with the kernel `K_l = C Ab^l Bb` (FFT, for training) or as the recurrence
`x_t = Ab x_{t-1} + Bb u_t` (for decoding). On packed rows the convolution restarts at
each document border (`segment_causal_conv`).

- S4D (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
  Models"): diagonal `A = diag(Lambda)` kept as N/2 complex-conjugate pairs (only one of
  each stored; outputs take `2 Re`), inits "lin", "inv", "legs" (and "real", S4D-Real,
  used by Mamba). The kernel is a Vandermonde product.
- S4 (Gu et al. 2022, "Efficiently Modeling Long Sequences with Structured State Spaces"):
  HiPPO-LegS in its diagonal-plus-low-rank form `A = Lambda - P P^*` (full N, in the
  eigenbasis of the normal part), bilinear discretisation, and the kernel's truncated
  generating function at the roots of unity through the Woodbury identity and Cauchy sums
  (Algorithm 1 of the paper), inverted by an FFT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longjax.ops.scan import linear_scan, segment_keep

S4D_INITS = ("lin", "inv", "legs", "real")
DISCRETIZATIONS = ("zoh", "bilinear")


def hippo_legs(N):
    """HiPPO-LegS `A [N, N]`, `B [N]` (Gu et al. 2020), as numpy float64."""
    q = np.sqrt(2 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(N) + 1.0)
    return A, q.copy()


def dplr_legs(N):
    """HiPPO-LegS as `A = V (diag(Lambda) - p p^*) V^*`: returns `Lambda, p, B` (complex
    `[N]`, in the eigenbasis V of the normal part `A + P P^T`, `P_n = sqrt(n + 1/2)`)."""
    A, B = hippo_legs(N)
    P = np.sqrt(np.arange(N) + 0.5)
    S = A + np.outer(P, P)  # -1/2 I + skew-symmetric
    w, V = np.linalg.eigh(-1j * (S - np.diag(np.diag(S))))
    Lambda = np.mean(np.diag(S)) + 1j * w
    return Lambda, V.conj().T @ P, V.conj().T @ B


def s4d_init(N, kind="lin"):
    """Diagonal `Lambda` (complex `[N // 2]`, one of each conjugate pair; real `[N]` for
    "real") and `B` of the S4D inits (S4D paper, Section 4)."""
    if kind not in S4D_INITS:
        raise ValueError(f"s4d_init: kind must be one of {S4D_INITS}; got {kind!r}")
    n = np.arange(N // 2)
    if kind == "lin":
        return -0.5 + 1j * np.pi * n, np.ones(N // 2, complex)
    if kind == "inv":
        return -0.5 + 1j * N / np.pi * (N / (2 * n + 1) - 1), np.ones(N // 2, complex)
    if kind == "real":
        return -(np.arange(N) + 1.0), np.ones(N)
    Lambda, _, B = dplr_legs(N)
    half = np.argsort(Lambda.imag)[N // 2:]  # the members with positive imaginary part
    return Lambda[half], B[half]


def discretize(Lambda, B, dt, method="zoh"):
    """Diagonal discretisation: `Ab = exp(dt Lambda)` and `Bb = (Ab - 1) / Lambda B` (ZOH), or
    `Ab = (1 + dt/2 Lambda) / (1 - dt/2 Lambda)`, `Bb = dt / (1 - dt/2 Lambda) B` (bilinear).
    Lambda, B `[H, N]`; dt `[H]`."""
    if method not in DISCRETIZATIONS:
        raise ValueError(f"discretize: method must be one of {DISCRETIZATIONS}; got {method!r}")
    dtL = dt[:, None] * Lambda
    if method == "zoh":
        Ab = jnp.exp(dtL)
        return Ab, (Ab - 1.0) / Lambda * B
    return (1 + dtL / 2) / (1 - dtL / 2), dt[:, None] / (1 - dtL / 2) * B


def s4d_kernel(Lambda, B, C, dt, L, method="zoh"):
    """`K [H, L]`, `K_l = 2 Re(sum_n C_n Bb_n Ab_n^l)`. Lambda, B, C complex `[H, N/2]`."""
    Ab, Bb = discretize(Lambda, B, dt, method)
    powers = jnp.exp(jnp.log(Ab)[..., None] * jnp.arange(L))  # Vandermonde [H, N/2, L]
    return 2 * jnp.einsum("hn,hnl->hl", C * Bb, powers).real


def s4_dense(Lambda, p, B, dt):
    """Bilinear `Ab [H, N, N]`, `Bb [H, N]` of `A = diag(Lambda) - p p^*` (all `[H, N]`).

    `(I - dt/2 A)^-1 = (D + dt/2 p p^*)^-1` with `D = diag(1 - dt/2 Lambda)` by the
    Woodbury identity (Gu et al. 2022, S4, Appendix C.2): elementwise ops and one outer
    product, no LAPACK call (which stalls XLA CPU's per-device threads in sharded runs).
    """
    N = Lambda.shape[-1]
    half = dt[:, None] / 2
    A = jnp.eye(N) * Lambda[:, None, :] - p[:, :, None] * p.conj()[:, None, :]
    d_inv = 1 / (1 - half * Lambda)  # [H, N]
    d_inv_p = d_inv * p
    denom = 1 + half * jnp.sum(p.conj() * d_inv_p, -1, keepdims=True)  # [H, 1]
    back = (jnp.eye(N) * d_inv[:, None, :]
            - (half / denom)[..., None] * d_inv_p[:, :, None] * (p.conj() * d_inv)[:, None, :])
    Bb = dt[:, None] * jnp.einsum("hnm,hm->hn", back, B)
    return back @ (jnp.eye(N) + dt[:, None, None] / 2 * A), Bb


def s4_kernel(Lambda, p, B, C, dt, L):
    """`K [H, L]` of the DPLR S4 (bilinear), `K_l = Re(C Ab^l Bb)`, by Algorithm 1 of S4:
    `K^(w) = 2/(1+w) [k00 - k01 (1 + k11)^-1 k10]` at the L-th roots of unity w, with Cauchy
    sums `k_ab = sum_n a_n b_n / (g(w) - Lambda_n)`, `g(w) = 2/dt (1-w)/(1+w)`, and
    `C~ = C (I - Ab^L)`. All of Lambda, p, B, C complex `[H, N]`."""
    Ab = s4_dense(Lambda, p, B, dt)[0]
    C_tilde = jnp.einsum("hn,hnm->hm", C, jnp.eye(Ab.shape[-1]) - _matrix_power(Ab, L))
    w = jnp.exp(-2j * jnp.pi * jnp.arange(L) / L)
    g = (2.0 / dt[:, None]) * (1 - w) / (1 + w)  # [H, L]
    cauchy = lambda a, b: jnp.einsum("hn,hln->hl", a * b, 1 / (g[..., None] - Lambda[:, None]))
    pc = p.conj()
    k00, k01 = cauchy(C_tilde, B), cauchy(C_tilde, p)
    k10, k11 = cauchy(pc, B), cauchy(pc, p)
    K_hat = 2 / (1 + w) * (k00 - k01 * k10 / (1 + k11))
    return jnp.fft.ifft(K_hat, axis=-1).real


def _matrix_power(M, n):
    """`M^n` for a static `n >= 0` by repeated squaring."""
    result, base = jnp.broadcast_to(jnp.eye(M.shape[-1], dtype=M.dtype), M.shape), M
    while n:
        if n & 1:
            result = result @ base
        base, n = base @ base, n >> 1
    return result


def causal_conv(u, K):
    """`y_t = sum_{s<=t} K_{t-s} u_s` by FFT. u `[B, T, H]`, K `[H, T]`; fp32 out."""
    T = u.shape[1]
    n = 2 * T
    U = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)
    Kf = jnp.fft.rfft(K.T.astype(jnp.float32), n=n, axis=0)
    return jnp.fft.irfft(U * Kf, n=n, axis=1)[:, :T]


def segment_causal_conv(u, K, segment_ids, *, block_size=None):
    """`y_t = sum_{s<=t, seg(s)=seg(t)} K_{t-s} u_s`: the causal convolution restarted at
    every document border of `segment_ids` `[B, T]` (a change of id), i.e. S4's convolution
    mode on packed rows, equal to the recurrence with resets. u `[B, T, H]`, K `[H, T]`;
    fp32 out.

    Exact, in blocks of `C = block_size` tokens (default `block_size_for(T)`). Token t in
    block I whose document starts at b in block J:
    - J = I: all its inputs lie in block I: a `C x C` Toeplitz tile of `K_0 .. K_{C-1}`
      masked to the document.
    - J < I: its document is the last one of each block J .. I-1. Let `U` be u kept only
      on each block's last document. Then `y_t = conv(U * [s >= J C], K)_t` (one of
      `T / C` suffix-masked convolutions, batched FFTs, picked by t's J), with block I's
      own part swapped from `U` to `u` by the same Toeplitz tile.
    No data-dependent gather of kernel taps (the tiles' lags are static), so the backward
    pass is as plain as the forward. Work per channel `O(T^2 / C log T + T C)`, all
    parallel (the scan of S4's dense state runs T sequential `N x N` steps); memory about
    `T / C + C` times the activations.
    """
    Bsz, T, H = u.shape
    if segment_ids.shape != (Bsz, T):
        raise ValueError(f"segment_causal_conv: segment_ids must be [B, T] = {(Bsz, T)}; got "
                         f"{segment_ids.shape}")
    C = block_size_for(T) if block_size is None else block_size
    if not isinstance(C, int) or C < 1:
        raise ValueError(f"segment_causal_conv: block_size must be a positive int; got {C!r}")
    blocks = -(-T // C)
    Tp = blocks * C
    t = jnp.arange(Tp)
    u = jnp.pad(u.astype(jnp.float32), ((0, 0), (0, Tp - T), (0, 0)))
    border = jnp.concatenate([jnp.ones((Bsz, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1],
                              jnp.ones((Bsz, Tp - T), bool)], axis=1)
    start = jax.lax.cummax(jnp.where(border, t, 0), axis=1)  # [B, Tp]
    J, I = start // C, t // C
    carried = J < I  # [B, Tp]: the document began in an earlier block
    last_start = start.reshape(Bsz, blocks, C)[:, :, -1]  # each block's last document
    U = jnp.where((start >= last_start[:, I])[..., None], u, 0.0)
    suffixes = jnp.where(t[None, None, :, None] >= C * jnp.arange(blocks)[:, None, None, None],
                         U[None], 0.0)  # [blocks, B, Tp, H]
    n = Tp + T
    Kf = jnp.fft.rfft(K.T.astype(jnp.float32), n=n, axis=0)
    convs = jnp.fft.irfft(jnp.fft.rfft(suffixes, n=n, axis=2) * Kf, n=n, axis=2)[:, :, :Tp]
    far = jnp.take_along_axis(convs, J[None, :, :, None], axis=0)[0]
    lags = jnp.arange(C)[:, None] - jnp.arange(C)[None, :]  # [C, C]: t - s inside a block
    K0 = jnp.pad(K.astype(jnp.float32), ((0, 0), (0, max(C - T, 0))))
    tile = jnp.where(lags >= 0, K0[:, jnp.maximum(lags, 0)], 0.0)  # [H, C, C]
    blocked = lambda x: x.reshape((Bsz, blocks, C) + x.shape[2:])
    same = blocked(start)[..., :, None] == blocked(start)[..., None, :]  # [B, blocks, C, C]
    near = (jnp.einsum("bits,hts,bish->bith", same.astype(jnp.float32), tile, blocked(u))
            - blocked(carried)[..., None] * jnp.einsum("hts,bish->bith", tile, blocked(U)))
    y = jnp.where(carried[..., None], far, 0.0) + near.reshape(Bsz, Tp, H)
    return y[:, :T]


def block_size_for(T):
    """`segment_causal_conv`'s default block: the power of two nearest `sqrt(T log2 T)`,
    balancing its `T / C` FFT convolutions against its `C x C` tiles."""
    return 2 ** round(np.log2(max(T * np.log2(max(T, 2)), 1)) / 2)


def s4d_recurrence(u, Ab, Bb, C, *, initial_state=None, segment_ids=None, impl="auto"):
    """Recurrent mode of S4D: `x_t = Ab x_{t-1} + Bb u_t`, `y_t = 2 Re(C x_t)`.

    u `[B, T, H]`; Ab, Bb, C complex `[H, N/2]`; state complex64 `[B, H, N/2]`. Returns
    `(y [B, T, H] fp32, final state)`; the state resets at `segment_ids` borders.
    """
    x, last = linear_scan(Ab[None, None], s4d_inputs(u, Bb), initial_state=initial_state,
                          segment_ids=segment_ids, return_final_state=True, impl=impl)
    return s4d_readout(C, x), last


def s4d_inputs(u, Bb):
    """`Bb u_t` `[B, T, H, N/2]` complex: the S4D recurrence's inputs."""
    return u.astype(jnp.float32)[..., None] * Bb


def s4d_readout(C, x):
    """`y_t = 2 Re(C x_t)` `[B, T, H]` from the states `x` `[B, T, H, N/2]`."""
    return 2 * jnp.einsum("hn,bthn->bth", C, x).real


def s4_recurrence(u, Ab, Bb, C, *, initial_state=None, segment_ids=None):
    """Recurrent mode of S4 with a dense `Ab [H, N, N]`, `Bb, C [H, N]`; `y_t = Re(C x_t)`;
    state complex64 `[B, H, N]`. Returns `(y [B, T, H] fp32, final state)`."""
    Bsz, T, H = u.shape
    keep = jnp.ones((Bsz, T)) if segment_ids is None else segment_keep(segment_ids)
    x0 = (jnp.zeros((Bsz, H, Ab.shape[-1]), jnp.complex64) if initial_state is None
          else initial_state.astype(jnp.complex64))

    def step(x, inputs):
        u_t, keep_t = inputs
        x = keep_t[:, None, None] * jnp.einsum("hnm,bhm->bhn", Ab, x) + u_t[..., None] * Bb
        return x, jnp.einsum("hn,bhn->bh", C, x).real

    last, y = jax.lax.scan(step, x0, (jnp.moveaxis(u.astype(jnp.float32), 1, 0), keep.T))
    return jnp.moveaxis(y, 0, 1), last
