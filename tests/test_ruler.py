"""RULER-style tasks (longjax.data.tasks.ruler): every answer checked against the task's
definition by parsing the prompt's text here, needles at the boundary nearest their
depth, exact lengths at 256 and 128k tokens in bytes and in a BPE tokenizer, determinism
per seed, bad input; the harness's scoring (longjax.eval.ruler)."""

import collections
import dataclasses
import re

import numpy as np
import pytest
from hf_models import make_tokenizer

from longjax.data.tasks.ruler import DEPTH_TASKS, RULER_TASKS, TooShort, ruler_sample
from longjax.data.tokenizer import BOS, ByteTokenizer, PretrainedTokenizer
from longjax.eval import ruler

NEEDLE = re.compile(r"A magic number for (\w+) is (\d+)\.\n")
STATEMENT = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.\n")
NOISE_NIAH = {t: {"haystack": "noise"} for t in RULER_TASKS if t.startswith("niah")}


def expected_answers(text: str) -> list[str]:
    """The answers the task's definition gives for the prompt `text`, read from it."""
    if match := re.search(r"magic numbers? for (.+)\?\nAnswer:$", text):
        values = collections.defaultdict(list)
        for key, value in NEEDLE.findall(text):
            values[key].append(value)
        return [v for key in re.split(r", | and ", match[1]) for v in values[key]]
    if match := re.search(r"assigned the value (\d+)\.\nAnswer:$", text):
        assigned = {name: ref or number for name, ref, number in STATEMENT.findall(text)}

        def value(name):
            while name in assigned:
                name = assigned[name]
            return name

        return [name for name in assigned if value(name) == match[1]]
    k, counts = _word_counts(text)
    assert counts[k - 1][1] > (counts[k][1] if len(counts) > k else 0), "a tie at the k-th"
    return [word for word, _ in counts[:k]]


def _word_counts(text: str) -> tuple[int, list[tuple[str, int]]]:
    """k and the (word, count) of the list of a cwe / fwe prompt, most common first."""
    match = re.fullmatch(r"Find the (\d+) most (?:common|frequent) words in this \w+:\n(.*)"
                         r"\nWhat are .*\nAnswer:", text, re.DOTALL)
    return int(match[1]), collections.Counter(match[2].split()).most_common()


def _text(sample, tok=None) -> str:
    if tok is None:
        assert sample.tokens[0] == BOS
        return bytes(sample.tokens[1:].astype(np.uint8)).decode()
    return tok.decode(sample.tokens)


# At 270 bytes the largest Zipf scale that fits ties fwe's 3rd and 4th counts.
@pytest.mark.parametrize("length", [256, 270, 131072])
@pytest.mark.parametrize("task, options", [
    *((t, {}) for t in RULER_TASKS),
    ("niah_multikey", {"haystack": "needles"}), ("niah_multiquery", {"haystack": "noise"}),
    ("vt", {"num_chains": 2, "num_hops": 2}), ("cwe", {"num_common": 4}),
    ("fwe", {"alpha": 1.5})])
def test_answers_follow_the_definition(task, options, length):
    sample = ruler_sample(task, length=length, seed=1, index=2, depth=0.3, **options)
    assert sample.tokens.shape == (length,) and sample.tokens.dtype == np.int32
    text = _text(sample)
    assert sorted(sample.answers) == sorted(expected_answers(text))
    if task.startswith("niah"):
        o = {**RULER_TASKS[task], **options}
        assert len(sample.needles) == o["num_keys"] * o["num_values"]
        assert len(NEEDLE.findall(text)) >= len(sample.needles)  # "needles": more
        assert len(set(NEEDLE.findall(text))) == len(NEEDLE.findall(text))
    if task == "fwe":  # the word of rank r appears floor(C r^-alpha) times, C the top count
        counts = np.array([n for _, n in _word_counts(text)[1]])
        alpha = options.get("alpha", RULER_TASKS["fwe"]["alpha"])
        zipf = np.floor(counts[0] * np.arange(1, len(counts) + 2) ** -alpha)
        np.testing.assert_array_equal(counts, zipf[zipf > 0])


def _haystack_offsets(sample, kind):
    """The haystack's text without the needles, its unit boundaries, and where each
    needle went in it (its position less the needles before it)."""
    text = _text(sample)
    context = text[:text.rindex("\n", 0, text.rindex("\nAnswer:"))]
    offsets, pieces, done, removed = {}, [], 0, 0
    for i in np.argsort(sample.needle_positions, kind="stable"):
        start = sample.needle_positions[i] - 1  # BOS
        assert context[start:].startswith(sample.needles[i])
        pieces.append(context[done:start])
        offsets[i] = start - removed
        done, removed = start + len(sample.needles[i]), removed + len(sample.needles[i])
    haystack = "".join(pieces) + context[done:]
    haystack = haystack.rstrip(" ") + (" " if kind == "noise" else "")  # less the padding
    unit_end = r"\. " if kind == "noise" else "\n"
    boundaries = np.array([0] + [m.end() for m in re.finditer(unit_end, haystack)])
    assert boundaries[-1] == len(haystack)
    return boundaries, offsets


@pytest.mark.parametrize("task, kind", [("niah_multikey", "corpus"), ("vt", "noise"),
                                        ("niah_multivalue", "noise")])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_needles_sit_at_the_boundary_nearest_their_depth(task, kind, depth):
    sample = ruler_sample(task, length=1500, seed=0, depth=depth, haystack=kind)
    boundaries, offsets = _haystack_offsets(sample, kind)
    for i, needle_depth in enumerate(sample.needle_depths):
        target = needle_depth * boundaries[-1]
        assert offsets[i] in boundaries
        assert abs(offsets[i] - target) <= np.abs(boundaries - target).min()
    asked = next(i for i, n in enumerate(sample.needles) if sample.answers[0] in n)
    assert sample.depth == depth and sample.needle_depths[asked] == depth
    if task == "vt":  # the chain in order: each statement after the one it reads
        chain = [sample.needle_positions[i] for i, n in enumerate(sample.needles)
                 if n.split()[1] in sample.answers]
        assert chain == sorted(chain)


def test_deterministic_per_seed_and_the_same_keys_at_every_depth():
    a = ruler_sample("niah_multikey", length=512, seed=5, index=1, depth=0.2)
    b = ruler_sample("niah_multikey", length=512, seed=5, index=1, depth=0.2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert dataclasses.replace(a, tokens=None) == dataclasses.replace(b, tokens=None)
    other = [ruler_sample("niah_multikey", length=512, seed=s, index=i, depth=0.2)
             for s, i in ((5, 2), (6, 1))]
    assert all(o.answers != a.answers for o in other)
    deeper = ruler_sample("niah_multikey", length=4096, seed=5, index=1, depth=0.9)
    assert deeper.answers == a.answers and deeper.needles == a.needles
    assert ruler_sample("cwe", length=300, seed=5).depth is None


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder)
    return PretrainedTokenizer(folder)


@pytest.mark.parametrize("length", [256, 131072])
def test_a_checkpoint_tokenizer_gives_exact_lengths_and_the_same_answers(bpe, length):
    for task in RULER_TASKS:
        sample = ruler_sample(task, length=length, seed=3, depth=0.5, tok=bpe,
                              **NOISE_NIAH.get(task, {}))
        assert sample.tokens.shape == (length,), task
        text = _text(sample, bpe)
        assert sorted(sample.answers) == sorted(expected_answers(text)), task
        for needle, position in zip(sample.needles, sample.needle_positions, strict=True):
            size = len(bpe.encode(needle, add_bos=False, add_eos=False))
            assert bpe.decode(sample.tokens[position:position + size]) == needle


@pytest.mark.parametrize("call, match", [
    (dict(task="passkey"), "unknown RULER task"),
    (dict(task="niah_single", keys=2), "unknown options"),
    (dict(task="niah_single", haystack="essay"), "haystack must be one of"),
    (dict(task="vt", haystack="needles"), "haystack must be one of"),
    (dict(task="niah_multiquery", num_queries=5), "num_queries=5 must be at most"),
    (dict(task="cwe", uncommon_count=30), "uncommon_count=30 must be below"),
    (dict(task="fwe", alpha=0.5), "alpha must be a number >= 1"),
    (dict(task="niah_single", depth=1.5), "depth must be in"),
    (dict(task="niah_single", length=0), "length must be an int"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        ruler_sample(**{"length": 256, "seed": 0, **call})


@pytest.mark.parametrize("task, length", [("niah_multiquery", 200), ("cwe", 200),
                                          ("niah_single", 40)])
def test_too_short_names_the_length(task, length):
    with pytest.raises(TooShort, match=f"{task}: length={length} is too short"):
        ruler_sample(task, length=length, seed=0)


def test_recall_is_the_share_of_answers_found():
    assert ruler.recall("The numbers: 123, 456.", ("123", "456")) == 1.0
    assert ruler.recall("bazoki BAZOKI", ("Bazoki", "lumeta")) == 0.5
    assert ruler.recall("", ("1",)) == 0.0


def test_records_score_a_reader_that_answers_from_the_prompt(monkeypatch):
    """Generations that answer each prompt from its own text (the parser above) score 1 in
    every record, at every depth; empty ones score 0 (the word tasks: one undepthed
    record per sample)."""
    def reader(model, params, tok, prompts, **kwargs):
        return [", ".join(expected_answers(bytes(p[1:].astype(np.uint8)).decode()))
                for p in prompts]

    monkeypatch.setattr(ruler, "generations", reader)
    records = ruler.ruler_records(None, None, ByteTokenizer(),
                                  task="niah_multikey", length=400, depths=(0, 1), samples=2,
                                  seed=0, batch_size=2)
    assert [(r["depth"], r["sample"], r["score"]) for r in records] == [
        (0, 0, 1.0), (0, 1, 1.0), (1, 0, 1.0), (1, 1, 1.0)]
    assert ruler.depth_means(records) == {0: 1.0, 1: 1.0}
    monkeypatch.setattr(ruler, "generations", lambda *a, **k: ["" for _ in a[3]])
    records = ruler.ruler_records(None, None, ByteTokenizer(),
                                  task="cwe", length=400, depths=(0, 1), samples=3, seed=0,
                                  batch_size=2)
    assert len(records) == 3 and {r["depth"] for r in records} == {""}
    assert all(r["score"] == 0.0 for r in records) and "cwe" not in DEPTH_TASKS
