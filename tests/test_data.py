"""Tokenizer, packing, the embedded corpus and the other text sources."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from longjax.data import packing, pipeline, sources, stdlib_corpus, tokenizer


def test_tokenizer_round_trip_with_specials():
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.BOS and ids[-1] == tokenizer.EOS
    assert ids.max() < tokenizer.VOCAB_SIZE
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.array([tokenizer.PAD, 104, 105])) == "hi"


def test_packing_keeps_documents_apart():
    docs = [tokenizer.encode("a" * n) for n in (5, 9, 3, 14)]
    rows = packing.pack_documents(docs, 8)
    total = sum(len(d) for d in docs)
    assert rows["tokens"].shape == (-(-total // 8), 8)
    np.testing.assert_array_equal(rows["tokens"].reshape(-1)[:total], np.concatenate(docs))
    # positions restart at each document and continue across a row border
    flat_pos = rows["positions"].reshape(-1)[:total]
    np.testing.assert_array_equal(flat_pos, np.concatenate([np.arange(len(d)) for d in docs]))
    # padding has segment 0; segment ids change exactly at document starts
    assert (rows["segment_ids"].reshape(-1)[total:] == 0).all()
    batch = packing.rows_to_batch(rows)
    seg = rows["segment_ids"]
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(batch["weights"] > 0, same_doc)
    # a weighted target is the next token of the same document
    assert (batch["targets"][batch["weights"] > 0] != tokenizer.BOS).all()


def test_packing_rejects_short_rows():
    with pytest.raises(ValueError, match="row_length"):
        packing.pack_documents([np.arange(3)], 1)


def test_stdlib_split_is_deterministic_and_excludes_third_party():
    files = stdlib_corpus.stdlib_files()
    names = [name for name, _ in files]
    assert len(names) > 300 and "os.py" in names
    assert not any("site-packages" in n or n.startswith("test/") for n in names)
    splits = [stdlib_corpus.split_of(n) for n in names]
    assert splits == [stdlib_corpus.split_of(n) for n in names]
    counts = {s: splits.count(s) for s in ("train", "validation", "test")}
    assert counts["train"] > 0.8 * len(names) and min(counts.values()) > 10


def test_stdlib_builder_array_record_without_tensorflow(tmp_path):
    import sys

    builder = stdlib_corpus.StdlibSource(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    data = tfds.data_source(builder.name + "/" + builder.builder_config.name,
                            data_dir=str(tmp_path))
    validation = data["validation"]
    wanted = {n for n, _ in stdlib_corpus.stdlib_files()
              if stdlib_corpus.split_of(n) == "validation"}
    assert {validation[i]["path"].decode() for i in range(len(validation))} == wanted
    assert "tensorflow" not in sys.modules


def test_tfds_source_by_name(tmp_path, tiny_config):
    from tiny_tfds import TinyTexts

    TinyTexts(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = tiny_config(data__source="tfds", data__tfds_name="tiny_texts",
                         data__data_dir=str(tmp_path), data__text_field="body",
                         data__eval_split="test")
    assert sorted(sources.load_documents(config.data, "validation")) == [
        "document 0 ", "document 1 " * 2]
    assert len(sources.load_documents(config.data, "train")) == 5
    config.data.text_field = "text"
    with pytest.raises(ValueError, match="text_field='text'.*body"):
        sources.load_documents(config.data, "train")


def test_file_sources(tmp_path, tiny_config, text_folder):
    single = tmp_path / "notes.txt"
    single.write_text("".join(f"line {i}\n" for i in range(100)))
    config = tiny_config(data__path=str(single))
    assert sources.load_documents(config.data, "validation") == [
        "".join(f"line {i}\n" for i in range(90, 95))]
    config = tiny_config()  # the folder of 30 files: split by file
    train = sources.load_documents(config.data, "train")
    held_out = sources.load_documents(config.data, "validation") + sources.load_documents(
        config.data, "test")
    assert len(train) + len(held_out) == 30 and train
    config.data.path = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.data.path=.*does not exist"):
        sources.load_documents(config.data, "train")


def test_batches_are_deterministic_and_resumable(tiny_config):
    config = tiny_config()
    data = pipeline.make_dataset(config, "train")
    again = pipeline.make_dataset(config, "train")
    for step in (0, 3, data.num_batches(8) + 1):  # the last one is in the second epoch
        a, b = data.batch(step, 8), again.batch(step, 8)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(data.batch(0, 8)["tokens"], data.batch(1, 8)["tokens"])
    evaluation = pipeline.make_dataset(config, "validation")
    last = evaluation.batch(evaluation.num_batches(8) - 1, 8)
    real_rows = evaluation.num_rows - 8 * (evaluation.num_batches(8) - 1)
    assert (last["weights"][real_rows:] == 0).all() and last["weights"][:real_rows].any()
