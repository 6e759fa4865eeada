"""RULER-style long-context tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?", Sec. 3), at any length from 256 tokens to 128k,
in bytes or in a checkpoint's tokenizer, deterministic in `(seed, index)`.

    sample = ruler_sample("niah_multikey", length=4096, seed=0, index=3, depth=0.5, tok=tok)
    sample.tokens      # [4096] int32: the prompt, ending in "Answer:"
    sample.answers     # ("4728163",): the strings a right generation holds
    sample.needle_depths, sample.needle_positions   # of every inserted needle

`RULER_TASKS` maps each task to its option defaults (RULER's where they fit 256 tokens):

- Needle in a haystack. Needles "A magic number for {key} is {value}.\\n" (keys distinct
  pseudo-words such as "bazoki", values distinct 7-digit numbers) inside a haystack
  (`haystack`: "corpus", "noise", or "needles": needles of other keys, RULER's
  multi-key 2 / 3), then the question, "What is the magic number for {key}?\\nAnswer:":
  - `niah_single`: one needle, asked.
  - `niah_multikey`: `num_keys` needles of distinct keys; one is asked, the others are
    distractors.
  - `niah_multivalue`: `num_values` needles of one key; every value is asked.
  - `niah_multiquery`: `num_keys` needles of distinct keys; `num_queries` keys asked.
- `vt`, variable tracking: `num_chains` chains "VAR QXWTB = 12345.\\n",
  "VAR MZPLA = VAR QXWTB.\\n", ... of `num_hops` hops (distinct 5-letter names and 5-digit
  values) in the haystack (default "noise"); asked which variables hold the first chain's
  value, the answer is every name of that chain (the others are distractors).
- `cwe`, common word extraction: a list of pseudo-words in which `num_common` words
  appear `common_count` times and the others `uncommon_count` times; as many uncommon
  words as the length holds (so the list grows with the length, as in RULER). Where the
  length holds fewer common repeats, they drop to the most that fit (at least 2) and the
  uncommon ones to at most one fewer. Asked the `num_common` most common words.
- `fwe`, frequent word extraction: pseudo-words with Zipf counts, the word of rank r
  appearing floor(C r^-alpha) times, C the largest that fits with the `num_words`-th
  count above the next; asked the `num_words` most frequent words.

Depth: every needle (the needle tasks' needles, the chain statements of `vt`) goes in at
the haystack's unit boundary (sentence, corpus line, needle) nearest its depth x the
haystack's tokens (the haystack without needles). `depth` places the first asked needle
(of `vt`: the first chain's value assignment, its hops at random later depths); the
others are uniform at random; `depth=None` draws it uniformly. The keys, values and
words are drawn first, so one `(seed, index)` asks the same at every depth and length.

Exact length: the prompt is BOS (when the tokenizer has one), the task's instruction, the
context (whole haystack units with the needles, or the word list), one-token spaces for
the room left (fewer tokens than one unit), the question; each piece is encoded alone
(`longjax.data.tasks.haystack`), so a prompt holds exactly `length` tokens whatever the
tokenizer. The instructions and questions are shorter than RULER's so that every task
fits 256 tokens; the answers are scored as RULER scores them (`longjax.eval.ruler`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from longjax.data.tasks.haystack import (
    HAYSTACKS,
    Units,
    encode_units,
    fill,
    gather,
    haystack_units,
    insert,
)
from longjax.data.tasks.options import with_defaults
from longjax.data.tokenizer import ByteTokenizer

NEEDLE_HAYSTACKS = (*HAYSTACKS, "needles")
_SYLLABLES = np.array([c + v for c in "bdfgklmnprstvz" for v in "aeiou"])
NUM_PSEUDO_WORDS = len(_SYLLABLES) ** 3


class TooShort(ValueError):
    """The length does not hold a task's prompt without its haystack."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt: `tokens` `[length]` int32, the `answers` a right generation holds, the
    asked needle's `depth` (None for the word tasks), each inserted needle's text, depth
    and the token index where it starts, and the `[start, stop)` token span of the
    context (the haystack or word list with its needles and the filling spaces, between
    the instruction and the question; `longjax.data.tasks.jrt` repeats it)."""

    task: str
    tokens: np.ndarray
    answers: tuple[str, ...]
    depth: float | None
    needles: tuple[str, ...] = ()
    needle_depths: tuple[float, ...] = ()
    needle_positions: tuple[int, ...] = ()
    context_span: tuple[int, int] = (0, 0)


class _Draft(NamedTuple):
    """A task's text before the length is known: `context(room)` -> (context tokens of at
    most `room`, positions of the needles in it)."""

    prefix: str
    question: str
    answers: tuple[str, ...]
    needles: tuple[str, ...]
    depths: tuple[float, ...]
    context: Callable[[int], tuple[np.ndarray, np.ndarray]]


def pseudo_words(rng, count: int) -> list[str]:
    """`count` distinct three-syllable pseudo-words ("bazoki") drawn by `rng`."""
    index = rng.choice(NUM_PSEUDO_WORDS, count, replace=False)
    n = len(_SYLLABLES)
    first, second, third = _SYLLABLES[index // n ** 2], _SYLLABLES[index // n % n], \
        _SYLLABLES[index % n]
    return np.char.add(np.char.add(first, second), third).tolist()


def _numbers(rng, count: int, digits: int) -> list[str]:
    """`count` distinct numbers of `digits` digits (no leading zero)."""
    low = 10 ** (digits - 1)
    return [str(low + i) for i in rng.choice(9 * low, count, replace=False)]


def _names(rng, count: int) -> list[str]:
    """`count` distinct five-letter upper-case names."""
    index = rng.choice(26 ** 5, count, replace=False)
    letters = (index[:, None] // 26 ** np.arange(5)) % 26 + ord("A")
    return ["".join(map(chr, row)) for row in letters]


def _encode(tok, text: str) -> np.ndarray:
    return tok.encode(text, add_bos=False, add_eos=False)


def _listing(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# --- Needles in a haystack -------------------------------------------------------------

def needle_text(key: str, value: str) -> str:
    return f"A magic number for {key} is {value}.\n"


def _needle_context(rng, tok, haystack, needles, depths, exclude, room):
    """The haystack of `room` tokens at most with `needles` inserted at `depths`; the
    "needles" haystack's keys avoid `exclude`."""
    items = [_encode(tok, n) for n in needles]
    free = room - sum(len(i) for i in items)
    if free < 0:
        raise TooShort(f"the needles take {room - free} tokens and the prompt has room for "
                       f"{room}")
    if haystack == "needles":
        shortest = len(_encode(tok, needle_text("bazoki", "1000000")))
        count = free // max(1, shortest // 2) + 1  # more than enough
        keys = [k for k in pseudo_words(rng, count + len(exclude)) if k not in exclude]
        texts = map(needle_text, keys[:count], _numbers(rng, count, 7))
        units = encode_units(tok, list(texts))
    else:
        units = haystack_units(haystack, tok, rng, free)
    return insert(*fill(units, free), items, depths)


def _niah(rng, tok, depth, *, num_keys, num_values, num_queries, haystack) -> _Draft:
    keys = pseudo_words(rng, num_keys)
    values = np.array(_numbers(rng, num_keys * num_values, 7)).reshape(num_keys, num_values)
    asked = rng.choice(num_keys, num_queries, replace=False)
    depths = rng.random((num_keys, num_values))
    depths[asked[0], 0] = depth
    needles = [needle_text(k, v) for k, row in zip(keys, values, strict=True) for v in row]
    if num_queries * num_values == 1:
        question = f"\nWhat is the magic number for {keys[asked[0]]}?\nAnswer:"
    else:
        question = (f"\nWhat are all the magic numbers for "
                    f"{_listing(keys[i] for i in asked)}?\nAnswer:")
    context = functools.partial(_needle_context, rng, tok, haystack, needles,
                                depths.reshape(-1), set(keys))
    return _Draft("", question, tuple(values[asked].reshape(-1).tolist()), tuple(needles),
                  tuple(depths.reshape(-1).tolist()), context)


# --- Variable tracking -----------------------------------------------------------------

def _vt(rng, tok, depth, *, num_chains, num_hops, haystack) -> _Draft:
    names = np.array(_names(rng, num_chains * (num_hops + 1))).reshape(num_chains, -1)
    values = _numbers(rng, num_chains, 5)
    needles = [f"VAR {chain[0]} = {value}.\n" if hop == 0 else
               f"VAR {chain[hop]} = VAR {chain[hop - 1]}.\n"
               for chain, value in zip(names, values, strict=True)
               for hop in range(num_hops + 1)]
    depths = np.sort(rng.random((num_chains, num_hops + 1)), axis=1)
    depths[0] = np.concatenate([[depth], depth + (1 - depth) * depths[0, 1:]])
    question = f"\nFind all variables that are assigned the value {values[0]}.\nAnswer:"
    context = functools.partial(_needle_context, rng, tok, haystack, needles,
                                depths.reshape(-1), set())
    return _Draft("", question, tuple(names[0].tolist()), tuple(needles),
                  tuple(depths.reshape(-1).tolist()), context)


# --- Aggregation: common and frequent words --------------------------------------------

def _word_units(rng, tok, first, budget: int, repeats: int) -> Units:
    """`first`, then distinct other pseudo-words, " word" each, until `repeats` copies of
    the others take more than `budget` tokens (or the pseudo-words run out); the words
    are drawn at once (every one is at least a token) and encoded as far as needed."""
    count = min(budget // repeats + 1 + len(first), NUM_PSEUDO_WORDS)
    others = [w for w in pseudo_words(rng, count) if w not in set(first)]
    parts, cost, done, chunk = [encode_units(tok, [" " + w for w in first])], 0, 0, 64
    while cost <= budget and done < len(others):
        part = encode_units(tok, [" " + w for w in others[done:done + chunk]])
        parts.append(part)
        cost, done = cost + repeats * int(part.lengths.sum()), done + chunk
        chunk = int(1.1 * max(0, budget - cost) / (repeats * part.lengths.mean())) + 16
    return Units(np.concatenate([p.tokens for p in parts]),
                 np.concatenate([p.lengths for p in parts]))


def _shuffled(rng, units: Units, counts) -> tuple[np.ndarray, np.ndarray]:
    """The words of `units` each `counts` times (none for the rest), in an order drawn by
    `rng`; no needle positions."""
    counts = np.asarray(counts)
    order = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    return gather(units, order).tokens, np.zeros(0, np.int64)


def _cwe_context(rng, tok, common, common_count, uncommon_count, room):
    common_tokens = int(encode_units(tok, [" " + w for w in common]).lengths.sum())
    repeats = min(common_count, room // common_tokens)
    if repeats < 2:
        raise TooShort(f"{len(common)} common words twice take {2 * common_tokens} tokens "
                       f"and the prompt has room for {room}")
    uncommon = min(uncommon_count, repeats - 1)
    left = room - repeats * common_tokens
    units = _word_units(rng, tok, common, left, uncommon)
    cost = np.cumsum(uncommon * units.lengths[len(common):])
    num_uncommon = int(np.searchsorted(cost, left, side="right"))
    return _shuffled(rng, units, [repeats] * len(common) + [uncommon] * num_uncommon)


def _cwe(rng, tok, depth, *, num_common, common_count, uncommon_count) -> _Draft:
    del depth  # a list has no needle
    common = pseudo_words(rng, num_common)
    context = functools.partial(_cwe_context, rng, tok, common, common_count, uncommon_count)
    return _Draft(f"Find the {num_common} most common words in this list:\n",
                  f"\nWhat are the {num_common} most common words in the list above?"
                  f"\nAnswer:", tuple(common), (), (), context)


def zipf_counts(scale: int, num_ranks: int, alpha: float) -> np.ndarray:
    """`[num_ranks]` counts floor(scale r^-alpha) of the ranks r = 1 .. num_ranks."""
    return np.floor(scale * np.arange(1, num_ranks + 1, dtype=np.float64) ** -alpha
                    ).astype(np.int64)


def _ranked_words(rng, tok, top, num_ranks: int) -> Units:
    """`top`, then distinct other pseudo-words, `num_ranks` words in all (fewer if the
    pseudo-words run out), " word" each: every rank a Zipf count can reach is a word."""
    count = min(num_ranks + len(top), NUM_PSEUDO_WORDS)
    others = [w for w in pseudo_words(rng, count) if w not in set(top)]
    return encode_units(tok, [" " + w for w in [*top, *others][:num_ranks]])


def _fwe_context(rng, tok, top, alpha, room):
    # floor(scale r^-alpha) >= 1 needs r <= scale^(1/alpha), and scale <= room
    units = _ranked_words(rng, tok, top, int(room ** (1 / alpha)) + 1)
    ranks, k = len(units.lengths), len(top)

    def cost(scale):
        return int(zipf_counts(scale, ranks, alpha) @ units.lengths)

    low, high = 0, room + 1  # cost(low) <= room < cost(high): every word is >= 1 token
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= room else (low, middle)
    for scale in range(low, 0, -1):
        counts = zipf_counts(scale, ranks, alpha)
        if counts[k - 1] > counts[k]:
            return _shuffled(rng, units, counts)
    raise TooShort(f"the prompt's room of {room} tokens holds no Zipf counts whose "
                   f"{k} most frequent words stand above the next")


def _fwe(rng, tok, depth, *, num_words, alpha) -> _Draft:
    del depth  # a list has no needle
    top = pseudo_words(rng, num_words)
    context = functools.partial(_fwe_context, rng, tok, top, alpha)
    return _Draft(f"Find the {num_words} most frequent words in this text:\n",
                  f"\nWhat are the {num_words} most frequent words in the text above?"
                  f"\nAnswer:", tuple(top), (), (), context)


# --- Registry and samples ----------------------------------------------------------------

class _Task(NamedTuple):
    defaults: dict
    draft: Callable[..., _Draft]


def _niah_task(**defaults) -> _Task:
    return _Task({**defaults, "haystack": "corpus"}, _niah)


# A task's position here seeds its random stream: add new tasks at the end.
_SPECS: dict[str, _Task] = {
    "niah_single": _niah_task(num_keys=1, num_values=1, num_queries=1),
    "niah_multikey": _niah_task(num_keys=4, num_values=1, num_queries=1),
    "niah_multivalue": _niah_task(num_keys=1, num_values=4, num_queries=1),
    "niah_multiquery": _niah_task(num_keys=4, num_values=1, num_queries=4),
    "vt": _Task({"num_chains": 1, "num_hops": 4, "haystack": "noise"}, _vt),
    "cwe": _Task({"num_common": 10, "common_count": 30, "uncommon_count": 3}, _cwe),
    "fwe": _Task({"num_words": 3, "alpha": 2.0}, _fwe),
}
RULER_TASKS: dict[str, dict] = {name: dict(spec.defaults) for name, spec in _SPECS.items()}
DEPTH_TASKS = tuple(name for name, spec in _SPECS.items() if spec.draft in (_niah, _vt))


def _options(task: str, options: dict) -> dict:
    """`options` over the task's defaults, checked; ValueError names the bad one."""
    options = with_defaults(task, options, RULER_TASKS, kind="RULER task", field="options")
    for name, value in options.items():
        if name == "haystack":
            allowed = NEEDLE_HAYSTACKS if _SPECS[task].draft is _niah else HAYSTACKS
            if value not in allowed:
                raise ValueError(f"{task}: haystack must be one of {allowed}; got {value!r}")
        elif name == "alpha":
            if not isinstance(value, numbers.Real) or not value >= 1:
                raise ValueError(f"{task}: alpha must be a number >= 1; got {value!r}")
        elif not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{task}: {name} must be an int >= 1; got {value!r}")
    if options.get("num_queries", 1) > options.get("num_keys", 1):
        raise ValueError(f"{task}: num_queries={options['num_queries']} must be at most "
                         f"num_keys={options['num_keys']}")
    if options.get("uncommon_count", 0) >= options.get("common_count", 2):
        raise ValueError(f"{task}: uncommon_count={options['uncommon_count']} must be below "
                         f"common_count={options['common_count']}")
    return options


def task_options(task: str, options) -> dict:
    """Those of `options` (shared by several tasks) that `task` takes."""
    return {k: v for k, v in dict(options or {}).items() if k in RULER_TASKS[task]}


def check_shared_options(tasks, options) -> None:
    """ValueError naming an option of `options` that none of `tasks` takes."""
    unused = set(options or {}) - {k for t in tasks for k in RULER_TASKS.get(t, {})}
    if unused:
        raise ValueError(f"RULER options {sorted(unused)} are taken by none of the tasks "
                         f"{list(tasks)}")


def ruler_sample(task: str, *, length: int, seed: int, index: int = 0,
                 depth: float | None = None, tok=None, **options) -> Sample:
    """Sample `index` of `task` (see the module doc) as a prompt of exactly `length`
    tokens of `tok` (default: bytes), the asked needle at `depth` in [0, 1] (None:
    uniform; ignored by the word tasks). Raises `TooShort` (a ValueError) when `length`
    does not hold the prompt without its haystack, ValueError on bad options."""
    options = _options(task, options)
    if not isinstance(length, numbers.Integral) or length < 1:
        raise ValueError(f"{task}: length must be an int >= 1; got {length!r}")
    if depth is not None and not (isinstance(depth, numbers.Real) and 0 <= depth <= 1):
        raise ValueError(f"{task}: depth must be in [0, 1] or None; got {depth!r}")
    tok = tok or ByteTokenizer()
    rng = np.random.default_rng([seed, index, list(_SPECS).index(task)])
    uniform = rng.random()  # drawn at every depth, so the rest does not depend on it
    depth = uniform if depth is None else float(depth)
    draft = _SPECS[task].draft(rng, tok, depth, **options)
    head = np.array([tok.bos_id] if tok.bos_id is not None else [], np.int32)
    prefix, question = _encode(tok, draft.prefix), _encode(tok, draft.question)
    space = _encode(tok, " ")
    if len(space) != 1:
        raise ValueError(f"{task}: the tokenizer must encode ' ' as one token; got {space}")
    room = length - len(head) - len(prefix) - len(question)
    try:
        if room < 1:
            raise TooShort(f"the instruction and question take {length - room} tokens")
        context, positions = draft.context(room)
    except TooShort as e:
        raise TooShort(f"{task}: length={length} is too short: {e}") from None
    tokens = np.concatenate([head, prefix, context, np.repeat(space, room - len(context)),
                             question]).astype(np.int32)
    start = len(head) + len(prefix)
    return Sample(task, tokens, draft.answers, depth if draft.needles else None,
                  draft.needles, draft.depths, tuple(int(p) + start for p in positions),
                  (start, start + room))
