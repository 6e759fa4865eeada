"""Text documents of a split, from the embedded corpus, a tfds dataset or local files.

`config.data.source` selects: `"stdlib"` (the embedded corpus, built on first use into
`config.data.data_dir`), `"tfds"` (`config.data.tfds_name`, its `text_field`), or `"files"`
(`config.data.path`, a text file or a folder of them).
"""

from __future__ import annotations

import os
import pathlib

import tensorflow_datasets as tfds

from longjax.data import stdlib_corpus

SOURCES = ("stdlib", "tfds", "files", "task")
# A folder with fewer files than this is split inside each file, by lines.
MIN_FILES_FOR_FILE_SPLIT = 20


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def load_documents(data_config, split: str) -> list[str]:
    """The documents of `split` ("train", "validation" or "test") as strings."""
    source = data_config.source
    if source == "stdlib":
        builder = stdlib_corpus.StdlibSource(data_dir=data_config.data_dir or default_data_dir(),
                                             file_format="array_record")
        builder.download_and_prepare()
        return _texts(builder.as_data_source(split=split), "text")
    if source == "tfds":
        split_name = {"train": data_config.train_split}.get(split, data_config.eval_split)
        data = tfds.data_source(data_config.tfds_name, split=split_name,
                                data_dir=data_config.data_dir or None)
        return _texts(data, data_config.text_field)
    if source == "files":
        return _file_documents(data_config.path, split)
    raise ValueError(f"config.data.source={source!r} has no text documents; "
                     f"allowed text sources: {SOURCES[:3]}")


def _texts(data_source, field: str) -> list[str]:
    texts = []
    for i in range(len(data_source)):
        example = data_source[i]
        if field not in example:
            raise ValueError(f"config.data.text_field={field!r} is not a feature of the "
                             f"dataset; its features: {sorted(example)}")
        value = example[field]
        texts.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return texts


def _file_documents(path: str, split: str) -> list[str]:
    root = pathlib.Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"config.data.path={path!r} does not exist; give a text file or a "
                         "folder of text files")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"config.data.path={path!r} is a folder with no files")
    named = [(p.relative_to(root).as_posix() if root.is_dir() else p.name, p) for p in files]
    if len(files) >= MIN_FILES_FOR_FILE_SPLIT:
        return [p.read_text("utf-8", errors="replace") for name, p in named
                if stdlib_corpus.split_of(name) == split]
    return [_line_split(p.read_text("utf-8", errors="replace"), split) for _, p in named]


def _line_split(text: str, split: str) -> str:
    """The split's share of a file's lines: the first 90% train, then 5% validation, 5% test."""
    lines = text.splitlines(keepends=True)
    n = len(lines)
    bounds = {"train": (0, n * 90 // 100), "validation": (n * 90 // 100, n * 95 // 100),
              "test": (n * 95 // 100, n)}
    start, stop = bounds[split]
    return "".join(lines[start:stop])
