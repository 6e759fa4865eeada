"""Batches for training and evaluation, deterministic in (seed, step) so runs resume exactly.

Text sources are tokenized and packed once (`PackedDataset`); synthetic tasks are
generated per step (`TaskDataset`). Both hand out `batch(step)` dicts of numpy arrays
`tokens, targets, weights, segment_ids, positions`, each `[batch, seq_len]`.
"""

from __future__ import annotations

import functools

import numpy as np

from longjax.data import packing, sources, tokenizer


class PackedDataset:
    """The packed rows of one split of a text source."""

    def __init__(self, rows: dict[str, np.ndarray], *, seed: int, shuffle: bool):
        self.rows = rows
        self.seed = seed
        self.shuffle = shuffle

    @classmethod
    def from_config(cls, data_config, split: str, *, seed: int, seq_len: int | None = None):
        docs = sources.load_documents(data_config, split)
        if not docs:
            raise ValueError(f"config.data: the {split!r} split of source "
                             f"{data_config.source!r} has no documents")
        token_docs = [tokenizer.encode(text) for text in docs]
        shuffle = split == "train"
        if shuffle:  # mix documents across rows; rows are reshuffled every epoch below
            order = np.random.default_rng(seed).permutation(len(token_docs))
            token_docs = [token_docs[i] for i in order]
        rows = packing.pack_documents(token_docs, (seq_len or data_config.seq_len) + 1)
        return cls(rows, seed=seed, shuffle=shuffle)

    @property
    def num_rows(self) -> int:
        return len(self.rows["tokens"])

    @property
    def num_bytes(self) -> int:
        return int((self.rows["tokens"] < 256).sum())

    @functools.lru_cache(maxsize=2)  # noqa: B019  (the dataset lives as long as the run)
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_rows)

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Batch number `step`: rows `step * batch_size ...`.

        Shuffled (train): the order is reshuffled every epoch and batches run on forever.
        Unshuffled (evaluation): rows in order; rows past the end get weight 0.
        """
        index = step * batch_size + np.arange(batch_size)
        if self.shuffle:
            epochs, offsets = np.divmod(index, self.num_rows)
            picks = np.array([self._epoch_order(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])
        else:
            picks = np.minimum(index, self.num_rows - 1)
        batch = packing.rows_to_batch({k: v[picks] for k, v in self.rows.items()})
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

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        return self._tasks.task_batch(self.name, seed=self.seed, step=step,
                                      batch_size=batch_size, seq_len=self.seq_len,
                                      **self.options)


def make_dataset(config, split: str, *, seq_len: int | None = None):
    """The dataset of `split` for `config.data` (eval splits use a different task seed)."""
    d = config.data
    seq_len = seq_len or d.seq_len
    if d.source == "task":
        seed = config.seed if split == "train" else config.seed + 1_000_003
        return TaskDataset(d.task, d.task_options.to_dict(), seed=seed, seq_len=seq_len)
    return PackedDataset.from_config(d, split, seed=config.seed, seq_len=seq_len)
