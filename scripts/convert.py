"""Convert between a Hugging Face checkpoint directory and a longjax training workdir.

    python scripts/convert.py --hf=path/to/Llama-3.2-1B --workdir=workdirs/llama
    python scripts/convert.py --workdir=workdirs/llama --to_hf=out/llama-finetuned

The first writes config.json, an Orbax checkpoint at step 0 and hf/ (config.json and
tokenizer files) into --workdir, so scripts/train.py continues training it and
scripts/generate.py / evaluate_lengths.py read it; the second writes the workdir's latest
checkpoint as config.json + model.safetensors (+ the tokenizer files) that transformers'
from_pretrained loads.
"""

import sys

from absl import app, flags

from longjax.hf import workdir as workdir_lib

_HF = flags.DEFINE_string("hf", None, "Hugging Face checkpoint directory to read.")
_WORKDIR = flags.DEFINE_string("workdir", None, "longjax workdir (written with --hf, read "
                               "with --to_hf).")
_TO_HF = flags.DEFINE_string("to_hf", None, "Hugging Face directory to write from --workdir.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "config.data.seq_len of the new workdir "
                                "(default: max_position_embeddings).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "dtype of the written weights (default: as trained).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    try:
        if (_HF.value is None) == (_TO_HF.value is None):
            raise ValueError("give exactly one of --hf (HF -> workdir) and --to_hf "
                             "(workdir -> HF)")
        if _HF.value is not None:
            path = workdir_lib.to_workdir(_HF.value, _WORKDIR.value, seq_len=_SEQ_LEN.value)
        else:
            path = workdir_lib.to_hf(_WORKDIR.value, _TO_HF.value, dtype=_DTYPE.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
