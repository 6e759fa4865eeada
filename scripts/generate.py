"""Continue a prompt with a trained model: restores the workdir's latest checkpoint.

    python scripts/generate.py --workdir=workdirs/quickstart --prompt="def main(" \\
        --max_new_tokens=200 --temperature=0.8 --top_p=0.95 --seed=0

`--temperature=0` is greedy. Generation stops at the end-of-text token or after
`--max_new_tokens`; the prompt and continuation are printed. Launched as several
processes (see scripts/train.py), each process generates the same text with the same seed
and process 0 prints it.
"""

import sys

import jax
from absl import app, flags

from longjax import distributed
from longjax.data import tokenizer
from longjax.generate import generate, load_model

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text (empty: start from BOS alone).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampling.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 512, "Prompts longer than this are prefilled in chunks of this size.")
flags.mark_flags_as_required(["workdir"])
distributed.define_flags()


def continuation(workdir, prompt, *, max_new_tokens, temperature, top_k, top_p, seed,
                 prefill_chunk=512) -> str:
    """The text the model in `workdir` writes after `prompt`."""
    model, params, _ = load_model(workdir)
    ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    out = generate(model, params, [ids], max_new_tokens=max_new_tokens,
                   rng=jax.random.key(seed), temperature=temperature, top_k=top_k,
                   top_p=top_p, prefill_chunk=prefill_chunk if len(ids) > prefill_chunk else None)
    return tokenizer.decode(out.tokens[0, :int(out.lengths[0])])


def main(argv):
    del argv
    try:
        distributed.join_from_flags()
        text = continuation(_WORKDIR.value, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                            temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, seed=_SEED.value,
                            prefill_chunk=_PREFILL_CHUNK.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if jax.process_index() == 0:
        print(_PROMPT.value + text)


if __name__ == "__main__":
    app.run(main)
