"""A small attention LM trained on the RULER-style retrieval tasks up to 1024 tokens, meant
as the model of the KV-cache policy comparison (docs/results/kv_cache.md).

    python scripts/train.py --config=configs/kv_cache_ruler.py --workdir=workdirs/ruler_kv

Softmax attention with RoPE and GQA (4 query heads over 2 key/value heads, so per-head
cache policies differ from per-KV-head ones), 3 layers, width 128, trained on RULER
prompts followed by their answers only (`config.data.ruler_tasks` = niah_single and
niah_multikey with RULER's noise haystack, `ruler_fraction=1`; `longjax.data.tasks.
ruler_rows`: the loss on the answer), in a length curriculum of 128, 192, 256, 384, 512,
768 and 1024 tokens at 6144 tokens per step (multikey joins at 256, where it fits).
Evaluate the policies with `--ruler_options=haystack=noise` (docs/results/kv_cache.md).

What it took on the 2-core CPU (2026-12-05; docs/results/kv_cache.md has the runs): at
256 tokens and up, from scratch, 750 steps left the digits at chance; at 128 the model
solves niah_single in ~100 steps by position (the needle sits at a nearly fixed distance
there); growing the length gradually carries the copying circuit over, but each length
needs more steps than this schedule's 700 (the table's model trained ~9000 steps, most
at 1024). Rows of one length teach the model where the row ends: continue at 1024 with
`--config.data.ruler_min_length=0.5` (rows of 512-1024 tokens; the short stages' rows
cannot be halved, so pass it where only 1024 is left). Evaluated every
`eval.every_steps` on held-out task rows at 1024 tokens (`ruler_len1024`: answer-token
accuracy, and whole-answer sequence accuracy, teacher-forced). Variants through the arg
string, e.g. `:tasks=niah_single+vt,steps=600` (`tasks` joined by "+"), or any short
name or dotted field.
"""

from longjax.train.config import apply_arg, base_config, parse_arg

TASKS = ("niah_single", "niah_multikey")
# (share of the steps, length / seq_len): the length curriculum, tokens per step constant.
CURRICULUM = ((0.2, 1 / 8), (0.1, 3 / 16), (0.15, 1 / 4), (0.1, 3 / 8), (0.15, 1 / 2),
              (0.1, 3 / 4), (0.2, 1))


def get_config(arg=None):
    overrides = parse_arg(arg)
    tasks = str(overrides.pop("tasks", "+".join(TASKS))).split("+")
    config = base_config()
    config.model.update(d_model=128, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=384)
    config.data.update(seq_len=1024, batch_size=6, ruler_tasks=tuple(tasks),
                       ruler_fraction=1.0, ruler_answer_weight=1.0)
    config.data.ruler_options = {"haystack": "noise"}
    config.train.update(steps=700, learning_rate=3e-3, warmup_steps=50, log_every=50,
                        progress_bar=False)
    config.eval.update(every_steps=200, batch_size=8, num_batches=1)
    config.checkpoint.update(every_steps=200, keep=2)
    config = apply_arg(config, ",".join(f"{k}={v}" for k, v in overrides.items()))
    steps, base = config.train.steps, config.model.mixer_options.attention.rope_base
    counts = [int(share * steps) for share, _ in CURRICULUM[:-1]]
    counts.append(steps - sum(counts))
    config.train.stages = tuple((n, round(config.data.seq_len * part), base)
                                for n, (_, part) in zip(counts, CURRICULUM, strict=True)
                                if n > 0)
    return config
