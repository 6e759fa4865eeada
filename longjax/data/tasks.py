"""Synthetic tasks generated on the fly, deterministic in `(seed, step)`.

`task_batch(name, *, seed, step, batch_size, seq_len, **options)` returns numpy arrays
`[batch_size, seq_len]`: `tokens`, `targets` (the next token), `weights` (1.0 where the
loss and the accuracy count), `segment_ids` (1 = real token, 0 = padding) and `positions`.
Token ids are bytes, in [0, 256). `TASKS` maps each name to its option defaults.

- `mqar`, multi-query associative recall (Arora et al. 2023, "Zoology", Sec. 3): the
  sequence opens with `num_kv_pairs` key-value pairs `k_1 v_1 ... k_N v_N` (distinct keys
  from the `num_symbols` ids [1, 1 + S), values from [128, 128 + S)); every key then
  appears once more, at a random two-token slot of the rest of the sequence followed by
  its value, and the model must predict that value from the key. Other tokens are 0.
  (Zoology draws the query gaps from a power law; here the slots are uniform.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from longjax.data.tokenizer import PAD

_MAX_SYMBOLS = 127


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


def _mqar(rng, batch_size, seq_len, num_kv_pairs, num_symbols):
    if not isinstance(num_symbols, int) or not 1 <= num_symbols <= _MAX_SYMBOLS:
        raise ValueError(f"mqar: task_options.num_symbols must be an int in "
                         f"[1, {_MAX_SYMBOLS}]; got {num_symbols!r}")
    if not isinstance(num_kv_pairs, int) or not 1 <= num_kv_pairs <= num_symbols:
        raise ValueError(f"mqar: task_options.num_kv_pairs must be an int in "
                         f"[1, num_symbols={num_symbols}]; got {num_kv_pairs!r}")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"mqar: seq_len={seq_len} is too short for num_kv_pairs="
                         f"{num_kv_pairs}; it needs at least 4 * num_kv_pairs tokens")
    rows = [_mqar_row(rng, seq_len, num_kv_pairs, num_symbols) for _ in range(batch_size)]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


_GENERATORS: dict[str, Callable] = {"mqar": _mqar}
TASKS: dict[str, dict] = {"mqar": {"num_kv_pairs": 8, "num_symbols": _MAX_SYMBOLS}}


def task_batch(name, *, seed, step, batch_size, seq_len, **options) -> dict[str, np.ndarray]:
    """One batch of task `name` (see the module doc); the same `(seed, step)` gives the
    same batch."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
    unknown = set(options) - set(TASKS[name])
    if unknown:
        raise ValueError(f"{name}: unknown task_options {sorted(unknown)}; "
                         f"allowed: {sorted(TASKS[name])}")
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size must be >= 1 and seq_len >= 2; got {batch_size}, "
                         f"{seq_len}")
    rng = np.random.default_rng([seed, step, sorted(TASKS).index(name)])
    tokens, weights = _GENERATORS[name](rng, batch_size, seq_len, **{**TASKS[name], **options})
    targets = np.concatenate([tokens[:, 1:], np.full((batch_size, 1), PAD, np.int32)], 1)
    return {
        "tokens": tokens, "targets": targets.astype(np.int32), "weights": weights,
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                     (batch_size, seq_len)).copy(),
    }
