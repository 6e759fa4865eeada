"""Progressive length extension: a schedule of training stages.

As in Xiong et al. 2023, "Effective Long-Context Scaling of Foundation Models": train at a
short length, then continue from the same parameters and optimizer state at a longer
length with a larger RoPE base ("adjusted base frequency", ABF). `config.train.stages`
is a tuple of `(steps, seq_len, rope_base)` or `(steps, seq_len, rope_base, extension)`;
the stages run one after the other, their steps sum to `config.train.steps`, and tokens
per step stay `data.batch_size * data.seq_len` (the batch size of a stage is that over
its `seq_len`). Empty: one stage, the config itself.

`extension` fine-tunes a context extension in that stage, parts joined by `+`:
- `linear:S`, `ntk:S`, `yarn:S`, `llama3:S`: that RoPE scaling with factor S, relative to
  the first stage's `seq_len` (the pretraining length L): Position Interpolation (Chen et
  al. 2023) and YaRN (Peng et al. 2023) fine-tuned at the longer length.
- `giraffe`: Giraffe's truncated basis (Pal et al. 2023) with
  `positions.giraffe_params(L, the stage's target length)`.
- `pose:N`: PoSE (Zhu et al. 2023): rows of the stage's `seq_len` with positions spread
  over N by random skips (`longjax.data.packing.pose_positions`), so a model trains for
  a context of N at the cost of `seq_len`.
The last stage's options stay in the checkpoint's config for evaluation.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_collections

from longjax.ops.positions import ROPE_SCALINGS, canonical_rope_params, giraffe_params

FIELD = "config.train.stages"


@dataclasses.dataclass(frozen=True)
class Stage:
    start: int  # first global step of the stage
    steps: int
    seq_len: int
    rope_base: float
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    pose_length: int = 0

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
        if not isinstance(entry, tuple | list) or len(entry) not in (3, 4):
            raise ValueError(f"{FIELD}[{i}]={entry!r} must be (steps, seq_len, rope_base) "
                             "or (steps, seq_len, rope_base, extension)")
        steps, seq_len, base, *extension = entry
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"{FIELD}[{i}] has steps={steps!r}; a stage needs a positive "
                             "whole number of steps")
        if not isinstance(seq_len, int) or seq_len < 2 or tokens_per_step % seq_len:
            raise ValueError(f"{FIELD}[{i}] has seq_len={seq_len!r}; it must be >= 2 and "
                             f"divide the tokens per step, config.data.batch_size x "
                             f"config.data.seq_len = {tokens_per_step}")
        if not isinstance(base, int | float) or isinstance(base, bool) or base <= 0:
            raise ValueError(f"{FIELD}[{i}] has rope_base={base!r}; it must be positive")
        stages.append(Stage(start, steps, seq_len, float(base),
                            **_extension(f"{FIELD}[{i}]", "".join(extension), seq_len)))
        start += steps
    if start != t.steps:
        raise ValueError(f"the steps of {FIELD} sum to {start}, but config.train.steps="
                         f"{t.steps}; make them equal")
    return stages


_SCALINGS = tuple(s for s in ROPE_SCALINGS
                  if s not in ("none", "dynamic_ntk", "longrope", "truncated"))


def _extension(where, text, seq_len) -> dict:
    """The Stage fields of an extension string (see the module docstring)."""
    fields = {}
    for part in filter(None, text.split("+")):
        name, _, arg = part.partition(":")
        try:
            value = float(arg) if name in _SCALINGS else int(arg)
        except ValueError:
            value = None
        if name in _SCALINGS and value is not None and value > 0:
            fields.update(rope_scaling=name, rope_scaling_factor=value)
        elif part == "giraffe":
            fields.update(rope_scaling="truncated", rope_scaling_factor=1.0)
        elif name == "pose" and value is not None and value >= seq_len:
            fields["pose_length"] = value
        else:
            raise ValueError(
                f"{where} has extension part {part!r}; allowed, joined by '+': "
                f"{[f'{s}:S' for s in _SCALINGS]} with S > 0, 'giraffe', or 'pose:N' with "
                f"N >= the stage's seq_len {seq_len}")
    return fields


def stage_at(stages: list[Stage], step: int) -> int:
    """Index of the stage that trains global step `step` (the last one past the end)."""
    return next((i for i, s in enumerate(stages) if step < s.stop), len(stages) - 1)


def stage_config(config, stage: Stage) -> ml_collections.ConfigDict:
    """`config` as the stage trains it: its `seq_len`, RoPE base, extension (a RoPE
    scaling relative to the first stage's length, PoSE's length), and the batch size that
    keeps tokens per step constant."""
    tokens_per_step = config.data.batch_size * config.data.seq_len
    out = copy.deepcopy(config)
    out.data.seq_len = stage.seq_len
    out.data.batch_size = tokens_per_step // stage.seq_len
    attention = out.model.mixer_options.attention
    attention.rope_base = stage.rope_base
    if stage.rope_scaling != "none":
        attention.rope_scaling = stage.rope_scaling
        attention.rope_scaling_factor = stage.rope_scaling_factor
        attention.train_length = schedule(config)[0].seq_len
    if stage.rope_scaling == "truncated":
        attention.rope_scaling_params = canonical_rope_params(giraffe_params(
            attention.train_length, max(stage.seq_len, stage.pose_length)))
    if stage.pose_length:
        out.data.pose_length = stage.pose_length
    return out
