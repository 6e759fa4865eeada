"""Quickstart: a small Transformer LM on the embedded corpus (the README's main job).

    python scripts/train.py --config=configs/quickstart.py --workdir=workdirs/quickstart

About 3 minutes on 2 CPU cores; ends with validation bits per byte near 2.5 (uniform
bytes are 8.0). Variants through the arg string, for example
`--config=configs/quickstart.py:mixer=mamba,steps=100` or `:preset=griffin,num_layers=3`
(short names in `longjax.train.config.SHORT_NAMES`, or any dotted field path).
"""

from longjax.train.config import apply_arg, base_config


def get_config(arg=None):
    config = base_config()
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384)
    config.data.update(seq_len=256, batch_size=16)
    config.train.update(steps=250, learning_rate=3e-3, warmup_steps=25, log_every=25)
    config.eval.update(every_steps=250, batch_size=32)
    config.checkpoint.update(every_steps=50)
    return apply_arg(config, arg)
