"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") with any mixer.

    python scripts/train.py --config=configs/mqar.py:mixer=gla,d_model=64 \
        --workdir=workdirs/mqar_gla_64

Two layers, 1000 steps of 32 sequences of 64 tokens holding 4 key-value pairs over 16
symbols; evaluated on held-out sequences of 64, 128 and 256 tokens (`eval_len*`: accuracy
on the answer positions; chance is 1/16). Measured on one CPU core: softmax attention at
width 64 reaches 100% / 100% / 98.7% in about 60 CPU-seconds, and at width 16 99.9% at 64
tokens where linear attention gets 34%; see `docs/results/mqar.md` for the other mixers
and widths, with the exact commands.
Variants: `mixer=<name or pattern>`, `preset=<hybrid>`, `d_model=...` (`mlp_dim` follows
as 2 x d_model unless given), `num_kv_pairs=...`, `num_symbols=...`, `jrt=True` (JRT-Prompt:
the key-value pairs written twice before the queries, in training and evaluation rows),
`steps=...`, or any dotted field.
"""

from longjax.train.config import apply_arg, base_config, parse_arg


def get_config(arg=None):
    config = base_config()
    config.model.update(d_model=64, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=128)
    config.data.update(source="task", task="mqar", seq_len=64, batch_size=32,
                       eval_seq_lens=(64, 128, 256))
    config.data.task_options = {"num_kv_pairs": 4, "num_symbols": 16}
    config.train.update(steps=1000, learning_rate=5e-3, warmup_steps=50, log_every=100,
                        weight_decay=0.1, progress_bar=False)
    config.eval.update(every_steps=500, batch_size=64, num_batches=4)
    config.checkpoint.update(every_steps=1000, keep=1)
    overrides = parse_arg(arg)
    for option in ("num_kv_pairs", "num_symbols", "jrt"):
        if option in overrides:
            config.data.task_options[option] = overrides.pop(option)
    config = apply_arg(config, ",".join(f"{k}={v}" for k, v in overrides.items()))
    if not {"mlp_dim", "model.mlp_dim"} & set(overrides):
        config.model.mlp_dim = 2 * config.model.d_model
    return config
