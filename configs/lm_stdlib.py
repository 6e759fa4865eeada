"""A real run on the embedded corpus: a 12-layer, 768-wide LM at 2048 tokens of context.

    python scripts/train.py --config=configs/lm_stdlib.py --workdir=workdirs/lm_stdlib

Made for an accelerator (bf16 compute, remat; ~76M parameters, 64k tokens per step):
on one modern GPU, 20k steps take a few hours. The corpus is ~11 MB of train bytes, so
this is several epochs; watch the validation curve for overfitting. Variants as in
`configs/quickstart.py`, e.g. `:mixer=mamba`, `:preset=samba`, `:seq_len=8192`.
"""

from longjax.train.config import apply_arg, base_config


def get_config(arg=None):
    config = base_config()
    config.model.update(d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                        mlp_dim=2048, dtype="bfloat16", remat=True)
    config.data.update(seq_len=2048, batch_size=32)
    config.train.update(steps=20_000, learning_rate=1e-3, warmup_steps=1000, log_every=50)
    config.eval.update(every_steps=1000, batch_size=32, num_batches=64)
    config.checkpoint.update(every_steps=1000, keep=3)
    return apply_arg(config, arg)
