"""A Hugging Face checkpoint directory <-> a longjax training workdir.

`to_workdir(hf_dir, workdir)` writes the workdir `scripts/generate.py`,
`scripts/evaluate_lengths.py` and `scripts/train.py` resume from: `config.json` (the
checkpoint's model, its tokenizer as `config.data.tokenizer`, its training length as
`config.data.seq_len`), an Orbax checkpoint at step 0 (the parameters and a fresh
optimizer state) and `hf/` (a copy of config.json and the tokenizer files, for the way
back). `to_hf(workdir, hf_dir)` writes the latest checkpoint of a workdir as a directory
`transformers` loads, with those files.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import ml_collections

from longjax.hf.checkpoint import load, read_config, save
from longjax.train.checkpoint import Checkpointer
from longjax.train.config import base_config
from longjax.train.optimizer import make_optimizer
from longjax.train.state import TrainState

# Files of a checkpoint directory that travel with it besides the weights.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


def to_workdir(hf_dir, workdir, *, seq_len=None) -> pathlib.Path:
    """Converts the checkpoint `hf_dir` into the longjax workdir `workdir` (see the module
    doc); `seq_len` defaults to config.json's max_position_embeddings (else 2048)."""
    hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
    if (workdir / "checkpoints").exists():
        raise ValueError(f"--workdir {workdir} already holds checkpoints; give a new one")
    hf_config = read_config(hf_dir)
    model, params = load(hf_dir, dtype="float32")
    config = base_config()
    config.model = ml_collections.ConfigDict(model.model.to_dict())
    config.data.seq_len = int(seq_len or hf_config.get("max_position_embeddings") or 2048)
    copied = workdir / "hf"
    copied.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, copied / name)
    if (copied / "tokenizer.json").exists():
        config.data.tokenizer = str(copied.absolute())
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=make_optimizer(config.train).init(params))
    checkpointer = Checkpointer(workdir, config)
    checkpointer.write_config()
    checkpointer.save(0, state, {"batches_consumed": 0})
    checkpointer.wait()
    return workdir


def to_hf(workdir, hf_dir, *, dtype=None) -> pathlib.Path:
    """Writes the latest checkpoint of `workdir` to `hf_dir` (weights cast to `dtype` if
    given), with the side files of `workdir/hf` when it has them (their config.json
    fields such as token ids kept, the model fields written anew)."""
    from longjax.generate import load_model  # longjax.generate imports the train state

    workdir, hf_dir = pathlib.Path(workdir), pathlib.Path(hf_dir)
    model, params, _ = load_model(workdir)
    copied = workdir / "hf"
    fields = {}
    if (copied / "config.json").exists():  # token ids and the position limit travel
        fields = {k: v for k, v in json.loads((copied / "config.json").read_text()).items()
                  if k.endswith("_token_id") or k == "max_position_embeddings"}
    save(hf_dir, model, params["params"], hf_fields=fields, dtype=dtype)
    for name in SIDE_FILES[1:]:
        if (copied / name).exists():
            shutil.copy(copied / name, hf_dir / name)
    return hf_dir
