"""RULER-style prompts as training rows: a model learns the retrieval tasks of
`longjax.data.tasks.ruler` (Hsieh et al. 2024) from their prompts followed by the answer.

    batch = ruler_batch(("niah_single", "vt"), seed=0, indices=range(8), seq_len=1024)

Row `i` is sample `indices[i]` of task `tasks[indices[i] % len(tasks)]` (the needle at a
uniform depth; `options` such as `{"haystack": "noise"}` go to every task that takes
them, the others keep their defaults), a prompt of `seq_len + 1 - A` tokens followed by its
answer, the A tokens of " " + the answers joined by ", " (as the harness writes them) and
EOS. As in `longjax.data.tasks.task_batch`: `tokens` are the row's first `seq_len`
tokens, `targets` its last `seq_len` (the next token), `positions` 0, 1, ... and
`segment_ids` 1; `weights` are `answer_weight` on the targets that are answer tokens or
the EOS, 0 elsewhere, so the loss counts the answer only (not the haystack, which for
the "corpus" haystack is held-out text).

With `min_length` each row's prompt and answer take a length drawn uniformly from
`[min_length, seq_len]` per sample (seeded by `seed` and the index), followed by padding
(`segment_ids` 0, weight 0), so the answer does not always sit at the same absolute
position: a model trained on one length alone learns to find the answer by where the row
ends (docs/results/kv_cache.md, run 11: right at its training prompt length, wrong 7
tokens longer).
"""

from __future__ import annotations

import math

import numpy as np

from longjax.data.tasks.ruler import (
    RULER_TASKS,
    TooShort,
    check_shared_options,
    ruler_sample,
    task_options,
)
from longjax.data.tokenizer import ByteTokenizer

_LENGTH_STREAM = 2**31 - 1  # the row lengths' random stream: no task's index


def answer_ids(tok, answers) -> np.ndarray:
    """The tokens written after a prompt: " " + `answers` joined by ", ", then EOS."""
    text = tok.encode(" " + ", ".join(answers), add_bos=False, add_eos=False)
    eos = [] if tok.eos_id is None else [tok.eos_id]
    return np.concatenate([text, eos]).astype(np.int32)


def ruler_row(task: str, *, seed: int, index: int, length: int, tok, options=None) -> tuple[
        np.ndarray, int]:
    """Sample `index` of `task` as `length` tokens, prompt then answer; and the answer's
    start. The answers do not depend on the length (`ruler_sample` draws them first), so
    the prompt is drawn once to learn them and once at the length that leaves them room."""
    options = task_options(task, options)
    answers = ruler_sample(task, length=length, seed=seed, index=index, tok=tok,
                           **options).answers
    answer = answer_ids(tok, answers)
    prompt = ruler_sample(task, length=length - len(answer), seed=seed, index=index,
                          tok=tok, **options).tokens
    return np.concatenate([prompt, answer]), len(prompt)


def fitting_tasks(tasks, seq_len: int, tok=None, options=None) -> tuple[str, ...]:
    """Those of `tasks` whose prompt and answer fit rows of `seq_len` (their first sample
    does: the prompts without haystack differ by a few tokens between samples)."""
    def fits(task):
        try:
            ruler_batch((task,), seed=0, indices=[0], seq_len=seq_len, tok=tok,
                        options=options)
        except TooShort:
            return False
        return True

    return tuple(t for t in tasks if fits(t))


def shortest_row(fraction: float, seq_len: int) -> int | None:
    """`min_length` for rows of `seq_len` whose shortest is `fraction` of it (None at 1:
    every row `seq_len` long)."""
    return None if fraction == 1 else max(1, math.ceil(fraction * seq_len))


def _row_lengths(seed: int, indices: np.ndarray, seq_len: int,
                 min_length: int | None) -> np.ndarray:
    """The length of each sample's row, `[len(indices)]`: `seq_len`, or with `min_length`
    uniform in `[min_length, seq_len]` from a stream of its own per `(seed, index)`."""
    if min_length is None:
        return np.full(len(indices), seq_len)
    if not 1 <= min_length <= seq_len:
        raise ValueError(f"min_length must be in [1, seq_len={seq_len}]; got {min_length}")
    return np.array([np.random.default_rng([seed, int(i), _LENGTH_STREAM]).integers(
        min_length, seq_len + 1) for i in indices])


def ruler_batch(tasks, *, seed: int, indices, seq_len: int, tok=None,
                answer_weight: float = 1.0, options=None,
                min_length: int | None = None) -> dict[str, np.ndarray]:
    """Rows of `seq_len` tokens, one per sample index (see the module doc), each `[len(
    indices), seq_len]`. Raises ValueError for an unknown task and `TooShort` when
    a row's length does not hold a task's prompt and answer."""
    check_shared_options(tasks, options)
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if not tasks or unknown:
        raise ValueError(f"RULER training tasks must be a non-empty subset of "
                         f"{sorted(RULER_TASKS)}; got {list(tasks)}")
    tok = tok or ByteTokenizer()
    indices = np.asarray(indices, np.int64).reshape(-1)
    lengths = _row_lengths(seed, indices, seq_len, min_length)
    full = np.full((len(indices), seq_len + 1), tok.pad_id, np.int32)
    weights = np.zeros((len(indices), seq_len), np.float32)
    segment_ids = np.zeros((len(indices), seq_len), np.int32)
    positions = np.zeros((len(indices), seq_len), np.int32)
    for b, (index, n) in enumerate(zip(indices, lengths, strict=True)):
        task = tasks[int(index) % len(tasks)]
        try:
            row, start = ruler_row(task, seed=seed, index=int(index), length=n + 1,
                                   tok=tok, options=options)
        except TooShort as e:
            raise TooShort(f"{e} (with its answer, in training rows of {n} tokens)") from None
        full[b, :n + 1] = row
        weights[b, start - 1:n] = answer_weight  # targets start - 1 .. n - 1: the answer
        segment_ids[b, :n] = 1
        positions[b, :n] = np.arange(n)
    return {"tokens": full[:, :-1], "targets": full[:, 1:], "weights": weights,
            "segment_ids": segment_ids, "positions": positions}
