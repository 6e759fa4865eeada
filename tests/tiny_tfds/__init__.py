"""A tiny tfds dataset whose text field has another name, as users' datasets may.

(A tfds builder must live in a package: tfds looks for its checksums next to its module.)
"""

import tensorflow_datasets as tfds


class TinyTexts(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"body": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"body": f"document {i} " * (i + 1)}
