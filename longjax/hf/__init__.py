"""Hugging Face checkpoints in and out: `load(path, *, dtype="bfloat16", mesh=None)` ->
`(model, params)` and `save(path, model, params)`, for `LlamaForCausalLM`,
`MistralForCausalLM`, `Qwen2ForCausalLM`, `Gemma2ForCausalLM`, `MambaForCausalLM` and
`Mamba2ForCausalLM` (safetensors read into numpy; torch is never imported).

    model, params = longjax.hf.load("path/to/Llama-3.2-1B", dtype="bfloat16")
    logits, _ = model.apply({"params": params}, tokens)
    longjax.hf.save("out/", model, params)   # transformers' from_pretrained reads it

`config` maps `config.json` to `config.model` and back; `weights` maps the tensors.
"""

from longjax.hf.checkpoint import load, load_params, read_config, save
from longjax.hf.config import ARCHITECTURES, hf_config, model_config

__all__ = ["ARCHITECTURES", "hf_config", "load", "load_params", "model_config", "read_config",
           "save"]
