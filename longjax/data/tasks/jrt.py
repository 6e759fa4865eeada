"""JRT-Prompt (Arora et al. 2024, "Just read twice: closing the recall gap for recurrent
language models", Sec. 3): the context is written twice before the question, so a
recurrent model reads it a second time knowing what it holds and can choose what to keep
in its fixed-size state. The answer is unchanged; the prompt grows by the context.

    tokens = repeat_context(tokens, start, stop)     # [T] -> [T + stop - start]
    sample = jrt_sample(ruler_sample(...))           # a RULER-style prompt, read twice

MQAR applies it through its task option `jrt=True` (`longjax.data.tasks`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # ruler imports the package that imports this module
    from longjax.data.tasks.ruler import Sample


def repeat_context(row: np.ndarray, start: int, stop: int) -> np.ndarray:
    """`row` `[T, ...]` with `row[start:stop]` (the context) written twice in a row:
    `row[:stop], row[start:stop], row[stop:]`, `[T + stop - start, ...]`."""
    if not 0 <= start < stop <= len(row):
        raise ValueError(f"JRT: the context span [{start}, {stop}) must be non-empty and "
                         f"inside the row of {len(row)} tokens")
    return np.concatenate([row[:stop], row[start:stop], row[stop:]])


def jrt_sample(sample: Sample) -> Sample:
    """`sample` with its context (the haystack or word list with the needles, and the
    spaces that fill the length; not the instruction, not the question) read twice. The
    needle positions stay those of the first reading."""
    start, stop = sample.context_span
    return dataclasses.replace(sample, tokens=repeat_context(sample.tokens, start, stop))
