"""Which safetensors tensor is which longjax parameter, and how its layout changes.

A `Tensor` names a checkpoint tensor and a parameter path, and says how the parameter's
axes group into the tensor's axes: torch's `Linear.weight [out, in]` becomes a kernel
`[*in, *out]` (with `in` / `out` split into heads and head dims where longjax keeps them
apart), a `Conv1d.weight [C, 1, K]` becomes `[K, C]`. The mapping is one transpose of
axis groups, so any box of the parameter (one device's shard) is read from a box of the
tensor that covers whole rows of the split axes: `read` takes such an index, and reads
only that part of the file.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

_KINDS = ("linear", "linear2", "vector", "matrix", "conv")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Checkpoint tensor `name` <-> parameter `path`.

    kind: `"linear"` (`[out, in]` <-> kernel `[in, *out]`), `"linear2"` (`[out, in]` <->
    kernel `[*in(2 axes), out]`), `"vector"` (`[n]` <-> `[*dims]`), `"matrix"` (same
    layout), `"conv"` (`[C, 1, K]` <-> `[K, C]`). `offset` is added on the way in (Gemma's
    norms store `w` for a scale of `1 + w`) and subtracted on the way out.
    """

    name: str
    path: tuple[str, ...]
    kind: str
    offset: float = 0.0

    def layout(self, shape):
        """(groups, order) for the parameter `shape`: the parameter axes each tensor axis
        splits into (tensor order; `()` is a size-1 axis), and the tensor axes in
        parameter order."""
        if self.kind == "linear":
            return (tuple(shape[1:]), tuple(shape[:1])), (1, 0)
        if self.kind == "linear2":
            return (tuple(shape[2:]), tuple(shape[:2])), (1, 0)
        if self.kind == "vector":
            return (tuple(shape),), (0,)
        if self.kind == "matrix":
            return tuple((n,) for n in shape), tuple(range(len(shape)))
        if self.kind == "conv":
            return ((shape[1],), (), (shape[0],)), (2, 0)
        raise ValueError(f"Tensor.kind={self.kind!r}; allowed: {list(_KINDS)}")

    def hf_shape(self, shape):
        groups, _ = self.layout(shape)
        return tuple(math.prod(g) for g in groups)

    def _axes(self, shape):
        """(groups, tensor axis -> its parameter axes, the parameter axes in tensor order)."""
        groups, order = self.layout(shape)
        axis_of, start = {}, 0
        for t in order:
            axis_of[t] = list(range(start, start + len(groups[t])))
            start += len(groups[t])
        return groups, axis_of, [a for t, g in enumerate(groups) if g for a in axis_of[t]]

    def read(self, tensor_slice, shape, index, dtype):
        """The box `index` (slices per parameter axis) of the parameter of `shape`, read
        from `tensor_slice` (a safetensors `get_slice` handle) as `dtype`."""
        groups, axis_of, tensor_axes = self._axes(shape)
        index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
        reads, local_shape, inner = [], [], []
        for t, group in enumerate(groups):
            if not group:
                reads.append(slice(0, 1))
                continue
            axes = axis_of[t]
            lo, hi, _ = index[axes[0]].indices(group[0])
            rest = math.prod(group[1:])
            reads.append(slice(lo * rest, hi * rest))
            local_shape += [hi - lo, *group[1:]]
            inner += [slice(None)] + [index[a] for a in axes[1:]]
        block = np.asarray(tensor_slice[tuple(reads)]).reshape(local_shape)
        block = block[tuple(inner)].transpose(np.argsort(tensor_axes))  # parameter order
        return (block.astype(np.float32) + self.offset).astype(dtype) if self.offset else (
            block.astype(dtype))

    def write(self, value):
        """The checkpoint tensor of the parameter `value` (a numpy array)."""
        value = np.asarray(value)
        _, _, tensor_axes = self._axes(value.shape)
        if self.offset:
            value = (value.astype(np.float32) - self.offset).astype(value.dtype)
        return np.ascontiguousarray(value.transpose(tensor_axes).reshape(self.hf_shape(
            value.shape)))


def _attention_layer(prefix, i, gemma, offset):
    layer = ("layer_" + str(i),)
    attn = layer + ("mixer",)
    tensors = [Tensor(f"{prefix}.input_layernorm.weight", layer + ("mixer_norm", "scale"),
                      "vector", offset)]
    for hf, ours in (("q", "query"), ("k", "key"), ("v", "value")):
        tensors += [Tensor(f"{prefix}.self_attn.{hf}_proj.weight", attn + (ours, "kernel"),
                           "linear"),
                    Tensor(f"{prefix}.self_attn.{hf}_proj.bias", attn + (ours, "bias"),
                           "vector")]
    tensors += [Tensor(f"{prefix}.self_attn.o_proj.weight", attn + ("out", "kernel"), "linear2"),
                Tensor(f"{prefix}.self_attn.o_proj.bias", attn + ("out", "bias"), "vector")]
    for hf, ours in (("gate", "gate"), ("up", "up"), ("down", "down")):
        tensors.append(Tensor(f"{prefix}.mlp.{hf}_proj.weight", layer + ("mlp", ours, "kernel"),
                              "linear"))
    norms = ((("post_attention_layernorm", "mixer_post_norm"),
              ("pre_feedforward_layernorm", "mlp_norm"),
              ("post_feedforward_layernorm", "mlp_post_norm")) if gemma
             else (("post_attention_layernorm", "mlp_norm"),))
    tensors += [Tensor(f"{prefix}.{hf}.weight", layer + (ours, "scale"), "vector", offset)
                for hf, ours in norms]
    return tensors


def _mamba_layer(prefix, i, mamba2):
    layer = ("layer_" + str(i),)
    mixer = layer + ("mixer",)
    tensors = [Tensor(f"{prefix}.norm.weight", layer + ("mixer_norm", "scale"), "vector"),
               Tensor(f"{prefix}.mixer.in_proj.weight", mixer + ("in_proj", "kernel"), "linear"),
               Tensor(f"{prefix}.mixer.conv1d.weight", mixer + ("conv", "kernel"), "conv"),
               Tensor(f"{prefix}.mixer.conv1d.bias", mixer + ("conv_bias",), "vector"),
               Tensor(f"{prefix}.mixer.A_log", mixer + ("A_log",), "matrix"),
               Tensor(f"{prefix}.mixer.D", mixer + ("D",), "vector"),
               Tensor(f"{prefix}.mixer.out_proj.weight", mixer + ("out_proj", "kernel"),
                      "linear")]
    if mamba2:
        return tensors + [
            Tensor(f"{prefix}.mixer.dt_bias", mixer + ("dt_bias",), "vector"),
            Tensor(f"{prefix}.mixer.norm.weight", mixer + ("norm", "scale"), "vector")]
    return tensors + [
        Tensor(f"{prefix}.mixer.x_proj.weight", mixer + ("x_proj", "kernel"), "linear"),
        Tensor(f"{prefix}.mixer.dt_proj.weight", mixer + ("dt_proj", "kernel"), "linear"),
        Tensor(f"{prefix}.mixer.dt_proj.bias", mixer + ("dt_bias",), "vector")]


def tensors(arch: str, num_layers: int, param_paths) -> list[Tensor]:
    """The tensors of architecture `arch` whose parameter is in `param_paths` (so biases
    and an untied head appear only where the model has them)."""
    if arch in ("MambaForCausalLM", "Mamba2ForCausalLM"):
        mamba2 = arch == "Mamba2ForCausalLM"
        out = [Tensor("backbone.embeddings.weight", ("embed", "embedding"), "matrix"),
               Tensor("backbone.norm_f.weight", ("final_norm", "scale"), "vector")]
        for i in range(num_layers):
            out += _mamba_layer(f"backbone.layers.{i}", i, mamba2)
    else:
        gemma = arch == "Gemma2ForCausalLM"
        offset = 1.0 if gemma else 0.0
        out = [Tensor("model.embed_tokens.weight", ("embed", "embedding"), "matrix"),
               Tensor("model.norm.weight", ("final_norm", "scale"), "vector", offset)]
        for i in range(num_layers):
            out += _attention_layer(f"model.layers.{i}", i, gemma, offset)
    out.append(Tensor("lm_head.weight", ("unembed", "kernel"), "linear"))
    paths = set(param_paths)
    return [t for t in out if t.path in paths]
