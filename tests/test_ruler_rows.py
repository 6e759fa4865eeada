"""RULER-style prompts as training rows (longjax.data.tasks.ruler_rows) and their mix into
a text source's batches (config.data.ruler_tasks)."""

import re

import numpy as np
import pytest

from longjax.data import pipeline
from longjax.data.tasks.ruler_rows import ruler_batch
from longjax.data.tokenizer import EOS, PAD, ByteTokenizer
from longjax.eval.ruler import task_samples
from longjax.train import config as config_lib
from longjax.train.loop import eval_datasets


def _text(ids) -> str:
    return bytes(int(i) for i in ids if i < 256).decode()


def test_rows_are_the_prompt_then_its_answer_weighted_alone():
    tasks = ("niah_single", "niah_multikey")
    batch = ruler_batch(tasks, seed=0, indices=[4, 5, 6], seq_len=300, answer_weight=3.0)
    assert all(batch[k].shape == (3, 300) for k in batch)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(300), (3, 1)))
    assert (batch["segment_ids"] == 1).all()
    for row in range(3):
        prompt = _text(batch["tokens"][row])
        # the definition, parsed from the text: the asked key's needle holds the answer
        key = re.search(r"What is the magic number for (\w+)\?\nAnswer:", prompt).group(1)
        needles = re.findall(r"A magic number for (\w+) is (\d+)\.", prompt)
        assert len(needles) == (1 if row % 2 == 0 else 4)  # rows alternate the tasks
        value = dict(needles)[key]
        weighted = np.flatnonzero(batch["weights"][row])
        assert (batch["weights"][row, weighted] == 3.0).all()
        targets = batch["targets"][row, weighted]
        assert _text(targets) == f" {value}" and targets[-1] == EOS
        assert weighted[-1] == 299 and prompt.endswith(f"Answer: {value}")
    again = ruler_batch(tasks, seed=0, indices=[4, 5, 6], seq_len=300, answer_weight=3.0)
    other = ruler_batch(tasks, seed=1, indices=[4, 5, 6], seq_len=300, answer_weight=3.0)
    for key in batch:
        np.testing.assert_array_equal(batch[key], again[key])
    assert not np.array_equal(batch["tokens"], other["tokens"])


def test_rows_of_varied_length_are_the_prompt_its_answer_then_padding():
    tasks = ("niah_single", "niah_multikey")
    batch = ruler_batch(tasks, seed=0, indices=range(40), seq_len=300, min_length=200)
    lengths = (batch["segment_ids"] == 1).sum(1)
    assert lengths.min() >= 200 and lengths.max() <= 300 and len(set(lengths)) > 20
    for row, n in enumerate(lengths[:4]):
        np.testing.assert_array_equal(batch["segment_ids"][row], np.arange(300) < n)
        np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
        assert (batch["weights"][row, n:] == 0).all()
        assert (batch["tokens"][row, n + 1:] == PAD).all()  # tokens[n] is the answer's EOS
        prompt = _text(batch["tokens"][row, :n])
        key = re.search(r"What is the magic number for (\w+)\?\nAnswer:", prompt).group(1)
        value = dict(re.findall(r"A magic number for (\w+) is (\d+)\.", prompt))[key]
        weighted = np.flatnonzero(batch["weights"][row])
        assert weighted[-1] == n - 1 and _text(batch["targets"][row, weighted]) == f" {value}"
        assert prompt.endswith(f"Answer: {value}")
        # the row is the sample's full-length row of n tokens
        alone = ruler_batch(tasks, seed=0, indices=[row], seq_len=int(n))
        np.testing.assert_array_equal(batch["tokens"][row, :n], alone["tokens"][0])
    again = ruler_batch(tasks, seed=0, indices=range(40), seq_len=300, min_length=200)
    np.testing.assert_array_equal(batch["tokens"], again["tokens"])


def test_options_go_to_the_tasks_that_take_them():
    batch = ruler_batch(("niah_single", "cwe"), seed=0, indices=[0, 1], seq_len=400,
                        options={"haystack": "noise"})
    assert "The grass is green. " in _text(batch["tokens"][0])  # cwe takes no haystack
    prompts = task_samples("vt", length=256, depths=(0.5,), samples=1, seed=0,
                           tok=ByteTokenizer(), options={"haystack": "corpus"})
    assert "The grass is green. " not in _text(prompts[0].tokens)  # vt's default: noise
    with pytest.raises(ValueError, match=r"RULER options \['num_hops'\] are taken by none"):
        ruler_batch(("niah_single",), seed=0, indices=[0], seq_len=300,
                    options={"num_hops": 2})


def test_a_length_trains_the_tasks_that_fit_it():
    assert pipeline.RulerDataset(("niah_multiquery", "niah_single"), seed=0,
                                 seq_len=160).tasks == ("niah_single",)
    with pytest.raises(ValueError, match=r"none of the RULER tasks \('vt',\) fits rows of "
                                         r"60 tokens"):
        pipeline.RulerDataset(("vt",), seed=0, seq_len=60)


def test_training_batches_mix_task_rows_into_text_rows(tiny_config):
    config = tiny_config(data__seq_len=256, data__ruler_tasks=("niah_single",),
                         data__ruler_fraction=0.25, data__ruler_answer_weight=2.0)
    config_lib.validate(config)
    mixed = pipeline.make_dataset(config, "train")
    text = pipeline.PackedDataset.from_config(config.data, "train", seed=config.seed)
    batch = mixed.batch(3, 8)
    ruler = ruler_batch(("niah_single",), seed=config.seed, indices=[6, 7], seq_len=256,
                        answer_weight=2.0)  # step 3 of 2 task rows per batch
    plain = text.batch(3, 6)
    for key in batch:
        np.testing.assert_array_equal(batch[key][:2], ruler[key])
        np.testing.assert_array_equal(batch[key][2:], plain[key])
    some = mixed.batch(3, 8, np.array([1, 5]))  # a process's rows
    for key in batch:
        np.testing.assert_array_equal(some[key], batch[key][[1, 5]])
    sets = eval_datasets(config)
    assert sorted(sets) == ["ruler_len256", "validation"]
    held_out = sets["ruler_len256"].batch(0, 2)
    assert not np.array_equal(held_out["tokens"], mixed.batch(0, 8)["tokens"][:2])
    assert set(np.unique(held_out["weights"])) == {0.0, 1.0}
    varied = config_lib.apply_overrides(config, {"data.ruler_min_length": 0.75})
    rows = pipeline.make_dataset(varied, "train").batch(3, 8)["segment_ids"][:2].sum(1)
    assert (rows >= 192).all() and (rows < 256).any()  # the training rows only
    held_out = eval_datasets(varied)["ruler_len256"].batch(0, 2)
    assert (held_out["segment_ids"] == 1).all()


@pytest.mark.parametrize("overrides, message", [
    ({"data.ruler_tasks": ("niah",)}, r"ruler_tasks=\('niah',\).*subset of"),
    ({"data.ruler_tasks": ("niah_single", "niah_multiquery")},
     r"only \['niah_single'\] fit training rows of 256 tokens \(seq_len=256"),
    ({"data.ruler_tasks": ("niah_single",), "data.ruler_min_length": 0.25},
     r"only \[\] fit training rows of 64 tokens \(seq_len=256, "
     r"config.data.ruler_min_length=0.25\)"),
    ({"data.ruler_tasks": ("vt",), "data.ruler_min_length": 1.5},
     r"config.data.ruler_min_length=1.5 must be in \(0, 1\]"),
    ({"data.ruler_tasks": ("vt",), "data.ruler_fraction": 0.0},
     r"config.data.ruler_fraction=0.0 must be in \(0, 1\]"),
    ({"data.ruler_tasks": ("vt",), "data.packing": "contiguous"},
     "config.data.ruler_tasks mixes rows into a text source's batches"),
])
def test_bad_mixes_name_the_field(tiny_config, overrides, message):
    config = config_lib.apply_overrides(tiny_config(data__seq_len=256), overrides)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)
