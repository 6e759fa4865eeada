"""Synthetic tasks: MQAR batches are well formed, answerable and deterministic per step."""

import numpy as np
import pytest

from longjax.data.tasks import TASKS, task_batch


def _batch(step=0, **options):
    return task_batch("mqar", seed=3, step=step, batch_size=4, seq_len=48, **options)


def test_mqar_shapes_and_dtypes():
    b = _batch()
    assert set(b) == {"tokens", "targets", "weights", "segment_ids", "positions"}
    for name, x in b.items():
        assert x.shape == (4, 48), name
        assert x.dtype == (np.float32 if name == "weights" else np.int32), name
    assert b["tokens"].min() >= 0 and b["tokens"].max() < 256
    np.testing.assert_array_equal(b["targets"][:, :-1], b["tokens"][:, 1:])
    np.testing.assert_array_equal(b["segment_ids"], 1)
    np.testing.assert_array_equal(b["positions"][1], np.arange(48))


@pytest.mark.parametrize("num_kv_pairs, num_symbols", [(8, 127), (3, 5)])
def test_mqar_queries_are_answered_by_the_context(num_kv_pairs, num_symbols):
    b = _batch(num_kv_pairs=num_kv_pairs, num_symbols=num_symbols)
    n = num_kv_pairs
    for tokens, targets, weights in zip(b["tokens"], b["targets"], b["weights"], strict=True):
        keys, values = tokens[0:2 * n:2], tokens[1:2 * n:2]
        assert len(set(keys)) == n and keys.min() >= 1 and keys.max() <= num_symbols
        assert values.min() >= 128 and values.max() < 128 + num_symbols
        queries = np.flatnonzero(weights)
        assert len(queries) == n and queries.min() >= 2 * n
        assert sorted(tokens[queries]) == sorted(keys)  # every key is asked once
        answer = dict(zip(keys, values, strict=True))
        assert all(targets[t] == answer[tokens[t]] for t in queries)


def test_mqar_is_deterministic_per_seed_and_step():
    a, b, c = _batch(step=5), _batch(step=5), _batch(step=6)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["tokens"], c["tokens"])


def test_registry_lists_option_defaults():
    assert TASKS["mqar"] == {"num_kv_pairs": 8, "num_symbols": 127}


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "passkey"}, "unknown task 'passkey'"),
    ({"num_keys": 3}, r"unknown task_options \['num_keys'\]"),
    ({"num_kv_pairs": 13}, "too short for num_kv_pairs=13"),
    ({"num_kv_pairs": 0}, "num_kv_pairs must be an int"),
    ({"num_kv_pairs": 6, "num_symbols": 4}, "num_kv_pairs must be an int in \\[1, num_symbols=4"),
    ({"num_symbols": 200}, "num_symbols must be an int in"),
])
def test_bad_options_raise(kwargs, match):
    name = kwargs.pop("name", "mqar")
    with pytest.raises(ValueError, match=match):
        task_batch(name, seed=0, step=0, batch_size=2, seq_len=48, **kwargs)
