"""A small attention LM that learns the RULER-style retrieval tasks at 1024 tokens, the
model of the KV-cache policy comparison (docs/results/kv_cache.md).

    python scripts/train.py --config=configs/kv_cache_ruler.py --workdir=workdirs/ruler_kv

Softmax attention with RoPE and GQA (4 query heads over 2 key/value heads, so per-head
cache policies differ from per-KV-head ones), 3 layers, width 128, trained on the
embedded corpus with half of every batch's rows RULER prompts followed by their answers
(`config.data.ruler_tasks`, `longjax.data.tasks.ruler_rows`: the loss on the answer
only, 32 x per answer token), in a length curriculum of 256, 512 and 1024 tokens (a
quarter, half and all of `seq_len`) at 4096 tokens per step. Evaluated every
`eval.every_steps` on validation bits per byte and on held-out task rows at 1024 tokens
(`ruler_len1024`: answer-token accuracy and whole-answer sequence accuracy,
teacher-forced). Variants through the arg string, e.g. `:tasks=niah_single+vt,steps=600`
(`tasks` joined by "+"), or any short name or dotted field.
"""

from longjax.train.config import apply_arg, base_config, parse_arg

TASKS = ("niah_single", "niah_multikey")
# (share of the steps, seq_len / length): the length curriculum, tokens per step constant.
CURRICULUM = ((0.35, 4), (0.3, 2), (0.35, 1))


def get_config(arg=None):
    overrides = parse_arg(arg)
    tasks = str(overrides.pop("tasks", "+".join(TASKS))).split("+")
    config = base_config()
    config.model.update(d_model=128, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=384)
    config.data.update(seq_len=1024, batch_size=4, ruler_tasks=tuple(tasks),
                       ruler_fraction=1.0, ruler_answer_weight=1.0)
    config.data.ruler_options = {"haystack": "noise"}
    config.train.update(steps=900, learning_rate=3e-3, warmup_steps=50, log_every=50,
                        progress_bar=False)
    config.eval.update(every_steps=200, batch_size=8, num_batches=1)
    config.checkpoint.update(every_steps=200, keep=2)
    config = apply_arg(config, ",".join(f"{k}={v}" for k, v in overrides.items()))
    steps, base = config.train.steps, config.model.mixer_options.attention.rope_base
    counts = [int(share * steps) for share, _ in CURRICULUM[:-1]]
    counts.append(steps - sum(counts))
    config.train.stages = tuple((n, config.data.seq_len // divisor, base) for n, (_, divisor)
                                in zip(counts, CURRICULUM, strict=True) if n > 0)
    return config
