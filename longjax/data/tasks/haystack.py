"""Haystacks for the long-context tasks (`longjax.data.tasks.ruler`): text cut into units
(sentences, lines), each unit encoded once in a tokenizer's tokens, filled up to a token
budget with whole units, and items (needles) inserted at the unit boundary nearest their
depth. Everything past the encoding is numpy on whole arrays, so a 128k-token haystack
takes milliseconds.

Kinds: `"noise"`, the passkey filler sentences repeated ("The grass is green. The sky is
blue. ...", the noise haystack of Hsieh et al. 2024, RULER); `"corpus"`, the non-blank
lines of the embedded corpus's validation split (the standard-library source held out
from training, about 340 KB on Python 3.11, in file order) from a random line on, repeated
when a prompt needs more.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from longjax.data import stdlib_corpus
from longjax.data.tasks import FILLER
from longjax.data.tokenizer import ByteTokenizer

HAYSTACKS = ("noise", "corpus")
_BYTES = ByteTokenizer()  # one pool cache entry for every byte tokenizer


class Units(NamedTuple):
    """Text units one after another: `tokens` `[N]` int32, `lengths` `[U]` (tokens of each
    unit, summing to N)."""

    tokens: np.ndarray
    lengths: np.ndarray


def encode_units(tok, texts) -> Units:
    """`texts` each encoded alone by `tok` (no BOS / EOS), one after another."""
    if isinstance(tok, ByteTokenizer):  # bytes: one vectorized decode of the joined text
        encoded = [t.encode("utf-8") for t in texts]
        tokens = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int32)
        return Units(tokens, np.array([len(e) for e in encoded], np.int64))
    ids = [tok.encode(t, add_bos=False, add_eos=False) for t in texts]
    tokens = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    return Units(tokens, np.array([len(i) for i in ids], np.int64))


@functools.lru_cache(maxsize=1)
def corpus_lines() -> tuple[str, ...]:
    """The non-blank lines (each ending in a newline) of the embedded corpus's validation
    files, in sorted path order."""
    return tuple(line.rstrip("\n") + "\n"
                 for relative, path in stdlib_corpus.stdlib_files()
                 if stdlib_corpus.split_of(relative) == "validation"
                 for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip())


@functools.lru_cache(maxsize=8)
def _pool(kind: str, tok) -> Units:
    """The units of a haystack kind in `tok`'s tokens (encoded once per tokenizer)."""
    return encode_units(tok, FILLER if kind == "noise" else corpus_lines())


def haystack_units(kind: str, tok, rng, room: int) -> Units:
    """At least `room` tokens of whole units of haystack `kind`: the noise sentences from
    the first, or the corpus from a line drawn by `rng`, the pool repeated as needed."""
    if kind not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}; got {kind!r}")
    pool = _pool(kind, _BYTES if isinstance(tok, ByteTokenizer) else tok)
    first = int(rng.integers(len(pool.lengths))) if kind == "corpus" else 0
    total = int(pool.lengths.sum())
    repeats = -(-(room + total) // total)
    order = (first + np.arange(repeats * len(pool.lengths))) % len(pool.lengths)
    count = int(np.searchsorted(np.cumsum(pool.lengths[order]), room, side="right")) + 1
    return gather(pool, order[:count])


def gather(units: Units, order) -> Units:
    """The units `order` `[M]` (indices into `units`, repeats allowed) one after another."""
    order = np.asarray(order, np.int64)
    starts = (np.cumsum(units.lengths) - units.lengths)[order]
    lengths = units.lengths[order]
    shift = starts - (np.cumsum(lengths) - lengths)  # from the output offset to the source
    index = np.arange(int(lengths.sum())) + np.repeat(shift, lengths)
    return Units(units.tokens[index], lengths)


def fill(units: Units, room: int) -> tuple[np.ndarray, np.ndarray]:
    """The longest run of whole leading `units` within `room` tokens: `(tokens [H],
    boundaries)`, the token offsets where a unit starts or the run ends (0 and H
    included)."""
    ends = np.cumsum(units.lengths)
    count = int(np.searchsorted(ends, room, side="right"))
    boundaries = np.concatenate([[0], ends[:count]]).astype(np.int64)
    return units.tokens[:boundaries[-1]], boundaries


def insert(haystack: np.ndarray, boundaries: np.ndarray, items, depths) -> tuple[
        np.ndarray, np.ndarray]:
    """`haystack` with each of `items` (token arrays) inserted at the boundary nearest its
    depth x the haystack's length (the earlier of two as near); items at one boundary keep
    their order. Returns `(tokens, positions)`: where each item starts in `tokens`."""
    depths = np.asarray(depths, np.float64).reshape(-1)
    at = boundaries[np.abs(boundaries[None, :] - depths[:, None] * len(haystack)).argmin(1)]
    pieces, positions, done, size = [], np.zeros(len(items), np.int64), 0, 0
    for i in np.argsort(at, kind="stable"):
        pieces += [haystack[done:at[i]], items[i]]
        size += at[i] - done
        positions[i], done = size, at[i]
        size += len(items[i])
    pieces.append(haystack[done:])
    return np.concatenate(pieces).astype(np.int32), positions
