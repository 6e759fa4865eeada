"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax

from longjax.nn.layers import NO_WEIGHT_DECAY


def learning_rate_schedule(train_config) -> optax.Schedule:
    """Linear warmup to `learning_rate`, cosine decay to `min_lr_ratio * learning_rate`."""
    t = train_config
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
        decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio,
    )


def weight_decay_mask(params):
    """True for parameters that get weight decay: ndim >= 2 and not named in NO_WEIGHT_DECAY."""

    def decays(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        return leaf.ndim >= 2 and name not in NO_WEIGHT_DECAY

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
    t = train_config
    adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2,
                        weight_decay=t.weight_decay, mask=weight_decay_mask)
    if t.grad_clip:
        return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
    return adamw
