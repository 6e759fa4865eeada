"""JRT-Prompt (Arora et al. 2024, longjax.data.tasks.jrt): the context appears twice, in
a row, before the unchanged question and answer, with exact lengths; for MQAR and the
RULER-style needle tasks, in the harness and the MQAR config; bad input named."""

import numpy as np
import pytest

from longjax.data import tasks
from longjax.data.tasks.jrt import jrt_sample, repeat_context
from longjax.data.tasks.ruler import ruler_sample
from longjax.data.tokenizer import ByteTokenizer
from longjax.eval import ruler
from longjax.train.cli import load_config_file

MQAR = {"num_kv_pairs": 4, "num_symbols": 16}


def test_repeat_context_writes_the_span_twice():
    row = np.arange(7)
    np.testing.assert_array_equal(repeat_context(row, 2, 5), [0, 1, 2, 3, 4, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match=r"context span \[3, 3\)"):
        repeat_context(row, 3, 3)


def test_mqar_reads_its_key_value_pairs_twice_and_asks_the_same():
    """A JRT row of S + 2n tokens is the plain row of S tokens (the same draws) with its
    2n context tokens written again before the queries: the same queries, answers and
    weights, shifted by 2n."""
    n, S = MQAR["num_kv_pairs"], 32
    plain = tasks.task_batch("mqar", seed=3, step=5, batch_size=4, seq_len=S, **MQAR)
    read_twice = tasks.task_batch("mqar", seed=3, step=5, batch_size=4, seq_len=S + 2 * n,
                                  jrt=True, **MQAR)
    context = plain["tokens"][:, :2 * n]
    np.testing.assert_array_equal(read_twice["tokens"],
                                  np.concatenate([context, plain["tokens"]], axis=1))
    np.testing.assert_array_equal(read_twice["weights"][:, 2 * n:], plain["weights"])
    assert not read_twice["weights"][:, :2 * n].any()
    answers = read_twice["targets"][read_twice["weights"] > 0]
    np.testing.assert_array_equal(answers, plain["targets"][plain["weights"] > 0])
    assert tasks.task_seq_len("mqar", jrt=True, **MQAR) == 6 * n
    with pytest.raises(ValueError, match="mqar: task_options.jrt must be True or False"):
        tasks.task_seq_len("mqar", jrt="yes", **MQAR)
    with pytest.raises(ValueError, match=r"read twice \(jrt\)"):
        tasks.task_batch("mqar", seed=0, step=0, batch_size=1, seq_len=20, jrt=True, **MQAR)


def test_mqar_config_takes_jrt():
    config = load_config_file("configs/mqar.py:mixer=gla,jrt=True")
    assert config.data.task_options.to_dict() == {**MQAR, "jrt": True}


@pytest.mark.parametrize("task", ["niah_multikey", "vt"])
def test_a_needle_prompt_reads_its_context_twice_before_the_same_question(task):
    sample = ruler_sample(task, length=300, seed=1, index=2, depth=0.5)
    twice = jrt_sample(sample)
    start, stop = sample.context_span
    text = bytes(sample.tokens[start:stop].astype(np.uint8)).decode()
    assert all(needle in text for needle in sample.needles)
    assert len(twice.tokens) == 300 + stop - start
    np.testing.assert_array_equal(twice.tokens[:stop], sample.tokens[:stop])
    np.testing.assert_array_equal(twice.tokens[stop:2 * stop - start],
                                  sample.tokens[start:stop])
    np.testing.assert_array_equal(twice.tokens[2 * stop - start:], sample.tokens[stop:])
    assert bytes(twice.tokens[2 * stop - start:].astype(np.uint8)).decode().endswith(
        "\nAnswer:")
    assert twice.answers == sample.answers and twice.needle_positions == sample.needle_positions


def test_the_harness_generates_from_the_prompts_read_twice(monkeypatch):
    seen = []

    def reader(model, params, tok, prompts, **kwargs):
        seen.extend(len(p) for p in prompts)
        return ["" for _ in prompts]

    monkeypatch.setattr(ruler, "generations", reader)
    ruler.ruler_records(None, None, ByteTokenizer(), task="niah_single", length=300,
                        depths=(0.5,), samples=1, seed=0, batch_size=1, jrt=True)
    start, stop = ruler_sample("niah_single", length=300, seed=0, index=0,
                               depth=0.5).context_span
    assert seen == [300 + stop - start]
