"""The embedded corpus: the running interpreter's standard-library Python source.

A tfds builder stored as array_record and read with `tfds.data_source` (no TensorFlow).
One example per file: `{"path": relative path, "text": source}`. Third-party packages
(site-packages) and the test suites (which distributions ship or strip) are left out, so
the corpus is the same on every machine with the same Python version. The split is by a
hash of the file's path: about 90% train, 5% validation, 5% test.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import sysconfig

import tensorflow_datasets as tfds

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
SPLIT_PERCENT = {"validation": range(0, 5), "test": range(5, 10), "train": range(10, 100)}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """Deterministic split of a file by the SHA-1 of its relative path."""
    bucket = int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % 100
    return next(name for name, percents in SPLIT_PERCENT.items() if bucket in percents)


def stdlib_files(root: pathlib.Path | None = None) -> list[tuple[str, pathlib.Path]]:
    """Sorted `(relative path, path)` of the standard library's `.py` files."""
    root = root or stdlib_root()
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in EXCLUDED_DIRS]  # not walked
        for name in names:
            if name.endswith(".py"):
                path = pathlib.Path(folder, name)
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


class StdlibSource(tfds.core.GeneratorBasedBuilder):
    """Standard-library source of the running Python, one config per Python version."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name=f"py{sys.version_info.major}_{sys.version_info.minor}",
            description="Standard-library .py files of this Python version.",
        )
    ]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"path": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded: the source is on this machine.
        files = stdlib_files()
        return {
            split: self._generate_examples([f for f in files if split_of(f[0]) == split])
            for split in SPLIT_PERCENT
        }

    def _generate_examples(self, files):
        for relative, path in files:
            yield relative, {"path": relative,
                             "text": path.read_text(encoding="utf-8", errors="replace")}
