"""Batches for training and evaluation, deterministic in (seed, step) so runs resume exactly.

Text sources are tokenized and packed once (`PackedDataset`, or for training with
`packing="contiguous"` cut into batch slots that continue from step to step,
`longjax.data.contiguous`); synthetic tasks are generated per step (`TaskDataset`), and
so are RULER-style prompts with their answers (`RulerDataset`), which `RulerMixDataset`
mixes into a text source's training batches (`config.data.ruler_tasks`). All hand out
`batch(step)` dicts of numpy arrays `tokens, targets, weights, segment_ids, positions`,
each `[batch, seq_len]`.
Training reads a stream (`make_train_stream`): `next()` batches and a JSON `state()`
that `restore` resumes from; dataset decomposition's stream draws one length bucket per
step (`longjax.data.decomposition`).

Multi-host: each process reads only the rows of a global batch that its devices hold
(`rows`, from `longjax.train.step.process_rows`); the packed text is indexed per row, so
the other rows are never gathered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from longjax.data import best_fit, contiguous, decomposition, packing, sources, tokenizer
from longjax.data.tasks import ruler_rows

POSE_STREAM = 7  # the random stream of PoSE's positions, apart from the shuffles
EVAL_SEED = 1_000_003  # added to config.seed for the evaluation splits of generated data


def load_token_docs(data_config, split: str, *, seed: int, tok=None) -> list[np.ndarray]:
    """The split's documents as token arrays, BOS / EOS framed, in the tokens of `tok`
    (default: `data_config.tokenizer`'s tokenizer.json, or bytes when it is ""); the train
    split in an order shuffled by `seed` (so concat-and-chunk mixes documents across
    rows)."""
    docs = sources.load_documents(data_config, split)
    if not docs:
        raise ValueError(f"config.data: the {split!r} split of source "
                         f"{data_config.source!r} has no documents")
    tok = tok or tokenizer.load(data_config.get("tokenizer"))
    token_docs = [tok.encode(text) for text in docs]
    if split == "train":
        order = np.random.default_rng(seed).permutation(len(token_docs))
        token_docs = [token_docs[i] for i in order]
    return token_docs


class PackedDataset:
    """The packed rows of one split of a text source (`stats`: see
    `longjax.data.best_fit.packing_stats`)."""

    stats: dict[str, float] = {}

    def __init__(self, rows: dict[str, np.ndarray], *, seed: int, shuffle: bool,
                 positions: str = "row", pose_length: int = 0):
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle
        self.positions = positions  # "row" | "document" (longjax.data.packing)
        self.pose_length = pose_length  # > 0: PoSE positions over this length

    @classmethod
    def from_config(cls, data_config, split: str, *, seed: int, seq_len: int | None = None):
        """The split packed into rows of `seq_len + 1` tokens: by `data_config.packing`
        ("concat" or "best_fit") for the train split, concat-and-chunk for the others
        (so every training recipe is evaluated on the same rows), with the positions of
        `data_config.positions`; PoSE (`data_config.pose_length`) for the train split."""
        token_docs = load_token_docs(data_config, split, seed=seed)
        row_length = (seq_len or data_config.seq_len) + 1
        method = data_config.packing if split == "train" else "concat"
        if method == "best_fit":
            rows = best_fit.pack_best_fit(token_docs, row_length)
        else:
            rows = packing.pack_documents(token_docs, row_length)
        train = split == "train"
        dataset = cls(rows, seed=seed, shuffle=train, positions=data_config.positions,
                      pose_length=data_config.pose_length if train else 0)
        dataset.stats = best_fit.packing_stats([len(d) for d in token_docs], row_length, method)
        return dataset

    @property
    def seq_len(self) -> int:
        return self.rows["tokens"].shape[1] - 1

    @property
    def num_rows(self) -> int:
        return len(self.rows["tokens"])

    @property
    def num_bytes(self) -> int:
        return int((self.rows["tokens"] < 256).sum())

    @functools.lru_cache(maxsize=2)  # noqa: B019  (the dataset lives as long as the run)
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_rows)

    def batch(self, step: int, batch_size: int,
              rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Batch number `step`: rows `step * batch_size ...` (only `rows` of them, indices
        in [0, batch_size), when given).

        Shuffled (train): the order is reshuffled every epoch and batches run on forever.
        Unshuffled (evaluation): rows in order; rows past the end get weight 0.
        With PoSE, the positions are drawn from (seed, step).
        """
        index = step * batch_size + (np.arange(batch_size) if rows is None else rows)
        if self.shuffle:
            epochs, offsets = np.divmod(index, self.num_rows)
            picks = np.array([self._epoch_order(int(e))[o]
                              for e, o in zip(epochs, offsets, strict=True)])
        else:
            picks = np.minimum(index, self.num_rows - 1)
        batch = packing.rows_to_batch({k: v[picks] for k, v in self.rows.items()},
                                      positions=self.positions)
        if self.pose_length:
            rng = np.random.default_rng((self.seed, step, POSE_STREAM))
            batch["positions"] = packing.pose_positions(batch["positions"], self.pose_length,
                                                        rng)
        if not self.shuffle:
            batch["weights"] = batch["weights"] * (index < self.num_rows)[:, None]
        return batch

    def num_batches(self, batch_size: int) -> int:
        """Batches that cover the split once."""
        return -(-self.num_rows // batch_size)


class TaskDataset:
    """A synthetic task (`longjax.data.tasks`) generated per step at a fixed length."""

    def __init__(self, name: str, options: dict, *, seed: int, seq_len: int):
        from longjax.data import tasks  # the synthetic-task registry

        self._tasks = tasks
        self.name, self.options, self.seed, self.seq_len = name, dict(options), seed, seq_len

    def batch(self, step: int, batch_size: int,
              rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Batch number `step` (only `rows` of it when given: a task draws its rows
        together, so the whole batch is generated and sliced)."""
        batch = self._tasks.task_batch(self.name, seed=self.seed, step=step,
                                       batch_size=batch_size, seq_len=self.seq_len,
                                       **self.options)
        return batch if rows is None else {k: v[rows] for k, v in batch.items()}


class RulerDataset:
    """RULER-style prompts followed by their answers (`longjax.data.tasks.ruler_rows`),
    generated per step: row r of batch `step` is sample `step * batch_size + r`, of those
    `tasks` that fit `seq_len` (so a length curriculum can start below the longer
    tasks' prompts); ValueError when none fits. With `min_length` the rows hold prompts
    and answers of `min_length` to `seq_len` tokens (`ruler_rows.ruler_batch`), of the
    tasks that fit `min_length`."""

    def __init__(self, tasks, *, seed: int, seq_len: int, answer_weight: float = 1.0,
                 tok=None, options=None, min_length: int | None = None):
        self.options = dict(options or {})
        shortest = seq_len if min_length is None else min_length
        self.tasks = ruler_rows.fitting_tasks(tasks, shortest, tok, self.options)
        if not self.tasks:
            raise ValueError(f"none of the RULER tasks {tuple(tasks)} fits rows of "
                             f"{shortest} tokens with its answer")
        self.seed, self.seq_len, self.answer_weight, self.tok = seed, seq_len, answer_weight, tok
        self.min_length = min_length

    def batch(self, step: int, batch_size: int,
              rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        rows = np.arange(batch_size) if rows is None else np.asarray(rows)
        return ruler_rows.ruler_batch(self.tasks, seed=self.seed,
                                      indices=step * batch_size + rows, seq_len=self.seq_len,
                                      tok=self.tok, answer_weight=self.answer_weight,
                                      options=self.options, min_length=self.min_length)


def ruler_rows_per_batch(fraction: float, batch_size: int) -> int:
    """RULER rows in a batch of `batch_size`: `fraction` of it rounded, at least one."""
    return min(batch_size, max(1, round(fraction * batch_size)))


class RulerMixDataset:
    """Batches whose first `ruler_rows_per_batch(fraction, batch_size)` rows are a
    `RulerDataset`'s rows of the step and the rest the text dataset's batch of the step
    (of the remaining size)."""

    def __init__(self, ruler: RulerDataset, text, fraction: float):
        self.ruler, self.text, self.fraction = ruler, text, fraction
        self.stats = getattr(text, "stats", {})

    def batch(self, step: int, batch_size: int,
              rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        rows = np.arange(batch_size) if rows is None else np.asarray(rows)
        k = ruler_rows_per_batch(self.fraction, batch_size)
        parts = []
        if (rows < k).any():
            parts.append(self.ruler.batch(step, k, rows[rows < k]))
        if (rows >= k).any():
            parts.append(self.text.batch(step, batch_size - k, rows[rows >= k] - k))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def ruler_dataset(config, split: str, *, seq_len: int | None = None) -> RulerDataset:
    """`config.data.ruler_tasks` as rows of `seq_len` (default `data.seq_len`); the eval
    splits use a different seed, weight 1 on the answers and full-length rows."""
    d = config.data
    train = split == "train"
    tok = tokenizer.load(d.get("tokenizer"))
    seq_len = seq_len or d.seq_len
    return RulerDataset(d.ruler_tasks, seed=config.seed if train else config.seed + EVAL_SEED,
                        seq_len=seq_len, tok=tok,
                        answer_weight=d.ruler_answer_weight if train else 1.0,
                        options=d.ruler_options.to_dict(),
                        min_length=(ruler_rows.shortest_row(d.ruler_min_length, seq_len)
                                    if train else None))


def make_dataset(config, split: str, *, seq_len: int | None = None):
    """The dataset of `split` for `config.data` (eval splits use a different task seed);
    the train split of a text source mixes in `config.data.ruler_tasks` when given."""
    d = config.data
    seq_len = seq_len or d.seq_len
    if d.source == "task":
        seed = config.seed if split == "train" else config.seed + EVAL_SEED
        return TaskDataset(d.task, d.task_options.to_dict(), seed=seed, seq_len=seq_len)
    if split == "train" and d.packing == "contiguous":
        return contiguous.ContiguousDataset(load_token_docs(d, split, seed=config.seed),
                                            seq_len=seq_len, num_slots=d.batch_size,
                                            positions=d.positions)
    text = PackedDataset.from_config(d, split, seed=config.seed, seq_len=seq_len)
    if split == "train" and d.ruler_tasks:
        return RulerMixDataset(ruler_dataset(config, split, seq_len=seq_len), text,
                               d.ruler_fraction)
    return text


RowSelector = Callable[[int], np.ndarray]  # global batch size -> rows this process reads


class PackedStream:
    """Batches `index, index + 1, ...` of a `PackedDataset` or `TaskDataset` (the rows
    `rows(batch_size)` of each, when given)."""

    def __init__(self, dataset, batch_size: int, index: int = 0, rows: RowSelector | None = None):
        self.dataset, self.batch_size, self.index = dataset, batch_size, index
        self.rows = rows
        self.stats = getattr(dataset, "stats", {})

    def next(self) -> dict[str, np.ndarray]:
        rows = None if self.rows is None else self.rows(self.batch_size)
        batch = self.dataset.batch(self.index, self.batch_size, rows)
        self.index += 1
        return batch

    def state(self) -> dict:
        return {"index": self.index}

    def restore(self, state: dict) -> None:
        self.index = int(state["index"])


class DecomposedStream:
    """Dataset decomposition: each step one bucket's batch, drawn by the curriculum (the
    rows `rows(batch_size)` of it, when given); `batch_size` is the global rows of the
    latest batch."""

    batch_size = 0

    def __init__(self, dataset: decomposition.DecomposedDataset,
                 sampler: decomposition.CurriculumSampler, rows: RowSelector | None = None,
                 positions: str = "row"):
        self.dataset, self.sampler, self.rows = dataset, sampler, rows
        self.positions = positions
        self.stats = dataset.stats()

    def next(self) -> dict[str, np.ndarray]:
        length, picks = self.sampler.next()
        self.batch_size = len(picks)
        if self.rows is not None:
            picks = picks[self.rows(len(picks))]
        return packing.rows_to_batch(self.dataset.rows(length, picks),
                                     positions=self.positions)

    def state(self) -> dict:
        return self.sampler.state()

    def restore(self, state: dict) -> None:
        self.sampler.restore(state)


def make_train_stream(config, *, index: int = 0, rows: RowSelector | None = None):
    """The training stream of `config.data` (its `packing`), at batch `index`, reading the
    rows `rows(batch_size)` of each batch (default: all); a decomposition stream starts at
    its beginning (resume it with `restore`)."""
    d = config.data
    if d.packing != "decomposition":
        return PackedStream(make_dataset(config, "train"), d.batch_size, index, rows)
    dataset = decomposition.DecomposedDataset(load_token_docs(d, "train", seed=config.seed),
                                              d.bucket_lengths)
    odds = decomposition.curriculum_odds(d.curriculum, d.bucket_lengths)
    sampler = decomposition.CurriculumSampler(
        {n: dataset.num_rows(n) for n in dataset.bucket_lengths}, odds,
        tokens_per_step=d.batch_size * d.seq_len,
        cycle_steps=-(-config.train.steps // d.curriculum_cycles), seed=config.seed)
    return DecomposedStream(dataset, sampler, rows, d.positions)
