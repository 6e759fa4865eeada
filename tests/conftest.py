"""Test setup: the CPU backend with 8 simulated devices, set before JAX starts.

The suite is bound by XLA compile time (hundreds of small programs), so XLA's CPU
backend skips its LLVM optimisation passes and fusion emitters here (FAST_COMPILE): the
programs compute the same math, compile several times faster and run slower, which the
tests' small shapes do not feel. Subprocesses the tests start inherit it.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ("d_model=32,num_layers=2,seq_len=32,batch_size=8,steps=6,"
        "model.num_heads=2,model.num_kv_heads=1,model.mlp_dim=64,train.warmup_steps=1,"
        "train.log_every=2,train.progress_bar=False,eval.every_steps=3,eval.batch_size=8,"
        "eval.num_batches=2,checkpoint.every_steps=3")


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory) -> pathlib.Path:
    """30 local text documents (standard-library modules), fast to pack."""
    from longjax.data.stdlib_corpus import stdlib_files

    folder = tmp_path_factory.mktemp("texts")
    for name, path in stdlib_files()[:30]:
        (folder / name.replace("/", "_")).write_text(path.read_text())
    return folder


@pytest.fixture
def tiny_config(text_folder):
    """A tiny LM config on `text_folder`, a few steps long; `tiny_config(**dotted)` edits it."""
    from longjax.train.cli import load_config_file
    from longjax.train.config import apply_overrides

    def make(**overrides):
        config = load_config_file(f"{REPO}/configs/quickstart.py:{TINY}")
        config.data.source, config.data.path = "files", str(text_folder)
        return apply_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})

    return make
