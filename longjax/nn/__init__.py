"""flax.linen modules over `longjax.ops`: mixers, MLPs, norms and the LM.

Importing this package registers every mixer (see `longjax.nn.registry`).
"""

from longjax.nn import (
    attention,  # noqa: F401  (registers "attention")
    linear,  # noqa: F401
    ssm,  # noqa: F401  (registers "s4d", "s4", "mamba", "mamba2")
)
from longjax.nn.lm import DecoderLM
from longjax.nn.registry import build_mixer, mixer_names, register_mixer

__all__ = ["DecoderLM", "build_mixer", "mixer_names", "register_mixer"]
