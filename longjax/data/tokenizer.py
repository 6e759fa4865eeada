"""Tokenizers: longjax's byte-level one (the default) and a checkpoint's `tokenizer.json`.

The byte tokenizer maps text to its UTF-8 bytes plus BOS, EOS and PAD (`encode`,
`decode`, and the `ByteTokenizer` object around them). `PretrainedTokenizer` reads a
Hugging Face `tokenizer.json` with the `tokenizers` library and takes its special ids
from the checkpoint's configs. Both give `token_bytes()`: the UTF-8 bytes of each id's
text (0 for special ids), so scores can be reported per byte whatever the tokenizer.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re

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


class ByteTokenizer:
    """The byte-level tokenizer as an object (the interface `PretrainedTokenizer` shares)."""

    vocab_size = VOCAB_SIZE
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text, *, add_bos=True, add_eos=True):
        return encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids):
        return decode(ids)

    def token_bytes(self):
        """`[vocab_size]` UTF-8 bytes per id: 1 for a byte, 0 for BOS / EOS / PAD."""
        return (np.arange(VOCAB_SIZE) < 256).astype(np.int32)


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """The printable character GPT-2's byte-level BPE writes for each byte (bytes that
    print as themselves keep their character; the others map to 256, 257, ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class PretrainedTokenizer:
    """A checkpoint's `tokenizer.json` (the `tokenizers` library), with BOS / EOS / PAD ids
    from `config.json`, `generation_config.json` or `tokenizer_config.json` (the first
    that names each; a list of EOS ids gives its first; a missing PAD is EOS, or 0)."""

    def __init__(self, path):
        import tokenizers  # a runtime dependency of checkpoints only

        path = pathlib.Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise ValueError(f"{path} has no tokenizer.json; save the checkpoint's tokenizer "
                             f"with save_pretrained, or use the byte tokenizer")
        self._tokenizer = tokenizers.Tokenizer.from_file(str(file))
        self._spec = json.loads(file.read_text())
        ids = _special_ids(file.parent, self._tokenizer)
        self.bos_id, self.eos_id = ids.get("bos"), ids.get("eos")
        self.pad_id = ids.get("pad", 0 if self.eos_id is None else self.eos_id)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text, *, add_bos=True, add_eos=True):
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if add_eos and self.eos_id is not None else []
        return np.asarray(head + ids + tail, np.int32)

    def decode(self, ids):
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                      skip_special_tokens=True)

    def token_bytes(self):
        """`[vocab_size]` UTF-8 bytes of each id's text: byte-level BPE characters map
        back to one byte each, SentencePiece's `<0xNN>` is one byte and its `▁` a space;
        added / special tokens count 0."""
        byte_level = "ByteLevel" in json.dumps(self._spec.get("decoder"))
        chars = _byte_level_chars()
        special = {t["id"] for t in self._spec.get("added_tokens", []) if t.get("special")}
        counts = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            token = self._tokenizer.id_to_token(i)
            if token is None or i in special:
                continue
            if byte_level:
                counts[i] = sum(1 if c in chars else len(c.encode()) for c in token)
            elif _BYTE_FALLBACK.fullmatch(token):
                counts[i] = 1
            else:
                counts[i] = len(token.replace("▁", " ").encode())
        return counts


def _special_ids(directory: pathlib.Path, tok) -> dict[str, int]:
    ids = {}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        path = directory / name
        fields = json.loads(path.read_text()) if path.exists() else {}
        for kind in ("bos", "eos", "pad"):
            value = fields.get(f"{kind}_token_id")
            if value is None and isinstance(fields.get(f"{kind}_token"), str):
                value = tok.token_to_id(fields[f"{kind}_token"])
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                ids.setdefault(kind, int(value))
    return ids


def load(path=None):
    """The tokenizer of a checkpoint directory (`tokenizer.json`), or the byte tokenizer
    when `path` is None or "" (`config.data.tokenizer`'s default)."""
    return PretrainedTokenizer(path) if path else ByteTokenizer()
