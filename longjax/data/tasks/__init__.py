"""Synthetic tasks generated on the fly, deterministic in `(seed, step)`.

(The RULER-style long-context tasks, prompts to generate from rather than training
batches, are `longjax.data.tasks.ruler`.)

`task_batch(name, *, seed, step, batch_size, seq_len, **options)` returns numpy arrays
`[batch_size, seq_len]`: `tokens`, `targets` (the next token; PAD where the next token is
padding or past the row), `weights` (1.0 where the loss and the accuracy count),
`segment_ids` (1 = real token, 0 = padding) and `positions` (0, 1, ... in every row).
Token ids are bytes, in [0, 256); padding tokens are 0. `TASKS` maps each name to its
option defaults; `task_seq_len(name, max_length, **options)` is the smallest `seq_len`
that fits the task's largest instance.

- `mqar`, multi-query associative recall (Arora et al. 2023, "Zoology", Sec. 3): the
  sequence opens with `num_kv_pairs` key-value pairs `k_1 v_1 ... k_N v_N` (distinct keys
  from the `num_symbols` ids [1, 1 + S), values from [128, 128 + S)); every key then
  appears once more, at a random two-token slot of the rest of the sequence followed by
  its value, and the model must predict that value from the key. Other tokens are 0.
  (Zoology draws the query gaps from a power law; here the slots are uniform.) With
  `jrt=True` (JRT-Prompt, Arora et al. 2024, `longjax.data.tasks.jrt`) the `2 *
  num_kv_pairs` context tokens are written twice before the queries: the row is the
  row of `seq_len - 2 * num_kv_pairs` tokens the same draws give without it, its
  context repeated.

Length-generalization tasks (Kazemnejad et al. 2023, "The Impact of Positional Encoding
on Length Generalization in Transformers", Sec. 3 and App. C): one instance per row,
left-aligned, written in ASCII as `<question>=<answer>` and followed by padding. Each
row draws its size n uniformly from options `min_length`..`max_length`; digits are
uniform, leading zeros included. The weights are 1.0 exactly on the tokens whose next
token is an answer token (from the `=` to the answer's second-to-last token), so loss and
accuracy count the answer only. Examples with n = 4:

- `copy`: n digits, then the same digits: `3071=3071`.
- `reverse`: n digits, then them reversed: `3071=1703`.
- `addition`: two n-digit numbers, most significant digit first; the sum is written
  reversed (least significant digit first, as is common for length generalization: each
  answer digit then depends on digits already written) and zero-padded to n + 1 digits:
  `3071+0958=92040` (3071 + 958 = 4029).
- `parity`: n bits, then 1 if the count of ones is odd, else 0: `1101=1`.
- `sorting`: n digits, then them sorted ascending: `3071=0137`.
- `summation`: n digits, then their sum mod 10 ("summation mod 10"): `3071=1`.

- `passkey`, passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", Sec. 4.2):
  filler sentences ("The grass is green. The sky is blue. ...") fill the row; the needle
  "The pass key is 71432. Remember it. 71432 is the pass key. " goes in at the filler's
  sentence boundary nearest `depth` x the filler's length (`depth` in [0, 1]; -1 draws
  it uniformly per row), and the row ends with "What is the pass key? The pass key is
  71432", so the key's `num_digits` digits are its last tokens and the weights sit on the
  tokens that predict them. Whole filler sentences are used; the bytes left over (fewer
  than one sentence) are spaces before the question. Every token is real (segment 1).
  The keys do not depend on `depth`: one seed asks the same keys at every depth.
"""

from __future__ import annotations

import functools
import itertools
import numbers
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from longjax.data.tasks import jrt as jrt_lib
from longjax.data.tasks.options import with_defaults
from longjax.data.tokenizer import PAD

_MAX_SYMBOLS = 127


class _Task(NamedTuple):
    """A task: option defaults; `seq_len(**options) -> (smallest seq_len, what needs it)`,
    which raises ValueError on bad options; `generate(rng, batch_size, seq_len, **options)
    -> (tokens, weights, segment_ids)`, each `[batch_size, seq_len]`."""

    defaults: dict
    seq_len: Callable[..., tuple[int, str]]
    generate: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _ascii(text: str) -> np.ndarray:
    """`[len(text)]` int32 byte ids of ASCII `text`."""
    return np.frombuffer(text.encode("ascii"), np.uint8).astype(np.int32)


# --- MQAR (Arora et al. 2023) ---------------------------------------------------------

def _mqar_seq_len(num_kv_pairs, num_symbols, jrt):
    if not _is_int(num_symbols) or not 1 <= num_symbols <= _MAX_SYMBOLS:
        raise ValueError(f"mqar: task_options.num_symbols must be an int in "
                         f"[1, {_MAX_SYMBOLS}]; got {num_symbols!r}")
    if not _is_int(num_kv_pairs) or not 1 <= num_kv_pairs <= num_symbols:
        raise ValueError(f"mqar: task_options.num_kv_pairs must be an int in "
                         f"[1, num_symbols={num_symbols}]; got {num_kv_pairs!r}")
    if not isinstance(jrt, bool):
        raise ValueError(f"mqar: task_options.jrt must be True or False; got {jrt!r}")
    if jrt:
        return 6 * num_kv_pairs, f"num_kv_pairs={num_kv_pairs} read twice (jrt)"
    return 4 * num_kv_pairs, f"num_kv_pairs={num_kv_pairs}"


def _mqar_row(rng, seq_len, num_kv_pairs, num_symbols):
    n = num_kv_pairs
    keys = 1 + rng.choice(num_symbols, n, replace=False)
    values = 128 + rng.choice(num_symbols, n)
    tokens = np.zeros(seq_len, np.int32)
    tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
    slots = 2 * n + 2 * np.sort(rng.choice((seq_len - 2 * n) // 2, n, replace=False))
    order = rng.permutation(n)
    tokens[slots], tokens[slots + 1] = keys[order], values[order]
    weights = np.zeros(seq_len, np.float32)
    weights[slots] = 1.0  # at the key, the target (next token) is its value
    return tokens, weights


def _mqar(rng, batch_size, seq_len, num_kv_pairs, num_symbols, jrt):
    context = 2 * num_kv_pairs if jrt else 0
    rows = [[jrt_lib.repeat_context(a, 0, context) if jrt else a
             for a in _mqar_row(rng, seq_len - context, num_kv_pairs, num_symbols)]
            for _ in range(batch_size)]
    tokens = np.stack([r[0] for r in rows])
    return tokens, np.stack([r[1] for r in rows]), np.ones_like(tokens)


# --- Length generalization (Kazemnejad et al. 2023) -----------------------------------
# Each instance function maps (rng, n) to the (question, answer) strings of size n.

def _digits(rng, n: int, base: int = 10) -> str:
    """n uniform digits in [0, base) as a string."""
    return "".join(map(str, rng.integers(0, base, n)))


def _copy(rng, n):
    x = _digits(rng, n)
    return x, x


def _reverse(rng, n):
    x = _digits(rng, n)
    return x, x[::-1]


def _addition(rng, n):
    a, b = _digits(rng, n), _digits(rng, n)
    return f"{a}+{b}", str(int(a) + int(b)).zfill(n + 1)[::-1]


def _parity(rng, n):
    x = _digits(rng, n, base=2)
    return x, str(x.count("1") % 2)


def _sorting(rng, n):
    x = _digits(rng, n)
    return x, "".join(sorted(x))


def _summation(rng, n):
    x = _digits(rng, n)
    return x, str(sum(map(int, x)) % 10)


def _length_seq_len(instance, name, min_length, max_length):
    """(tokens of `instance`'s size-`max_length` row, the option that sets it)."""
    if not _is_int(min_length) or min_length < 1:
        raise ValueError(f"{name}: task_options.min_length must be an int >= 1; "
                         f"got {min_length!r}")
    if not _is_int(max_length) or max_length < min_length:
        raise ValueError(f"{name}: task_options.max_length must be an int >= min_length="
                         f"{min_length}; got {max_length!r}")
    question, answer = instance(np.random.default_rng(0), max_length)
    return len(question) + 1 + len(answer), f"task_options.max_length={max_length}"


def _length_task(instance, rng, batch_size, seq_len, min_length, max_length):
    """Rows `<question>=<answer>` then padding; weights on the tokens before each answer
    token."""
    tokens = np.zeros((batch_size, seq_len), np.int32)
    weights = np.zeros((batch_size, seq_len), np.float32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        question, answer = instance(rng, int(rng.integers(min_length, max_length + 1)))
        text = _ascii(f"{question}={answer}")
        tokens[row, :len(text)] = text
        segment_ids[row, :len(text)] = 1
        weights[row, len(question):len(question) + len(answer)] = 1.0
    return tokens, weights, segment_ids


def _length_spec(instance) -> _Task:
    name = instance.__name__[1:]
    return _Task({"min_length": 1, "max_length": 20},
                 functools.partial(_length_seq_len, instance, name),
                 functools.partial(_length_task, instance))


# --- Passkey retrieval (Mohtashami & Jaggi 2023) --------------------------------------

FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
           "There and back again. ")


def _needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def _question(key: str) -> str:
    return f"What is the pass key? The pass key is {key}"


def _passkey_seq_len(depth, num_digits):
    if not (isinstance(depth, numbers.Real) and not isinstance(depth, bool)
            and (0 <= depth <= 1 or depth == -1)):
        raise ValueError(f"passkey: task_options.depth must be a number in [0, 1], or -1 "
                         f"for a uniform depth per row; got {depth!r}")
    if not _is_int(num_digits) or num_digits < 1:
        raise ValueError(f"passkey: task_options.num_digits must be an int >= 1; "
                         f"got {num_digits!r}")
    key = "0" * num_digits
    return (len(_needle(key)) + len(_question(key)),
            f"the needle and question (num_digits={num_digits})")


def _passkey(rng, batch_size, seq_len, depth, num_digits, encode=_ascii):
    """Passkey rows built from pieces each encoded by `encode` (text -> ids; bytes by
    default): whole filler sentences, the needle at the sentence boundary nearest `depth`
    x the filler's length, one-token spaces for the room left, the question, the key."""
    sentences = [encode(text) for text in FILLER]
    space = encode(" ")
    if len(space) != 1:
        raise ValueError(f"passkey: the tokenizer must encode ' ' as one token; got {space}")
    tokens = np.zeros((batch_size, seq_len), np.int32)
    weights = np.zeros((batch_size, seq_len), np.float32)
    for row in range(batch_size):
        key = _digits(rng, num_digits)
        uniform = rng.random()  # drawn at every depth, so the keys do not depend on it
        row_depth = uniform if depth == -1 else depth
        needle, question, key_ids = encode(_needle(key)), encode(_question("")), encode(key)
        room = seq_len - len(needle) - len(question) - len(key_ids)
        if room < 0:
            raise ValueError(f"passkey: seq_len={seq_len} is too short for the needle and "
                             f"question ({seq_len - room} tokens)")
        filler, ends = [], [0]
        for sentence in itertools.cycle(sentences):
            if ends[-1] + len(sentence) > room:
                break
            filler.append(sentence)
            ends.append(ends[-1] + len(sentence))
        ends = np.array(ends)
        cut = int(np.abs(ends - row_depth * ends[-1]).argmin())
        tokens[row] = np.concatenate(
            [*filler[:cut], needle, *filler[cut:], np.repeat(space, room - ends[-1]),
             question, key_ids])
        weights[row, seq_len - 1 - len(key_ids):seq_len - 1] = 1.0
    return tokens, weights, np.ones_like(tokens)


# A task's position here seeds its random stream: add new tasks at the end.
_SPECS: dict[str, _Task] = {
    "mqar": _Task({"num_kv_pairs": 8, "num_symbols": _MAX_SYMBOLS, "jrt": False},
                  _mqar_seq_len, _mqar),
    **{f.__name__[1:]: _length_spec(f)
       for f in (_copy, _reverse, _addition, _parity, _sorting, _summation)},
    "passkey": _Task({"depth": -1.0, "num_digits": 5}, _passkey_seq_len, _passkey),
}
TASKS: dict[str, dict] = {name: dict(spec.defaults) for name, spec in _SPECS.items()}


def _options(name: str, options: dict) -> dict:
    """`options` over the task's defaults; ValueError for an unknown task or option."""
    return with_defaults(name, options, TASKS)


def task_seq_len(name: str, max_length: int | None = None, **options) -> int:
    """The smallest `seq_len` that fits task `name`'s largest instance: one of size
    `max_length` (the length tasks' option; None: its default), the needle and question
    of `passkey`, the `4 * num_kv_pairs` tokens of `mqar`. Raises ValueError on bad
    options."""
    if max_length is not None:
        options = {**options, "max_length": max_length}
    return _SPECS[name].seq_len(**_options(name, options))[0]


def task_batch(name, *, seed, step, batch_size, seq_len, encode=None,
               **options) -> dict[str, np.ndarray]:
    """One batch of task `name` (see the module doc); the same `(seed, step)` gives the
    same batch. `encode` (text -> ids, e.g. a checkpoint tokenizer's) builds `passkey`
    rows from that tokenizer's tokens instead of bytes."""
    options = _options(name, options)
    if encode is not None and name != "passkey":
        raise ValueError(f"{name}: only the passkey task takes a tokenizer (encode=); the "
                         f"others are symbol sequences")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size must be >= 1 and seq_len >= 2; got {batch_size}, "
                         f"{seq_len}")
    needed, what = _SPECS[name].seq_len(**options)
    if seq_len < needed:
        raise ValueError(f"{name}: seq_len={seq_len} is too short for {what}; it needs "
                         f"seq_len >= {needed} (see task_seq_len)")
    rng = np.random.default_rng([seed, step, list(_SPECS).index(name)])
    tokenized = {} if encode is None else {"encode": encode}
    tokens, weights, segment_ids = _SPECS[name].generate(rng, batch_size, seq_len, **options,
                                                         **tokenized)
    targets = np.full_like(tokens, PAD)
    targets[:, :-1] = np.where(segment_ids[:, 1:] > 0, tokens[:, 1:], PAD)
    return {
        "tokens": tokens, "targets": targets, "weights": weights, "segment_ids": segment_ids,
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                     (batch_size, seq_len)).copy(),
    }
