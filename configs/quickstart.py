"""Quickstart: a small Transformer LM on the embedded corpus (the README's main job).

    python scripts/train.py --config=configs/quickstart.py --workdir=workdirs/quickstart

About 3 minutes on 2 CPU cores; ends with validation bits per byte near 2.9 (uniform
bytes are 8.0). Variants: `--config=configs/quickstart.py:mixer=attention,steps=100`
(any field of `config.model`, `config.data` or `config.train` by its last name, or by
its dotted path: `model.d_model=256`).
"""

from longjax.train.config import apply_overrides, base_config, parse_arg

# Short names for the arg string: the last part of a field's dotted path.
SHORT_NAMES = {"mixer": "model.mixer", "steps": "train.steps", "seq_len": "data.seq_len",
               "batch_size": "data.batch_size", "d_model": "model.d_model",
               "num_layers": "model.num_layers", "dtype": "model.dtype"}


def get_config(arg=None):
    config = base_config()
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384)
    config.data.update(seq_len=256, batch_size=16)
    config.train.update(steps=400, learning_rate=3e-3, warmup_steps=40, log_every=20)
    config.eval.update(every_steps=400, batch_size=32)
    config.checkpoint.update(every_steps=100)
    overrides = {SHORT_NAMES.get(k, k): v for k, v in parse_arg(arg).items()}
    return apply_overrides(config, overrides)
