"""Synthetic tasks: batches are well formed, answerable (checked by an independent
computation on the decoded text) and deterministic per step; the exact-match metric."""

import collections
import itertools
import re

import jax.numpy as jnp
import numpy as np
import pytest

from longjax.data.pipeline import make_dataset
from longjax.data.tasks import TASKS, task_batch, task_seq_len
from longjax.data.tokenizer import PAD, decode
from longjax.train.config import base_config
from longjax.train.step import loss_and_sums, summarize


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
    assert TASKS["mqar"] == {"num_kv_pairs": 8, "num_symbols": 127, "jrt": False}
    for name in LENGTH_TASKS:
        assert TASKS[name] == {"min_length": 1, "max_length": 20}
    assert TASKS["passkey"] == {"depth": -1.0, "num_digits": 5}
    assert set(TASKS) == {"mqar", "passkey", *LENGTH_TASKS}


# --- Length-generalization tasks (Kazemnejad et al. 2023) -----------------------------
# Each check parses a decoded `question=answer` row, asserts the answer by its own
# computation, and returns the instance size n.

def _check_copy(q, a):
    assert q.isdigit() and a == q
    return len(q)


def _check_reverse(q, a):
    assert q.isdigit() and a == "".join(q[i] for i in range(len(q) - 1, -1, -1))
    return len(q)


def _check_addition(q, a):
    x, y = q.split("+")
    assert len(x) == len(y) and x.isdigit() and y.isdigit() and len(a) == len(x) + 1
    assert sum(int(d) * 10 ** i for i, d in enumerate(a)) == int(x) + int(y)  # reversed
    return len(x)


def _check_parity(q, a):
    assert set(q) <= {"0", "1"} and a == ("1" if q.count("1") % 2 else "0")
    return len(q)


def _check_sorting(q, a):
    assert q.isdigit() and collections.Counter(a) == collections.Counter(q)
    assert all(x <= y for x, y in itertools.pairwise(a))
    return len(q)


def _check_summation(q, a):
    assert q.isdigit() and len(a) == 1 and int(a) == sum(int(d) for d in q) % 10
    return len(q)


LENGTH_TASKS = {"copy": _check_copy, "reverse": _check_reverse, "addition": _check_addition,
                "parity": _check_parity, "sorting": _check_sorting,
                "summation": _check_summation}


def _rows(b):
    """(text, segment_ids, weights, targets) of each row's real tokens."""
    for tokens, seg, w, t in zip(b["tokens"], b["segment_ids"], b["weights"], b["targets"],
                                 strict=True):
        yield decode(tokens[seg > 0]), seg, w, t


@pytest.mark.parametrize("name", LENGTH_TASKS)
def test_length_task_rows_are_right_and_sized_within_options(name):
    b = task_batch(name, seed=1, step=2, batch_size=48, seq_len=task_seq_len(name, 6) + 3,
                   min_length=3, max_length=6)
    sizes = set()
    for text, seg, w, t in _rows(b):
        q, a = text.split("=")
        sizes.add(LENGTH_TASKS[name](q, a))
        end = len(text)
        np.testing.assert_array_equal(seg, np.arange(len(seg)) < end)  # left-aligned
        # weights: exactly the tokens whose next token is an answer token
        np.testing.assert_array_equal(np.flatnonzero(w), np.arange(len(q), end - 1))
        assert decode(t[w > 0]) == a
        assert (t[end - 1:] == PAD).all() and (w[end:] == 0).all()
    assert sizes == {3, 4, 5, 6}  # 48 rows draw every size of [3, 6]


@pytest.mark.parametrize("name", [*LENGTH_TASKS, "passkey"])
def test_batches_are_well_formed_and_deterministic(name):
    seq_len = 120 if name == "passkey" else 70

    def batch(seed, step):
        return task_batch(name, seed=seed, step=step, batch_size=8, seq_len=seq_len)

    a, b = batch(0, 4), batch(0, 4)
    for key in a:
        assert a[key].shape == (8, seq_len), key
        assert a[key].dtype == (np.float32 if key == "weights" else np.int32), key
        np.testing.assert_array_equal(a[key], b[key])
    assert a["tokens"].min() >= 0 and a["tokens"].max() < 256
    real_next = a["segment_ids"][:, 1:] > 0
    np.testing.assert_array_equal(a["targets"][:, :-1][real_next], a["tokens"][:, 1:][real_next])
    assert (a["targets"][:, :-1][~real_next] == PAD).all() and (a["targets"][:, -1] == PAD).all()
    np.testing.assert_array_equal(a["positions"], np.tile(np.arange(seq_len), (8, 1)))
    assert not np.array_equal(a["tokens"], batch(0, 5)["tokens"])
    assert not np.array_equal(a["tokens"], batch(1, 4)["tokens"])


@pytest.mark.parametrize("name, seq_len_of", [
    ("copy", lambda n: 2 * n + 1), ("reverse", lambda n: 2 * n + 1),
    ("sorting", lambda n: 2 * n + 1), ("addition", lambda n: 3 * n + 3),
    ("parity", lambda n: n + 2), ("summation", lambda n: n + 2)])
def test_task_seq_len_fits_the_largest_instance_exactly(name, seq_len_of):
    assert task_seq_len(name) == seq_len_of(20)  # the default max_length
    need = task_seq_len(name, 9)
    assert need == seq_len_of(9) == task_seq_len(name, max_length=9, min_length=9)
    b = task_batch(name, seed=0, step=0, batch_size=3, seq_len=need, min_length=9, max_length=9)
    np.testing.assert_array_equal(b["segment_ids"], 1)
    with pytest.raises(ValueError, match=rf"{name}: seq_len={need - 1} is too short for "
                       rf"task_options.max_length=9; it needs seq_len >= {need}"):
        task_batch(name, seed=0, step=0, batch_size=3, seq_len=need - 1, max_length=9)


# --- Passkey retrieval (Mohtashami & Jaggi 2023) --------------------------------------

_NEEDLE = re.compile(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\. ")
_QUESTION = "What is the pass key? The pass key is "
_SENTENCES = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ",
              "Here we go. ", "There and back again. ")


def _parse_passkey(b, num_digits=5):
    """Per row: (key, needle start, filler bytes around the needle); checks the layout."""
    seq_len = b["tokens"].shape[1]
    for text, seg, w, t in _rows(b):
        assert len(text) == seq_len and (seg == 1).all()
        needle = _NEEDLE.search(text)
        key = needle.group(1)
        assert len(key) == num_digits
        assert text.endswith(_QUESTION + key)  # the key's digits end the row
        np.testing.assert_array_equal(np.flatnonzero(w),
                                      np.arange(seq_len - 1 - num_digits, seq_len - 1))
        assert decode(t[w > 0]) == key
        before = text[:needle.start()]
        after = text[needle.end():-len(_QUESTION + key)]
        filler = before + after.rstrip(" ")
        assert len(after) - len(after.rstrip(" ")) < max(map(len, _SENTENCES))
        assert filler == "".join(itertools.islice(itertools.cycle(_SENTENCES), 10 ** 4))[
            :len(filler)]
        yield key, needle.start(), len(filler)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_needle_sits_at_depth(depth):
    b = task_batch("passkey", seed=0, step=1, batch_size=4, seq_len=500, depth=depth)
    for _, start, filler in _parse_passkey(b):
        assert abs(start - depth * filler) <= max(map(len, _SENTENCES)) / 2
        if depth in (0.0, 1.0):  # the filler's ends are sentence boundaries
            assert start == depth * filler


def test_passkey_random_depth_spreads_and_keys_ignore_depth():
    kwargs = {"seed": 5, "step": 0, "batch_size": 32, "seq_len": 400}
    rows = list(_parse_passkey(task_batch("passkey", **kwargs)))
    depths = [start / filler for _, start, filler in rows]
    assert min(depths) < 0.2 and max(depths) > 0.8 and len(set(depths)) > 8
    fixed = list(_parse_passkey(task_batch("passkey", depth=0.5, **kwargs)))
    assert [r[0] for r in rows] == [r[0] for r in fixed]
    assert len({r[0] for r in rows}) == 32  # keys differ across rows


def test_passkey_shortest_row_and_longer_keys():
    need = task_seq_len("passkey", num_digits=8)
    b = task_batch("passkey", seed=0, step=0, batch_size=2, seq_len=need, num_digits=8)
    assert [r[1:] for r in _parse_passkey(b, num_digits=8)] == [(0, 0), (0, 0)]  # no filler
    with pytest.raises(ValueError, match=rf"passkey: seq_len={need - 1} is too short for the "
                       rf"needle and question \(num_digits=8\); it needs seq_len >= {need}"):
        task_batch("passkey", seed=0, step=0, batch_size=2, seq_len=need - 1, num_digits=8)


# --- Errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, match", [
    ("mqar", {"num_keys": 3}, r"unknown task_options \['num_keys'\]"),
    ("mqar", {"num_kv_pairs": 13}, "too short for num_kv_pairs=13"),
    ("mqar", {"num_kv_pairs": 0}, "num_kv_pairs must be an int"),
    ("mqar", {"num_kv_pairs": 6, "num_symbols": 4},
     "num_kv_pairs must be an int in \\[1, num_symbols=4"),
    ("mqar", {"num_symbols": 200}, "num_symbols must be an int in"),
    ("copy_twice", {}, r"unknown task 'copy_twice'; allowed: \['addition', 'copy'"),
    ("copy", {"length": 3}, r"copy: unknown task_options \['length'\]; allowed: "
                            r"\['max_length', 'min_length'\]"),
    ("reverse", {"min_length": 0}, r"reverse: task_options.min_length must be an int >= 1; "
                                   r"got 0"),
    ("parity", {"min_length": 9, "max_length": 4},
     "parity: task_options.max_length must be an int >= min_length=9; got 4"),
    ("sorting", {"max_length": 2.5}, "max_length must be an int"),
    ("addition", {"max_length": 16}, r"too short for task_options.max_length=16; it needs "
                                     r"seq_len >= 51"),
    ("passkey", {"depth": 1.5}, r"passkey: task_options.depth must be a number in \[0, 1\], "
                                r"or -1 for a uniform depth per row; got 1.5"),
    ("passkey", {"depth": -0.5}, "depth must be a number in"),
    ("passkey", {"num_digits": 0}, "num_digits must be an int >= 1"),
    ("passkey", {"num_digits": 40}, "too short for the needle and question"),
])
def test_bad_options_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        task_batch(name, seed=0, step=0, batch_size=2, seq_len=48, **kwargs)


def test_task_seq_len_checks_options():
    with pytest.raises(ValueError, match=r"passkey: unknown task_options \['max_length'\]"):
        task_seq_len("passkey", 10)
    with pytest.raises(ValueError, match="copy: task_options.max_length must be an int >= "
                       "min_length=5"):
        task_seq_len("copy", 4, min_length=5)
    assert task_seq_len("mqar", num_kv_pairs=3) == 12


# --- Training integration --------------------------------------------------------------

def test_config_task_source_makes_task_batches():
    config = base_config()
    config.data.update(source="task", task="passkey", seq_len=256)
    config.data.task_options = {"depth": 0.25, "num_digits": 6}
    batch = make_dataset(config, "train").batch(3, 4)
    expected = task_batch("passkey", seed=config.seed, step=3, batch_size=4, seq_len=256,
                          depth=0.25, num_digits=6)
    for key in expected:
        np.testing.assert_array_equal(batch[key], expected[key])


class _Predicts:
    """A stand-in model whose logits pick `predictions` `[batch, seq]`."""

    def __init__(self, predictions):
        self.logits = jnp.eye(PAD + 1)[predictions]

    def apply(self, variables, tokens, *, segment_ids, positions):
        return self.logits, None


def test_sequence_accuracy_is_exact_match_of_the_weighted_tokens():
    b = task_batch("copy", seed=0, step=0, batch_size=4, seq_len=12, max_length=5)
    predictions = b["targets"].copy()
    predictions[1, np.flatnonzero(b["weights"][1])[-1]] += 1  # one answer digit wrong
    predictions[2, ~(b["weights"][2] > 0)] = 7  # wrong only where nothing is weighted
    b["weights"][3] = 0  # a row with nothing to score is not counted
    _, sums = loss_and_sums({}, b, _Predicts(predictions))
    assert (float(sums["rows"]), float(sums["rows_correct"])) == (3.0, 2.0)
    metrics = summarize(sums)
    assert metrics["sequence_accuracy"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(1 - 1 / b["weights"][:3].sum())
