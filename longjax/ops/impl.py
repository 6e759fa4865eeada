"""The one place that resolves `impl="auto"`: per op, per platform being lowered for.

`choose(op, platform, ...)` is the table (README, "Implementations"): which
implementation `impl="auto"` runs for an op on a platform given the call's shapes, dtype
and mask features. `dispatch(choices, call)` runs `call(impl)` for the platform the code
is lowered for (`jax.lax.platform_dependent` when platforms differ), so a function jitted
on one host and lowered for another takes the target's choice.

A kernel is chosen on a platform only once it has been measured correct and faster there
(`python -m longjax.selfcheck --record`, `benchmarks/RESULTS.md`). Nothing has been
measured on an accelerator yet, so `auto` takes the safest fast path: cuDNN through
`jax.nn.dot_product_attention` on NVIDIA GPUs for the attention calls it supports, the
pure-JAX `"xla"` path otherwise, and the split-cache path for one-query decoding. The
Pallas kernels run when asked for (`impl="pallas"`). All choices compute the same math.
"""

from __future__ import annotations

import functools

import jax

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
OPS = ("attention", "ring_attention_tile", "selective_scan", "ssd", "linear_attention")
_WITH_KERNELS = ("attention", "ring_attention_tile", "selective_scan")  # Pallas kernels


@functools.cache
def cudnn_available():
    """True when this process can trace cuDNN attention (a CUDA jaxlib with cuDNN):
    `jax.nn.dot_product_attention(implementation="cudnn")` checks the library at trace
    time, so without it the cuDNN path cannot be staged even for a `cuda` lowering."""
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

    try:
        check_cudnn_version()
    except (RuntimeError, ImportError):
        return False
    return True


def choose(op, platform, *, query_length=None, cudnn_supported=False):
    """The implementation `impl="auto"` runs for `op` lowered for `platform`.

    Attention features: `query_length` (one query is decoding) and `cudnn_supported`
    (the call is one cuDNN serves: bf16/fp16, no soft-cap, sinks, segments, positions,
    ALiBi or lse; see `longjax.ops.attention`).
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}; got {op!r}")
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}; got {platform!r}")
    if op == "attention":
        if query_length == 1:  # decode: the cache in parallel splits, no loop over blocks
            return "split_kv"
        if platform == "cuda" and cudnn_supported and cudnn_available():
            return "cudnn"
    # Every other op and platform: the blockwise / chunked pure-JAX path, O(T) memory. On
    # CPU it is measured fastest (benchmarks/RESULTS.md); on GPU and TPU no kernel has
    # been measured yet.
    return "xla"


def choices(op, **features):
    """`{platform: implementation}` of `choose` for every platform."""
    return {platform: choose(op, platform, **features) for platform in PLATFORMS}


def dispatch(by_platform, call):
    """`call(impl)` with `impl = by_platform[p]` for the platform p lowered for.

    One choice for all platforms is a plain call; otherwise each distinct choice is staged
    under `jax.lax.platform_dependent` and only the target's branch is lowered.
    """
    distinct = set(by_platform.values())
    if len(distinct) == 1:
        return call(distinct.pop())
    branches = {platform: functools.partial(call, impl)
                for platform, impl in by_platform.items()}
    return jax.lax.platform_dependent(**branches)


def run(op, impl, call, **features):
    """`call(name)` with `impl`, or with `choose`'s choice for the lowering platform when
    `impl == "auto"` (`features` as for `choose`)."""
    if impl != "auto":
        return call(impl)
    return dispatch(choices(op, **features), call)


def host_platform():
    """The lowering platform name of this process's default devices: "cpu", "cuda",
    "rocm" or "tpu" (JAX names GPU devices "gpu" for both vendors)."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def available(op, platform):
    """Every implementation of `op` that runs on `platform` (the self-check runs them),
    the reference first. The Pallas interpreter runs anywhere but slowly; it is listed
    where no compiled kernel exists."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}; got {op!r}")
    impls = ["reference", "xla"]
    if op == "attention":
        impls.append("split_kv")
        if platform == "cuda" and cudnn_available():
            impls.append("cudnn")
    if op in _WITH_KERNELS:
        impls.append("pallas_interpret" if platform == "cpu" else "pallas")
    return tuple(impls)
