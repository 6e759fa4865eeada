"""Byte-level tokenizer: the 256 byte values plus BOS, EOS and PAD."""

from __future__ import annotations

import numpy as np

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 ids, framed by BOS / EOS."""
    ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    parts = [np.array([BOS], np.int32)] if add_bos else []
    parts.append(ids)
    if add_eos:
        parts.append(np.array([EOS], np.int32))
    return np.concatenate(parts)


def decode(ids) -> str:
    """Text of the byte ids in `ids`; special ids are dropped, bad UTF-8 is replaced."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")
