"""Contiguous batch slots: row k+1 of every batch slot continues row k of that slot.

The data mode of state passing in training (`config.data.packing="contiguous"`, used with
`config.train.initial_state="carry"`): the train documents, in their seeded order, are
concatenated into one token stream cut into `batch_size` equal slots, and batch k holds
the k-th window of `seq_len + 1` tokens of each slot (neighbouring windows share one
token: the last target of a row is the first input of the next). A recurrent layer that
starts row k+1 from its final state of row k therefore reads each slot as one long
sequence (truncated backpropagation through time, as Transformer-XL's segments and the
"batchify" of RNN language models).

Segment ids number the documents over the whole stream (not from 1 in each row), so the
last token of row k and the first of row k+1 carry the same id exactly when they belong
to the same document, and a carried state is reset at a new document (`cache["segment"]`
in the mixers). After a slot's last full window the slot starts over; the ids of every
other pass are offset by the number of documents, so no state crosses the wrap.
Positions as `config.data.positions` says (`longjax.data.packing.rows_to_batch`).
"""

from __future__ import annotations

import numpy as np

from longjax.data import packing


class ContiguousDataset:
    """`batch(step, batch_size, rows)`: window `step` of each of `num_slots` slots."""

    def __init__(self, token_docs: list[np.ndarray], *, seq_len: int, num_slots: int,
                 positions: str = "row"):
        lengths = np.array([len(d) for d in token_docs], np.int64)
        slot_length = int(lengths.sum()) // num_slots
        self.windows = (slot_length - 1) // seq_len  # full windows of seq_len + 1 per slot
        if self.windows < 1:
            raise ValueError(
                f"config.data.packing='contiguous' cuts the {int(lengths.sum())} train tokens "
                f"into config.data.batch_size={num_slots} slots of {slot_length}, fewer than "
                f"config.data.seq_len + 1 = {seq_len + 1}; use fewer slots or shorter rows")
        used = num_slots * slot_length
        starts = np.cumsum(lengths) - lengths
        doc = np.repeat(np.arange(len(token_docs)), lengths)[:used]
        self.num_docs = len(token_docs)
        self.slots = {
            "tokens": np.concatenate(token_docs)[:used].astype(np.int32),
            "document": doc.astype(np.int64),
            "positions": (np.arange(used) - starts[doc]).astype(np.int32),
        }
        self.slots = {k: v.reshape(num_slots, slot_length) for k, v in self.slots.items()}
        self.num_slots, self.seq_len, self.positions = num_slots, seq_len, positions
        self.stats = {"documents": float(len(token_docs)), "slots": float(num_slots),
                      "windows_per_slot": float(self.windows)}

    def batch(self, step: int, batch_size: int,
              rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Window `step` (modulo the windows per slot) of the slots `rows` (default all)."""
        if batch_size != self.num_slots:
            raise ValueError(f"contiguous batches have {self.num_slots} slots "
                             f"(config.data.batch_size); asked for {batch_size}")
        slots = np.arange(batch_size) if rows is None else np.asarray(rows)
        passes, window = divmod(step, self.windows)
        cut = slice(window * self.seq_len, window * self.seq_len + self.seq_len + 1)
        ids = self.slots["document"][slots, cut] + 1 + (passes % 2) * self.num_docs
        return packing.rows_to_batch({"tokens": self.slots["tokens"][slots, cut],
                                      "segment_ids": ids.astype(np.int32),
                                      "positions": self.slots["positions"][slots, cut]},
                                     positions=self.positions)
