"""Train a model from an ml_collections config; resumes from the workdir's checkpoint.

    python scripts/train.py --config=configs/quickstart.py --workdir=workdirs/quickstart \
        [--config.train.steps=200] [--config=configs/quickstart.py:mixer=attention]

Multi-host: run the same command in every process. Under SLURM (`srun`), Open MPI, on
a TPU pod or in a Kubernetes indexed Job the processes find each other by themselves;
elsewhere add `--coordinator_address=host0:1234 --num_processes=N --process_id=i`. The
workdir must be one folder all hosts share (NFS, a bucket mounted by gcsfuse); process
0 writes the outputs.

Fine-tune a Hugging Face checkpoint (its model, weights and tokenizer; longjax.hf), e.g.
at 4x its context with a larger RoPE base (ABF):

    python scripts/train.py --config=configs/quickstart.py --workdir=workdirs/llama_abf \
        --config.init.hf=path/to/Llama-3.2-1B --config.data.seq_len=8192 \
        --config.init.model_overrides=mixer_options.attention.rope_base=2000000.0
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from longjax import distributed
from longjax.train import train_and_evaluate
from longjax.train.cli import check_config_overrides

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def _hide_library_info(record) -> bool:
    """Keeps absl INFO lines of longjax; libraries (Orbax, ...) show warnings and up."""
    return record.levelno >= 30 or "/longjax/" in record.pathname.replace("\\", "/")


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_hide_library_info)
    try:
        distributed.join_from_flags()
    except ValueError as e:
        sys.exit(f"error: {e}")
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() > 0:
        return
    for name, metrics in results.items():
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{name}: {summary}")
    print(f"checkpoints, metrics.jsonl, tensorboard/ and loss_curve.png are in {_WORKDIR.value}")
    logging.flush()


if __name__ == "__main__":
    check_config_overrides(sys.argv)
    app.run(main)
