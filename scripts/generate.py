"""Continue a prompt with a trained model: a workdir's latest checkpoint (byte tokens),
or a Hugging Face checkpoint directory with its own tokenizer.json (`--hf`).

    python scripts/generate.py --workdir=workdirs/quickstart --prompt="def main(" \\
        --max_new_tokens=200 --temperature=0.8 --top_p=0.95 --seed=0
    python scripts/generate.py --hf=path/to/Llama-3.2-1B --prompt="The capital of" \\
        --temperature=0 --dtype=float32

`--cache_policy=NAME --cache_budget=B --cache_options=name=value,...` decode with a
KV-cache policy of longjax.nn.kv_cache (h2o, snapkv, streaming, ...):

    python scripts/generate.py --workdir=workdirs/quickstart --prompt="def main(" \
        --cache_policy=h2o --cache_budget=256 --temperature=0

`--temperature=0` is greedy. Generation stops at the end-of-text token or after
`--max_new_tokens`; the prompt and continuation are printed. Launched as several
processes (see scripts/train.py), each process generates the same text with the same seed
and process 0 prints it.
"""

import sys

import jax
from absl import app, flags

from longjax import distributed, hf
from longjax.data import tokenizer
from longjax.eval import cache_flags
from longjax.eval.methods import apply_cache_method
from longjax.generate import generate, load_model
from longjax.nn import DecoderLM

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_HF = flags.DEFINE_string("hf", None, "Hugging Face checkpoint directory (config.json, "
                          "*.safetensors, tokenizer.json), instead of --workdir.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                           "Compute dtype of an --hf model.")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text (empty: start from BOS alone).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 512, "Prompts longer than this are prefilled in chunks of this size.")
distributed.define_flags()
cache_flags.define_flags()


def continuation(workdir, prompt, *, max_new_tokens, temperature, top_k, top_p, seed,
                 prefill_chunk=512, hf_dir=None, dtype="bfloat16", cache=None) -> str:
    """The text the model in `workdir` (or the Hugging Face checkpoint `hf_dir`) writes
    after `prompt`, with the KV-cache policy of the method part `cache` when given."""
    if hf_dir is not None:
        model, params = hf.load(hf_dir, dtype=dtype)
        tok = tokenizer.load(hf_dir)
    else:
        (model, params, _), tok = load_model(workdir), tokenizer.load()
    if cache is not None:
        model = DecoderLM(apply_cache_method(model.model, cache))
    ids = tok.encode(prompt, add_bos=True, add_eos=False)
    if len(ids) == 0:
        raise ValueError("the prompt is empty and the tokenizer has no BOS token; give "
                         "--prompt")
    out = generate(model, params, [ids], max_new_tokens=max_new_tokens,
                   rng=jax.random.key(seed), temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   prefill_chunk=prefill_chunk if len(ids) > prefill_chunk else None)
    return tok.decode(out.tokens[0, :int(out.lengths[0])])


def main(argv):
    del argv
    try:
        distributed.join_from_flags()
        if (_WORKDIR.value is None) == (_HF.value is None):
            raise ValueError("give exactly one of --workdir and --hf")
        text = continuation(_WORKDIR.value, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                            temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, seed=_SEED.value,
                            prefill_chunk=_PREFILL_CHUNK.value, hf_dir=_HF.value,
                            dtype=_DTYPE.value, cache=cache_flags.method_part_from_flags())
    except ValueError as e:
        sys.exit(f"error: {e}")
    if jax.process_index() == 0:
        print(_PROMPT.value + text)


if __name__ == "__main__":
    app.run(main)
