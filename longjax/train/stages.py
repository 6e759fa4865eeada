"""Progressive length extension: a schedule of training stages.

As in Xiong et al. 2023, "Effective Long-Context Scaling of Foundation Models": train at a
short length, then continue from the same parameters and optimizer state at a longer
length with a larger RoPE base ("adjusted base frequency"). `config.train.stages` is a
tuple of `(steps, seq_len, rope_base)`; the stages run one after the other, their steps
sum to `config.train.steps`, and tokens per step stay `data.batch_size * data.seq_len`
(the batch size of a stage is that over its `seq_len`). Empty: one stage, the config
itself.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_collections

FIELD = "config.train.stages"


@dataclasses.dataclass(frozen=True)
class Stage:
    start: int  # first global step of the stage
    steps: int
    seq_len: int
    rope_base: float

    @property
    def stop(self) -> int:
        return self.start + self.steps


def schedule(config) -> list[Stage]:
    """The stages of `config`; ValueError naming `config.train.stages` if one is bad."""
    d, t = config.data, config.train
    rope_base = config.model.mixer_options.attention.rope_base
    entries = tuple(t.stages) or ((t.steps, d.seq_len, rope_base),)
    tokens_per_step = d.batch_size * d.seq_len
    stages, start = [], 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, tuple | list) or len(entry) != 3:
            raise ValueError(f"{FIELD}[{i}]={entry!r} must be (steps, seq_len, rope_base)")
        steps, seq_len, base = entry
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"{FIELD}[{i}] has steps={steps!r}; a stage needs a positive "
                             "whole number of steps")
        if not isinstance(seq_len, int) or seq_len < 2 or tokens_per_step % seq_len:
            raise ValueError(f"{FIELD}[{i}] has seq_len={seq_len!r}; it must be >= 2 and "
                             f"divide the tokens per step, config.data.batch_size x "
                             f"config.data.seq_len = {tokens_per_step}")
        if not isinstance(base, int | float) or isinstance(base, bool) or base <= 0:
            raise ValueError(f"{FIELD}[{i}] has rope_base={base!r}; it must be positive")
        stages.append(Stage(start, steps, seq_len, float(base)))
        start += steps
    if start != t.steps:
        raise ValueError(f"the steps of {FIELD} sum to {start}, but config.train.steps="
                         f"{t.steps}; make them equal")
    return stages


def stage_at(stages: list[Stage], step: int) -> int:
    """Index of the stage that trains global step `step` (the last one past the end)."""
    return next((i for i, s in enumerate(stages) if step < s.stop), len(stages) - 1)


def stage_config(config, stage: Stage) -> ml_collections.ConfigDict:
    """`config` as the stage trains it: its `seq_len`, RoPE base, and the batch size that
    keeps tokens per step constant."""
    tokens_per_step = config.data.batch_size * config.data.seq_len
    out = copy.deepcopy(config)
    out.data.seq_len = stage.seq_len
    out.data.batch_size = tokens_per_step // stage.seq_len
    out.model.mixer_options.attention.rope_base = stage.rope_base
    return out
