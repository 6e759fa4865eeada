"""Dataset decomposition with a variable sequence length curriculum.

Pouransari et al. 2024, "Dataset Decomposition: Faster LLM Training with Variable
Sequence Length Curriculum". Each document is cut into pieces whose lengths are powers
of two (its binary decomposition, longest piece first, capped at the longest bucket);
bucket `l` holds the pieces of length `l`, so every sequence comes from one document and
nothing attends across documents. A piece of length `l` is `l` next-token predictions: the
`l + 1` tokens `doc[s : s + l + 1]`, and the next piece starts at `s + l`, so every token of
a document after its first is a target exactly once (the rest below the shortest bucket is
dropped, as in the paper). A step draws one batch of `tokens_per_step // l` pieces from a
single bucket, so every step has the same number of tokens.

The curriculum (paper Sec. 3.2): within a cycle, each bucket has a number of batches to
give (its share of the tokens) and the next batch comes from bucket `l` with probability
proportional to `odds[l] * batches_left[l]`. Uniform odds sample lengths as they occur in
the data; "Grow" odds favour short buckets, so each cycle runs from short to long.
"""

from __future__ import annotations

import functools

import numpy as np

# Named curricula: odds of the buckets sorted short to long, for k buckets.
CURRICULA = {
    "uniform": lambda k: [1.0] * k,
    "grow_linear": lambda k: [float(k - i) for i in range(k)],
    "grow_p2": lambda k: [2.0 ** (k - 1 - i) for i in range(k)],
    "grow_p100": lambda k: [100.0 ** (k - 1 - i) for i in range(k)],
}


def check_bucket_lengths(bucket_lengths, field: str = "config.data.bucket_lengths") -> tuple:
    """Sorted bucket lengths; ValueError naming `field` unless distinct powers of two >= 1."""
    lengths = tuple(bucket_lengths)
    bad = [n for n in lengths
           if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n & (n - 1)]
    if not lengths or bad or len(set(lengths)) != len(lengths):
        raise ValueError(f"{field}={lengths!r} must be distinct powers of two "
                         f"(e.g. (64, 128, 256)); bad entries: {bad or 'repeated lengths'}")
    return tuple(sorted(lengths))


def curriculum_odds(curriculum: str, bucket_lengths, field: str = "config.data.curriculum"
                    ) -> dict[int, float]:
    """`{bucket length: odds}` for a named curriculum (`CURRICULA`) or explicit odds
    `"64:4,128:2,256:1"` (unnamed buckets get odds 0, that is are not used)."""
    lengths = check_bucket_lengths(bucket_lengths)
    if curriculum in CURRICULA:
        return dict(zip(lengths, CURRICULA[curriculum](len(lengths)), strict=True))
    odds = {}
    for item in curriculum.split(","):
        length, sep, value = (s.strip() for s in item.partition(":"))
        try:
            length, value = int(length), float(value)
        except ValueError:
            sep = ""
        if not sep or value < 0:
            raise ValueError(f"{field}={curriculum!r}; allowed: {sorted(CURRICULA)} or "
                             "odds >= 0 per bucket length like '64:4,128:2,256:1'")
        if length not in lengths:
            raise ValueError(f"{field}={curriculum!r} names bucket {length}, which does not "
                             f"exist; the buckets (config.data.bucket_lengths): {list(lengths)}")
        odds[length] = value
    if not any(odds.values()):
        raise ValueError(f"{field}={curriculum!r} gives no bucket positive odds")
    return {n: odds.get(n, 0.0) for n in lengths}


def decompose(lengths: np.ndarray, bucket_lengths) -> dict[int, np.ndarray]:
    """Pieces of each bucket as `[num_pieces, 2]` int64 `(document, start token)`.

    A document of `n` tokens has `n - 1` targets, cut longest bucket first: as many pieces
    of the longest bucket as fit, then at most one of each shorter length (its binary
    decomposition when the buckets are consecutive powers of two).
    """
    buckets = check_bucket_lengths(bucket_lengths, "bucket_lengths")
    longest = buckets[-1]
    pieces: dict[int, list] = {n: [] for n in buckets}
    for doc, n in enumerate(int(x) for x in lengths):
        targets = max(n - 1, 0)
        full = targets // longest
        pieces[longest].extend((doc, i * longest) for i in range(full))
        start, left = full * longest, targets - full * longest
        for size in reversed(buckets[:-1]):
            if left >= size:
                pieces[size].append((doc, start))
                start, left = start + size, left - size
    return {n: np.array(p, np.int64).reshape(-1, 2) for n, p in pieces.items()}


class DecomposedDataset:
    """The buckets of one split's documents; `rows(length, picks)` gathers pieces."""

    def __init__(self, token_docs: list[np.ndarray], bucket_lengths):
        self.bucket_lengths = check_bucket_lengths(bucket_lengths, "bucket_lengths")
        lengths = np.array([len(d) for d in token_docs], np.int64)
        self.tokens = (np.concatenate(token_docs) if token_docs else np.zeros(0)).astype(np.int32)
        self.doc_starts = np.cumsum(lengths) - lengths
        self.pieces = decompose(lengths, self.bucket_lengths)
        self.num_targets = int(np.maximum(lengths - 1, 0).sum())

    def num_rows(self, length: int) -> int:
        return len(self.pieces[length])

    def rows(self, length: int, picks: np.ndarray) -> dict[str, np.ndarray]:
        """Pieces `picks` of bucket `length` as rows of `length + 1` tokens (see
        `longjax.data.packing.rows_to_batch`): one document per row, segment id 1."""
        doc, start = self.pieces[length][picks].T
        positions = start[:, None] + np.arange(length + 1)
        return {"tokens": self.tokens[self.doc_starts[doc][:, None] + positions],
                "segment_ids": np.ones(positions.shape, np.int32),
                "positions": positions.astype(np.int32)}

    def stats(self) -> dict[str, float]:
        """Tokens (targets) per bucket and the fraction of targets dropped (below the
        shortest bucket)."""
        kept = {n: n * self.num_rows(n) for n in self.bucket_lengths}
        stats = {f"bucket_{n}_targets": float(k) for n, k in kept.items()}
        stats["dropped_targets"] = 1.0 - sum(kept.values()) / max(self.num_targets, 1)
        return stats


class CurriculumSampler:
    """Which bucket and which pieces each step trains on; exactly resumable.

    `bucket_rows` `{length: number of pieces}`, `odds` `{length: odds}`; one step is a
    batch of `tokens_per_step // length` pieces of one bucket. A cycle is `cycle_steps`
    batches split over the buckets with positive odds in proportion to their tokens; the
    bucket of each step is drawn with probability ~ `odds * batches left in the cycle`
    (the draw is seeded by (seed, step)). Inside a bucket, pieces are taken in an order
    reshuffled every pass over the bucket. `state()` is a JSON dict that `restore` takes.
    """

    def __init__(self, bucket_rows: dict[int, int], odds: dict[int, float], *,
                 tokens_per_step: int, cycle_steps: int, seed: int):
        self.lengths = sorted(n for n in bucket_rows if odds.get(n, 0) > 0 and bucket_rows[n])
        if not self.lengths:
            raise ValueError("no bucket with positive odds has any piece; use shorter "
                             "config.data.bucket_lengths or other curriculum odds")
        bad = [n for n in self.lengths if tokens_per_step % n]
        if bad:
            raise ValueError(f"tokens_per_step={tokens_per_step} is not a multiple of the "
                             f"bucket lengths {bad}")
        self.odds = np.array([odds[n] for n in self.lengths], np.float64)
        self.num_rows = {n: bucket_rows[n] for n in self.lengths}
        self.tokens_per_step, self.seed = tokens_per_step, seed
        self.cycle_batches = _split(cycle_steps, [n * bucket_rows[n] for n in self.lengths])
        self._state = {"step": 0, "left": list(self.cycle_batches),
                       "consumed": {str(n): 0 for n in self.lengths}}

    def batch_size(self, length: int) -> int:
        return self.tokens_per_step // length

    def state(self) -> dict:
        return {"step": self._state["step"], "left": list(self._state["left"]),
                "consumed": dict(self._state["consumed"])}

    def restore(self, state: dict) -> None:
        if sorted(state["consumed"], key=int) != [str(n) for n in self.lengths]:
            raise ValueError(f"the saved sampler has buckets {sorted(state['consumed'])}, "
                             f"this config {self.lengths}: resume with the same "
                             "config.data.bucket_lengths and curriculum")
        self._state = {"step": int(state["step"]), "left": [int(x) for x in state["left"]],
                       "consumed": {k: int(v) for k, v in state["consumed"].items()}}

    def next(self) -> tuple[int, np.ndarray]:
        """`(bucket length, piece indices)` of the next step; advances the state."""
        s = self._state
        if not any(s["left"]):
            s["left"] = list(self.cycle_batches)
        weights = self.odds * np.array(s["left"])
        u = np.random.default_rng((self.seed, s["step"])).random()
        which = min(int(np.searchsorted(np.cumsum(weights) / weights.sum(), u, side="right")),
                    len(weights) - 1)
        while not s["left"][which]:  # rounding at u ~ 1: step back to a bucket with batches
            which -= 1
        length = self.lengths[which]
        size, key = self.batch_size(length), str(length)
        index = s["consumed"][key] + np.arange(size)
        epochs, offsets = np.divmod(index, self.num_rows[length])
        picks = np.array([self._order(length, int(e))[o]
                          for e, o in zip(epochs, offsets, strict=True)])
        s["left"][which] -= 1
        s["consumed"][key] += size
        s["step"] += 1
        return length, picks

    @functools.lru_cache(maxsize=16)  # noqa: B019  (the sampler lives as long as the run)
    def _order(self, length: int, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, length, epoch)).permutation(
            self.num_rows[length])


def _split(total: int, shares: list[int]) -> list[int]:
    """`total` as integers proportional to `shares` (largest remainders), each >= 1 when
    `total` allows."""
    exact = np.array(shares, np.float64) * total / sum(shares)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    if total >= len(counts):  # a bucket rounded to 0 gets one batch, from the largest count
        for i in np.flatnonzero(counts == 0):
            counts[np.argmax(counts)] -= 1
            counts[i] += 1
    return [int(c) for c in counts]
