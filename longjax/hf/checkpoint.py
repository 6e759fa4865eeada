"""`load` and `save`: a Hugging Face checkpoint directory <-> a longjax `DecoderLM`.

A directory holds `config.json` and the weights in `model.safetensors`, or in shards
listed by `model.safetensors.index.json`. They are read with the `safetensors` package
into numpy (never torch), one parameter box at a time: with a mesh, each device's shard
is read from the file by `jax.make_array_from_callback`, so no host holds a full copy of
a parameter per device.
"""

from __future__ import annotations

import contextlib
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from longjax.hf import config as config_lib
from longjax.hf import weights
from longjax.nn import DecoderLM
from longjax.parallel.mesh import LOGICAL_RULES, logical_to_sharding

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tensors a checkpoint may carry that no longjax parameter needs.
_UNUSED_OK = ("rotary_emb.inv_freq",)


def read_config(path) -> dict:
    """`config.json` of the checkpoint directory `path` as a dict."""
    path = pathlib.Path(path)
    if not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; give a Hugging Face checkpoint "
                         f"directory (config.json + *.safetensors)")
    return json.loads((path / "config.json").read_text())


def weight_files(path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded)."""
    path = pathlib.Path(path)
    if (path / INDEX).exists():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    if (path / SINGLE).exists():
        with safetensors.safe_open(path / SINGLE, framework="np") as f:
            return dict.fromkeys(f.keys(), path / SINGLE)
    raise ValueError(f"{path} has neither {SINGLE} nor {INDEX}; longjax.hf reads safetensors "
                     f"weights only (save them with save_pretrained(safe_serialization=True))")


def abstract_params(model: DecoderLM):
    """The model's parameters as boxed `ShapeDtypeStruct`s (logical axis names kept)."""
    with nn.logical_axis_rules(LOGICAL_RULES):
        return jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32)),
                              jax.random.key(0))["params"]


def load_params(path, model: DecoderLM, *, mesh=None, param_dtype="float32"):
    """The parameters of `model` read from the checkpoint directory `path`, each placed
    by its logical axes on `mesh` (default: the first device)."""
    hf = read_config(path)
    arch = config_lib.architecture(hf)
    boxed = abstract_params(model)
    shapes = traverse_util.flatten_dict(nn.unbox(boxed))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = dict.fromkeys(shapes, device)
    else:
        shardings = traverse_util.flatten_dict(
            logical_to_sharding(nn.get_partition_spec(boxed), mesh))
    files = weight_files(path)
    tensors = weights.tensors(arch, model.model.num_layers, shapes)
    unmapped = set(shapes) - {t.path for t in tensors}
    if unmapped:
        raise ValueError(f"{arch} has no checkpoint tensor for parameters "
                         f"{sorted('/'.join(p) for p in unmapped)}")
    missing = [t.name for t in tensors if t.name not in files]
    if missing:
        raise ValueError(f"{path}: the {arch} config needs tensors missing from the "
                         f"checkpoint: {missing}")
    used = {t.name for t in tensors}
    if model.model.tie_embeddings:
        used.add("lm_head.weight")  # a tied head may be stored too
    unused = [n for n in files if n not in used and not n.endswith(_UNUSED_OK)]
    if unused:
        raise ValueError(f"{path}: tensors {unused} have no place in the longjax model of "
                         f"this config.json (a field it does not map?)")
    params = {}
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safetensors.safe_open(file, framework="np"))
                   for file in set(files.values())}
        for t in tensors:
            shape = shapes[t.path].shape
            tensor = handles[files[t.name]].get_slice(t.name)
            if tuple(tensor.get_shape()) != t.hf_shape(shape):
                raise ValueError(f"{path}: tensor {t.name} has shape {tensor.get_shape()}; "
                                 f"config.json implies {list(t.hf_shape(shape))}")
            params[t.path] = jax.make_array_from_callback(
                shape, shardings[t.path],
                lambda index, t=t, tensor=tensor, shape=shape: t.read(
                    tensor, shape, index, np.dtype(param_dtype)))
    return traverse_util.unflatten_dict(params)


def load(path, *, dtype="bfloat16", mesh=None, param_dtype="float32"):
    """`(model, params)` of the checkpoint directory `path`: a `DecoderLM` computing in
    `dtype` and its parameters (`param_dtype`, placed on `mesh` when given), so
    `model.apply({"params": params}, tokens)` gives `(logits, cache)`."""
    config = config_lib.model_config(read_config(path), dtype=dtype)
    model = DecoderLM(ml_collections.FrozenConfigDict(config))
    return model, load_params(path, model, mesh=mesh, param_dtype=param_dtype)


def save(path, model: DecoderLM, params, *, hf_fields=None, dtype=None,
         max_shard_bytes=None):
    """Writes `model` and `params` as a checkpoint `transformers` loads: `config.json`
    (`hf_config` of the model, updated by `hf_fields`, e.g. token ids) and the weights
    (cast to `dtype` if given) in one file, or in shards of at most `max_shard_bytes`
    with their index. Raises ValueError when no supported family expresses the model."""
    path = pathlib.Path(path)
    hf = config_lib.hf_config(model.model)
    hf.update(hf_fields or {})
    arch = hf["architectures"][0]
    params = params.get("params", params) if isinstance(params, dict) else params
    flat = traverse_util.flatten_dict(jax.device_get(nn.unbox(params)))
    tensors = weights.tensors(arch, model.model.num_layers, flat)
    unmapped = set(flat) - {t.path for t in tensors}
    if unmapped:
        raise ValueError(f"{arch} has no checkpoint tensor for parameters "
                         f"{sorted('/'.join(p) for p in unmapped)}")
    out = {}
    for t in tensors:
        value = np.asarray(flat[t.path])
        out[t.name] = t.write(value if dtype is None else value.astype(dtype))
    hf["dtype"] = str(next(iter(out.values())).dtype)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        safetensors.numpy.save_file(out, path / SINGLE, metadata=metadata)
        return path
    shards, size = [[]], 0
    for name, value in out.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += value.nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file({n: out[n] for n in names}, path / file, metadata=metadata)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(v.nbytes for v in out.values())},
             "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return path
