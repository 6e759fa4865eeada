"""The tools on an imported checkpoint: its tokenizer.json, scripts/generate.py --hf,
the length-extrapolation harness (--hf), scripts/convert.py both ways, and fine-tuning
from config.init.hf. One tiny random Llama with a byte-level BPE tokenizer, made here."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import make_hf_model, make_llama_with_tokenizer, make_tokenizer  # noqa: E402

from longjax import hf  # noqa: E402
from longjax.data import tokenizer  # noqa: E402
from longjax.eval.extrapolation import evaluate_hf  # noqa: E402
from longjax.generate import load_model  # noqa: E402
from longjax.hf import workdir as workdir_lib  # noqa: E402
from longjax.train import train_and_evaluate  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *flags):
    """`python scripts/<script>.py *flags` in a fresh process (scripts define absl flags,
    which one process can hold only once); its stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, str(REPO / f"scripts/{script}.py"), *flags],
                         capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_tok")
    return make_llama_with_tokenizer(directory), directory


def test_tokenizer_json_round_trips_and_counts_bytes(llama):
    _, directory = llama
    tok = tokenizer.load(directory)
    text = "The pass key is 4071. héllo\n  def main():"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 0 and ids[-1] == tok.eos_id == 1
    assert tok.decode(ids) == text
    assert tok.token_bytes()[ids].sum() == len(text.encode())
    assert tokenizer.load().decode(tokenizer.load().encode(text)) == text  # bytes: default


def test_generate_script_with_hf_matches_transformers(llama):
    hf_model, directory = llama
    prompt = "The grass is"
    out = _run("generate", f"--hf={directory}", f"--prompt={prompt}", "--max_new_tokens=12",
               "--temperature=0", "--dtype=float32")
    tok = tokenizer.load(directory)
    ids = torch.tensor(tok.encode(prompt, add_eos=False)[None], dtype=torch.long)
    with torch.no_grad():
        theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                   do_sample=False, eos_token_id=1, pad_token_id=1)
    assert out.rstrip("\n") == prompt + tok.decode(theirs[0, ids.shape[1]:].numpy())


def test_evaluate_lengths_on_an_hf_checkpoint(llama, text_folder):
    """Perplexity per token and bits per byte in the checkpoint's tokens, passkey in its
    tokens, and the training-free methods; positions it cannot take are refused."""
    _, directory = llama
    results = evaluate_hf(directory, train_length=64, data_path=text_folder,
                          lengths=[64, 128], methods=["none", "yarn:auto", "streaming"],
                          num_tokens=256, stride=0, passkey_depths=[0.5], passkey_samples=2,
                          batch_size=2)
    bpb = results.table("nonoverlapping", "bits_per_byte")
    ppl = results.table("nonoverlapping", "perplexity")
    assert set(bpb) == {"none", "yarn:auto", "streaming"}
    # Random weights over ~300 tokens: about ln(300) nats a token; a scored token holds one
    # byte or more (none is special), so fewer bits per byte than per token.
    assert 100 < ppl["none"][64] < 1000
    assert 0.5 < bpb["none"][64] < np.log2(ppl["none"][64])
    assert set(results.table("passkey", "accuracy")["none"]) == {128}
    assert ppl["none"][64] == pytest.approx(ppl["yarn:auto"][64])  # yarn:auto is 1x at L


def test_kv_cache_policies_on_an_hf_checkpoint(llama):
    """RULER prompts in the checkpoint's own tokens, generated through a KV-cache policy:
    a budget that holds the context generates what full attention does, a small one
    does not (the command of docs/results/kv_cache.md for pretrained checkpoints)."""
    _, directory = llama
    results = evaluate_hf(directory, train_length=64, lengths=[128],
                          methods=["none", "cache:snapkv:128", "cache:snapkv:32"], num_tokens=1,
                          stride=0, passkey_samples=0, ruler_tasks=["niah_single"],
                          ruler_samples=1, ruler_depths=[0.5], ruler_options={"haystack": "noise"},
                          batch_size=1)
    generations = {}
    for record in results.ruler_samples:
        generations.setdefault(record["method"], []).append(record["generation"])
    assert all(len(g) == 1 and all(g) for g in generations.values())
    assert generations["cache:snapkv:128"] == generations["none"]
    assert generations["cache:snapkv:32"] != generations["none"]


def test_methods_refused_for_a_model_without_attention(tmp_path, text_folder):
    make_hf_model("mamba", tmp_path)
    make_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no attention layer"):
        evaluate_hf(tmp_path, train_length=32, data_path=text_folder, lengths=[32],
                    methods=["yarn:2"], num_tokens=32)


def test_convert_round_trip(llama, tmp_path):
    """HF -> workdir -> HF keeps the weights, the tokenizer and the token ids; the workdir
    is one the longjax tools read."""
    hf_model, directory = llama
    workdir, out = tmp_path / "work", tmp_path / "out"
    assert f"wrote {workdir}" in _run("convert", f"--hf={directory}", f"--workdir={workdir}")
    workdir_lib.to_hf(workdir, out)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.eos_token_id == 1 and (out / "tokenizer.json").exists()
    ids = torch.tensor(np.arange(2, 15)[None])
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), hf_model(ids).logits.numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_converting_into_a_used_workdir_is_refused(llama, tmp_path):
    _, directory = llama
    workdir_lib.to_workdir(directory, tmp_path)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        workdir_lib.to_workdir(directory, tmp_path)


def test_fine_tuning_starts_from_the_hf_checkpoint(llama, tiny_config, tmp_path):
    """config.init.hf: the model, its weights and its tokenizer; the first loss is the
    checkpoint's loss on the data, not a random model's."""
    _, directory = llama
    config = tiny_config(**{"train.steps": 2, "train.warmup_steps": 0, "init.hf": str(directory),
                            "data.seq_len": 32})
    train_and_evaluate(config, tmp_path)
    model, params, _ = load_model(tmp_path)
    ref_model, ref_params = hf.load(directory, dtype="float32")
    assert model.model.vocab_size == ref_model.model.vocab_size
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(params["params"]), jax.tree.leaves(ref_params), strict=True)]
    assert 0 < max(moved) < 0.1  # trained two small steps from the checkpoint
