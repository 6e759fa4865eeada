"""Which kernel runs: the one for the platform the code is lowered for.

`jax.default_backend()` names the host's devices, not the target: a function jitted on a
CPU host and lowered (or exported) for `cuda` or `tpu` must take that platform's kernel.
`jax.lax.platform_dependent` stages one branch per kernel and keeps only the branch of the
lowering platform, so one jitted function lowers for GPU and for TPU from any host. A
kernel that cannot serve a call (a limit of its blocks) gets a branch that refuses with a
ValueError when lowered for its platform, so the other platform's kernel still lowers.
"""

from __future__ import annotations

import jax
from jax.extend.core import Primitive
from jax.interpreters import mlir

BACKENDS = ("gpu", "tpu")
_PLATFORMS = {"gpu": ("cuda", "rocm"), "tpu": ("tpu",)}


def by_platform(kernel, *args, backend=None, interpret=False, refusal=None):
    """`kernel(backend, *args)` with `backend` "gpu" (Triton, on cuda and rocm) or "tpu"
    (Mosaic) following the lowering platform, unless `backend` names one.

    `refusal(backend)` gives the reason a backend's kernel cannot serve this call, or None;
    a named backend that refuses raises ValueError now, a platform whose kernel refuses
    raises it when lowered for. With `interpret=True` (the interpreter runs on every
    platform) the default is the GPU kernel's interpretation. Without it, lowering for a
    platform with no kernel (cpu) fails: use the interpreter or another impl there.
    """
    if interpret and backend is None:
        backend = "gpu"
    reasons = {b: refusal(b) if refusal else None for b in BACKENDS}
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
        if reasons[backend]:
            raise ValueError(reasons[backend])
        return kernel(backend, *args)
    if all(reasons.values()):
        raise ValueError("; ".join(reasons.values()))
    served = next(b for b in BACKENDS if not reasons[b])
    branches = {b: _refused(reasons[b], kernel, served) if reasons[b] else
                (lambda *a, b=b: kernel(b, *a)) for b in BACKENDS}
    return jax.lax.platform_dependent(
        *args, **{p: branches[b] for b in BACKENDS for p in _PLATFORMS[b]})


_refused_p = Primitive("pallas_kernel_refused")
_refused_p.multiple_results = True
_refused_p.def_abstract_eval(lambda *args, out_avals, reason: out_avals)


def _lower_refused(ctx, *args, out_avals, reason):
    raise ValueError(reason)


mlir.register_lowering(_refused_p, _lower_refused)


def _refused(reason, kernel, served):
    """A branch shaped like `kernel(served, ...)` (and differentiable) whose lowering
    raises `ValueError(reason)`."""
    def stand_in(shapes_of, *args):
        out = jax.eval_shape(shapes_of, *args)
        leaves, tree = jax.tree.flatten(out)
        avals = tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in leaves)
        return tree.unflatten(_refused_p.bind(*args, out_avals=avals, reason=reason))

    @jax.custom_vjp
    def branch(*args):
        return stand_in(lambda *a: kernel(served, *a), *args)

    def fwd(*args):
        return branch(*args), args

    def bwd(args, cotangents):
        return stand_in(lambda *a: a, *args)

    branch.defvjp(fwd, bwd)
    return branch
