"""longjax.hf against transformers: tiny random models of every family, made here (no
download), saved as safetensors, loaded by longjax.hf.load; fp32 logits, left-padded
batches, greedy generation through longjax's caches, and save -> transformers load."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import ATTENTION, FAMILIES, VOCAB, make_hf_model  # noqa: E402

from longjax import hf  # noqa: E402
from longjax.generate import generate  # noqa: E402
from longjax.hf import weights  # noqa: E402
from longjax.nn import DecoderLM  # noqa: E402
from longjax.train.config import base_config  # noqa: E402


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(request.param, directory)
    model, params = hf.load(directory, dtype="float32")
    return request.param, hf_model, directory, model, params


def hf_logits(hf_model, tokens, mask=None):
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    kwargs = {}
    if mask is not None:
        mask = torch.tensor(np.asarray(mask), dtype=torch.long)
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return hf_model(ids, **kwargs).logits.float().numpy()


def rel_error(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_logits_match_transformers_on_odd_lengths(family):
    name, hf_model, _, model, params = family
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 13))
    for length in (13, 7):
        ours, _ = model.apply({"params": params}, jnp.asarray(tokens[:, :length]))
        assert rel_error(ours, hf_logits(hf_model, tokens[:, :length])) <= 1e-4, name


def test_left_padded_batch_matches_transformers(family):
    """attention_mask -> segment ids (0 = padding) and positions restarting at each row's
    first real token."""
    name, hf_model, _, model, params = family
    tokens = np.random.default_rng(2).integers(1, VOCAB, (2, 11))
    mask = np.ones_like(tokens)
    mask[0, :4] = 0
    tokens[0, :4] = 0
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    ours, _ = model.apply({"params": params}, jnp.asarray(tokens),
                          segment_ids=jnp.asarray(mask), positions=jnp.asarray(positions))
    theirs = hf_logits(hf_model, tokens, mask)
    real = mask.astype(bool)
    assert rel_error(np.asarray(ours)[real], theirs[real]) <= 1e-4, name


def test_greedy_generation_matches_transformers(family):
    name, hf_model, _, model, params = family
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, VOCAB, 9), rng.integers(1, VOCAB, 5)]
    out = generate(model, params, prompts, max_new_tokens=32, eos_id=-1, pad_id=0)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor(prompt[None], dtype=torch.long)
        with torch.no_grad():
            theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=32, do_sample=False)
        np.testing.assert_array_equal(np.asarray(out.tokens[row]),
                                      theirs[0, len(prompt):].numpy(), err_msg=name)


def test_save_then_transformers_load_gives_the_same_logits(family, tmp_path):
    name, hf_model, _, model, params = family
    hf.save(tmp_path, model, params)
    reloaded = getattr(transformers, FAMILIES[name][1]).from_pretrained(tmp_path).eval()
    reloaded.config._attn_implementation = "eager"
    tokens = np.random.default_rng(4).integers(0, VOCAB, (1, 13))
    assert rel_error(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens)) <= 1e-5, name


_LONGROPE = np.random.default_rng(0)
ROPE_CASES = {  # transformers' rope_parameters of each type (training length 16)
    "linear": dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=100.0)),
    "dynamic": dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", factor=3.0, rope_theta=100.0)),
    "yarn": dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="yarn", factor=4.0, rope_theta=100.0, original_max_position_embeddings=16,
        beta_fast=16.0, beta_slow=2.0)),
    "yarn_mscale": dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="yarn", factor=4.0, rope_theta=100.0, original_max_position_embeddings=16,
        mscale=0.7, mscale_all_dim=0.5)),
    "llama3": dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="llama3", factor=4.0, rope_theta=100.0, original_max_position_embeddings=16,
        low_freq_factor=1.0, high_freq_factor=2.0)),
    "longrope": dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="longrope", factor=4.0, rope_theta=100.0, original_max_position_embeddings=16,
        short_factor=list(1 + _LONGROPE.random(4)), long_factor=list(1 + 6 * _LONGROPE.random(4)))),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_every_rope_scaling_matches_transformers(case, tmp_path):
    """Logits within and beyond the training length (13 and 29 tokens against 16), and
    save -> transformers load keeps the scaling."""
    config = transformers.LlamaConfig(**{**ATTENTION, **ROPE_CASES[case]})
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "in")
    model, params = hf.load(tmp_path / "in", dtype="float32")
    tokens = np.random.default_rng(5).integers(0, VOCAB, (2, 29))
    for length in (13, 29):
        ours, _ = model.apply({"params": params}, jnp.asarray(tokens[:, :length]))
        assert rel_error(ours, hf_logits(hf_model, tokens[:, :length])) <= 1e-4, (case, length)
    hf.save(tmp_path / "out", model, params)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert rel_error(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens)) <= 1e-5, case


def test_sharded_checkpoint_and_mesh_load(tmp_path):
    """A checkpoint in shards (transformers' index) loads to the same parameters, also
    onto a mesh, where each parameter is placed by its logical axes."""
    single = tmp_path / "single"
    hf_model = make_hf_model("llama", single)
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, reference = hf.load(single, dtype="float32")
    mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"))
    model, params = hf.load(tmp_path / "sharded", dtype="float32", mesh=mesh)
    query = params["layer_0"]["mixer"]["query"]["kernel"]
    assert not query.sharding.is_fully_replicated
    for ours, ref in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.parametrize("kind,shape,index", [
    ("linear", (6, 4, 3), (slice(2, 4), slice(1, 3), slice(None))),
    ("linear2", (4, 3, 6), (slice(0, 2), slice(1, 2), slice(3, 6))),
    ("vector", (4, 3), (slice(1, 3), slice(0, 2))),
    ("conv", (4, 6), (slice(None), slice(2, 5))),
])
def test_tensor_read_of_a_box_equals_the_box_of_the_whole(kind, shape, index):
    """What one device reads (a box of the parameter) is that box of the full parameter,
    with torch's layout on the file side."""
    t = weights.Tensor("w", ("w",), kind)
    full = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    stored = t.write(full)
    assert stored.shape == t.hf_shape(shape)
    np.testing.assert_array_equal(t.read(stored, shape, (slice(None),) * len(shape),
                                         np.float32), full)
    np.testing.assert_array_equal(t.read(stored, shape, index, np.float32), full[index])


def _config(tmp_path, **fields):
    base = {"architectures": ["LlamaForCausalLM"], **ATTENTION, "rms_norm_eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps({**base, **fields}))
    return tmp_path


@pytest.mark.parametrize("fields,match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"quantization_config": {"bits": 4}}, "quantization_config"),
    ({"architectures": ["Gemma2ForCausalLM"]}, "query_pre_attn_scalar"),
    ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}, "rope_type"),
])
def test_unsupported_config_is_refused_naming_the_field(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        hf.load(_config(tmp_path, **fields))


def test_model_without_hugging_face_equivalent_is_refused():
    """longjax's own default (tied logits divided by sqrt(d)) is not any HF family."""
    model = DecoderLM(ml_collections.FrozenConfigDict(base_config().model))
    with pytest.raises(ValueError, match="scale_tied_logits"):
        hf.hf_config(model.model)
