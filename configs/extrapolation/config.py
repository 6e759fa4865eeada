"""Length extrapolation, train short / test long: one config family for every position
scheme, on the embedded corpus (Press et al. 2022) or a synthetic task (Kazemnejad et al.
2023).

Corpus: the quickstart model trained at 256 tokens, then evaluated at 256 .. 4096 (16x):

    python scripts/train.py --config=configs/extrapolation/config.py:scheme=alibi \
        --workdir=workdirs/extrapolation/alibi
    python scripts/evaluate_lengths.py --workdir=workdirs/extrapolation/alibi

Synthetic task: instances of size 1 .. 20 in training, tested at sizes up to 40:

    python scripts/train.py --config=configs/extrapolation/config.py:scheme=nope,task=copy \
        --workdir=workdirs/extrapolation/copy_nope
    python scripts/evaluate_lengths.py --workdir=workdirs/extrapolation/copy_nope \
        --task_sizes=10,20,25,30,40

Variants: `scheme=` one of `SCHEMES` (default `rope`), `task=` one of copy, reverse,
addition, parity, sorting, summation (default: the corpus), `max_size=` (the largest
training instance, default 20), plus the short names and dotted fields of every config
(`steps=`, `d_model=`, `seed=`, ...). Training rows start at position 0
(`config.data.positions="row"`, the train-short setting; "document" would continue a cut
document's positions, which trains absolute schemes on the positions the long evaluation
tests). Training-free methods (YaRN, LM-Infinite, Self-Extend, ...)
are evaluation-time options of `scripts/evaluate_lengths.py --methods=...`.
docs/results/length_extrapolation.md gives the sweep and its results.
"""

from longjax.data.tasks import task_seq_len
from longjax.train.config import apply_arg, apply_overrides, base_config, parse_arg

_ATTENTION = "model.mixer_options.attention"
SCHEMES = {
    "rope": {},
    "xpos": {f"{_ATTENTION}.position": "xpos"},
    "alibi": {f"{_ATTENTION}.position": "alibi"},
    "t5": {f"{_ATTENTION}.position": "t5"},
    "kerple": {f"{_ATTENTION}.position": "kerple"},
    "fire": {f"{_ATTENTION}.position": "fire"},
    "nope": {f"{_ATTENTION}.position": "none"},
    "sinusoidal": {f"{_ATTENTION}.position": "none", "model.position_embedding": "sinusoidal"},
    "learned": {f"{_ATTENTION}.position": "none", "model.position_embedding": "learned"},
}
TASKS = ("copy", "reverse", "addition", "parity", "sorting", "summation")


def get_config(arg=None):
    overrides = parse_arg(arg)
    scheme, task = overrides.pop("scheme", "rope"), overrides.pop("task", "")
    max_size = int(overrides.pop("max_size", 20))
    if scheme not in SCHEMES:
        raise ValueError(f"extrapolation config: scheme={scheme!r}; allowed: {sorted(SCHEMES)}")
    if task and task not in TASKS:
        raise ValueError(f"extrapolation config: task={task!r}; allowed: {list(TASKS)}")
    config = base_config()
    if task:
        config.model.update(d_model=128, num_layers=3, num_heads=4, num_kv_heads=4, mlp_dim=384)
        config.data.update(source="task", task=task, batch_size=32,
                           seq_len=task_seq_len(task, max_size))
        config.data.task_options = {"min_length": 1, "max_length": max_size}
        config.train.update(steps=600, learning_rate=1e-3, warmup_steps=50, log_every=100,
                            progress_bar=False)
        config.eval.update(every_steps=600, batch_size=64, num_batches=4)
        config.checkpoint.update(every_steps=600, keep=1)
    else:  # the quickstart model and schedule
        config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384)
        config.data.update(seq_len=256, batch_size=16)
        config.train.update(steps=250, learning_rate=3e-3, warmup_steps=25, log_every=25,
                            progress_bar=False)
        config.eval.update(every_steps=250, batch_size=32)
        config.checkpoint.update(every_steps=250, keep=1)
    apply_overrides(config, SCHEMES[scheme])
    config = apply_arg(config, ",".join(f"{k}={v}" for k, v in overrides.items()))
    config.model.mixer_options.attention.train_length = config.data.seq_len
    # learned positions: a table of at least seq_len rows (more with model.max_position=)
    config.model.max_position = max(config.model.max_position, config.data.seq_len)
    return config
