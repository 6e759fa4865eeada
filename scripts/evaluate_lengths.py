"""Length extrapolation of a trained checkpoint: bits per byte, loss per position and
passkey retrieval versus evaluation length, under training-free extension methods.

    python scripts/evaluate_lengths.py --workdir=workdirs/quickstart \\
        --methods=none,linear:auto,ntk:auto,yarn:auto,lm_infinite,streaming

Lengths default to 1x .. 16x the training length. Methods (longjax.eval.methods): none,
linear:S, ntk:S, dynamic_ntk:S, yarn:S, llama3:S (S a factor or "auto" = length / training
length), lm_infinite[:B], streaming[:B] (B a cache budget), window, self_extend:G:W, logn,
cache:NAME[:B][:option=value...] (a KV-cache policy); for Mamba and Mamba-2 layers
delta_scale:S, decay_scale:S, input_scale:S, state_norm:C (Stuffed Mamba), for Mamba
layers decimation:I:K (DeciMamba, layer I keeps K tokens or "auto"); combine with "+". Outputs
go to <workdir>/extrapolation/ (or --output_dir): results.csv, loss_per_position.csv,
results.md and plots. A checkpoint trained on a synthetic task is evaluated per test size
(--task_sizes) instead.

RULER-style tasks (longjax.data.tasks.ruler: niah_single, niah_multikey, niah_multivalue,
niah_multiquery, vt, cwe, fwe) are generated greedily and scored at every length and
needle depth, with heatmaps (ruler.png, ruler_<task>.png) and ruler_samples.csv:

    python scripts/evaluate_lengths.py --workdir=workdirs/quickstart --lengths=256,1024 \\
        --ruler_tasks=niah_single,niah_multikey,vt,cwe --ruler_samples=5 \\
        --ruler_depths=0,0.5,1 --passkey_samples=0

--ruler_options=haystack=noise (name=value,...) sets an option of every task that takes
it (longjax.data.tasks.ruler.RULER_TASKS), e.g. RULER's noise haystack for the needles.
With --jrt every RULER prompt's context is read twice before its question (JRT-Prompt,
Arora et al. 2024; longjax.data.tasks.jrt), so a prompt of length n holds n + its context.

A KV-cache policy (longjax.nn.kv_cache: h2o, snapkv, streaming, ...) with a budget of B
tokens per layer and KV head applies to every method (its results are labelled
"<method>+cache:NAME:B..."); text, passkey and task rows are then scored through the
cache --cache_chunk tokens per call, RULER prompts prefilled in one call and decoded:

    python scripts/evaluate_lengths.py --workdir=workdirs/ruler --lengths=1024 \
        --cache_policy=snapkv --cache_budget=128 --cache_options=window=16 \
        --ruler_tasks=niah_single,vt --passkey_samples=0

Launched as several processes (see scripts/train.py), every process evaluates and process
0 writes the outputs.

A Hugging Face checkpoint directory (`--hf`, read by longjax.hf) is evaluated the same
way on the default corpus (or `--data_path`'s text files) in its own tokens
(tokenizer.json): perplexity per token, bits per byte of the text, passkey in its tokens.
Its training length is config.json's (--train_length overrides it):

    python scripts/evaluate_lengths.py --hf=path/to/Llama-3.2-1B --lengths=4096,16384 \\
        --methods=none,yarn:auto,self_extend:8:1024,streaming --output_dir=out/llama
"""

import functools
import pathlib
import sys
import time

import jax
from absl import app, flags

from longjax import distributed
from longjax.eval import cache_flags, report
from longjax.eval.extrapolation import evaluate_hf, evaluate_workdir
from longjax.train.config import parse_arg

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_HF = flags.DEFINE_string("hf", None, "Hugging Face checkpoint directory, instead of "
                          "--workdir (needs --output_dir).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of an --hf model.")
_TRAIN_LENGTH = flags.DEFINE_integer("train_length", None, "Training length of an --hf "
                                     "model (default: from its config.json).")
_DATA_PATH = flags.DEFINE_string("data_path", "", "Folder of text files to score an --hf "
                                 "model on (default: the embedded corpus).")
_LENGTHS = flags.DEFINE_list(
    "lengths", [], "Evaluation lengths in tokens (default: 1x, 2x, 4x, 8x, 16x the training "
    "length).")
_METHODS = flags.DEFINE_list("methods", ["none"], "Extension methods, '+' to combine.")
_NUM_TOKENS = flags.DEFINE_integer(
    "num_tokens", 32768, "Text targets scored per length and mode (rounded up to whole "
    "passages of the longest length).")
_STRIDE = flags.DEFINE_integer(
    "stride", None, "Sliding-window stride in tokens, at most the shortest length (default: "
    "half of each length; 0: no sliding-window evaluation).")
_DEPTHS = flags.DEFINE_list("passkey_depths", ["0", "0.25", "0.5", "0.75", "1"],
                            "Passkey needle depths in [0, 1].")
_PASSKEY_SAMPLES = flags.DEFINE_integer(
    "passkey_samples", 5, "Passkey rows per length and depth (0: no passkey).")
_TASK_SIZES = flags.DEFINE_list(
    "task_sizes", [], "Test sizes (instance sizes n) for a checkpoint trained on a synthetic "
    "task; it is scored at each (min_length = max_length = n).")
flags.DEFINE_alias("tasks_sizes", "task_sizes")
_TASK_SAMPLES = flags.DEFINE_integer("task_samples", 64, "Task rows per test size.")
_RULER_TASKS = flags.DEFINE_list("ruler_tasks", [], "RULER-style tasks to generate and "
                                 "score (longjax.data.tasks.ruler.RULER_TASKS).")
_RULER_SAMPLES = flags.DEFINE_integer("ruler_samples", 5, "RULER samples per task, length "
                                      "and depth.")
_RULER_DEPTHS = flags.DEFINE_list("ruler_depths", ["0", "0.25", "0.5", "0.75", "1"],
                                  "Depths in [0, 1] of the asked needle of the RULER tasks.")
_RULER_OPTIONS = flags.DEFINE_list(
    "ruler_options", [], "Options of the RULER tasks, name=value,... (e.g. haystack=noise), "
    "given to every task that takes them.")
_JRT = flags.DEFINE_bool("jrt", False, "JRT-Prompt: read each RULER prompt's context twice "
                         "before its question.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Rows (windows) per forward call.")
_CACHE_CHUNK = flags.DEFINE_integer("cache_chunk", 64, "With --cache_policy: tokens per call "
                                    "when rows are scored through the cache.")
_NUM_BINS = flags.DEFINE_integer("num_bins", 32, "Bins of the loss-per-position curves.")
_BIN_SPACING = flags.DEFINE_enum("bin_spacing", "log", ["log", "linear"],
                                 "Spacing of the loss-per-position bins.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Output folder (default: <workdir>/extrapolation).")
distributed.define_flags()
cache_flags.define_flags()


def _numbers(flag, kind):
    try:
        return [kind(v) for v in flag.value]
    except ValueError as e:
        raise ValueError(f"--{flag.name}={','.join(flag.value)}: {e}") from e


def _ruler_options() -> dict:
    """`--ruler_options` as a dict (Python literals, else strings)."""
    try:
        return parse_arg(",".join(_RULER_OPTIONS.value))
    except ValueError as e:
        raise ValueError(f"--ruler_options={','.join(_RULER_OPTIONS.value)}: {e}") from e


def main(argv):
    del argv
    tick = time.perf_counter()
    try:
        distributed.join_from_flags()
        if (_WORKDIR.value is None) == (_HF.value is None):
            raise ValueError("give exactly one of --workdir and --hf")
        if _HF.value is not None and _OUTPUT_DIR.value is None:
            raise ValueError("--hf needs --output_dir (the checkpoint folder stays as it is)")
        if _HF.value is not None:
            evaluate = functools.partial(evaluate_hf, _HF.value, dtype=_DTYPE.value,
                                         train_length=_TRAIN_LENGTH.value,
                                         data_path=_DATA_PATH.value)
        else:
            evaluate = functools.partial(evaluate_workdir, _WORKDIR.value)
        cache = cache_flags.method_part_from_flags()
        methods = [m if cache is None else f"{m}+{cache}" for m in _METHODS.value]
        results = evaluate(
            lengths=_numbers(_LENGTHS, int), methods=methods, cache_chunk=_CACHE_CHUNK.value,
            num_tokens=_NUM_TOKENS.value, stride=_STRIDE.value,
            passkey_depths=_numbers(_DEPTHS, float), passkey_samples=_PASSKEY_SAMPLES.value,
            task_sizes=_numbers(_TASK_SIZES, int), task_samples=_TASK_SAMPLES.value,
            ruler_tasks=_RULER_TASKS.value, ruler_samples=_RULER_SAMPLES.value,
            ruler_depths=_numbers(_RULER_DEPTHS, float), jrt=_JRT.value,
            ruler_options=_ruler_options(),
            batch_size=_BATCH_SIZE.value, num_bins=_NUM_BINS.value,
            bin_spacing=_BIN_SPACING.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if jax.process_index() > 0:
        return
    output_dir = _OUTPUT_DIR.value or pathlib.Path(_WORKDIR.value) / "extrapolation"
    paths = report.write_outputs(results, output_dir)
    print(f"Evaluated in {time.perf_counter() - tick:.0f} s; wrote:")
    for path in paths:
        print(f"  {path}")


if __name__ == "__main__":
    app.run(main)
