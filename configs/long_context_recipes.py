"""Long-context training recipes at equal compute: the quickstart model on the embedded
corpus, 4096 tokens per step, with one of four recipes (docs/results/long_context_recipes.md):

    python scripts/train.py --config=configs/long_context_recipes.py:recipe=concat \\
        --workdir=workdirs/recipes/concat
    python scripts/train.py --config=configs/long_context_recipes.py:recipe=best_fit ...
    python scripts/train.py --config=configs/long_context_recipes.py:recipe=decomposition ...
    python scripts/train.py --config=configs/long_context_recipes.py:recipe=extension ...

- `concat`: concat-and-chunk rows of 256 tokens (documents kept apart by `segment_ids`).
- `best_fit`: best-fit packing (Ding et al. 2024), no document shorter than a row is cut.
- `decomposition`: dataset decomposition (Pouransari et al. 2024), buckets 32..256, the
  Grow-P2 curriculum over 8 cycles; batch size x length = 4096 in every bucket. The
  standard-library files are long: 99.4% of the targets fall in the 256 bucket, so each
  25-step cycle has one step of each of 32, 64 and 128 tokens (Grow odds: mostly early).
- `extension`: progressive length extension (Xiong et al. 2023): 2/3 of the steps at 128
  tokens with RoPE base 10^4, then 1/3 at 256 tokens with base 5 x 10^5.

Every run evaluates validation bits per byte at 256 and at 1024 tokens (4x) every 20
steps on the same 32K validation tokens (`eval.num_batches` counts batches of 256) and
logs `train_seconds` (training time without evaluation, jit compilation included); 200
steps, about 4 minutes per run (2.5-3 of them training) on one core of an idle 2-core Intel
Xeon. The final state on more validation text (196K tokens): run the same command again
with `--config.eval.num_batches=48` (it resumes at the end and evaluates once, ~1 minute).
Compare the runs with scripts/compare_runs.py (the command is in the results page).
Other fields through the arg string as in every config, e.g. `recipe=best_fit,steps=100`.
"""

from longjax.train.config import apply_arg, base_config, parse_arg

RECIPES = ("concat", "best_fit", "decomposition", "extension")


def get_config(arg=None):
    recipe = str(parse_arg(arg).get("recipe", "concat"))
    rest = ",".join(item for item in (arg or "").split(",")
                    if item.partition("=")[0].strip() != "recipe")
    if recipe not in RECIPES:
        raise ValueError(f"config arg recipe={recipe!r}; allowed: {list(RECIPES)}")
    config = base_config()
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384)
    config.data.update(seq_len=256, batch_size=16, eval_seq_lens=(1024,))
    config.train.update(steps=200, learning_rate=3e-3, warmup_steps=30, log_every=25)
    config.eval.update(every_steps=20, batch_size=16, num_batches=8)
    config.checkpoint.update(every_steps=100)
    if recipe in ("best_fit", "decomposition"):
        config.data.packing = recipe
    if recipe == "decomposition":
        config.data.update(bucket_lengths=(32, 64, 128, 256), curriculum="grow_p2",
                           curriculum_cycles=8)
    config = apply_arg(config, rest)
    if recipe == "extension":
        steps, base = config.train.steps, config.model.mixer_options.attention.rope_base
        first = steps * 2 // 3
        config.train.stages = ((first, config.data.seq_len // 2, base),
                               (steps - first, config.data.seq_len, 500_000.0))
    return config
