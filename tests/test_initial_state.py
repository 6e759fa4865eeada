"""State passing in training: contiguous batch slots, carried states equal to one long
sequence for every recurrent mixer, exact resume of the carry, the interventions, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longjax.data.contiguous import ContiguousDataset
from longjax.data.packing import row_positions
from longjax.data.pipeline import make_train_stream
from longjax.nn import DecoderLM
from longjax.parallel.mesh import make_mesh
from longjax.train import build_model, create_train_state, initial_state, make_train_step, put_batch
from longjax.train import config as config_lib
from longjax.train.checkpoint import Checkpointer
from longjax.train.state import TrainState, abstract_train_state

# One of each recurrent family (the other linear-attention kinds share gla's and
# gated_deltanet's module and cache: tests/test_linear_mixers.py checks each through its cache)
RECURRENT = ("mamba", "mamba2", "s4d", "s4", "gla", "gated_deltanet", "rglru")
OPTIONS = {"mamba": {"d_state": 4, "chunk_size": 4},
           "mamba2": {"d_state": 4, "head_dim": 8, "chunk_size": 4},
           "s4d": {"d_state": 4}, "s4": {"d_state": 4}}


def test_contiguous_slots_continue_from_row_to_row():
    docs = [np.arange(100 * i, 100 * i + n) for i, n in enumerate([7, 30, 3, 25, 14])]
    data = ContiguousDataset(docs, seq_len=6, num_slots=3, positions="document")
    assert data.windows == 4  # 79 tokens: slots of 26, windows of 7 tokens overlapping by 1
    stream = np.concatenate(docs)[:78].reshape(3, 26)
    batches = [data.batch(k, 3) for k in range(9)]
    for k, batch in enumerate(batches[:4]):
        np.testing.assert_array_equal(batch["tokens"], stream[:, 6 * k:6 * k + 6])
        np.testing.assert_array_equal(batch["targets"], stream[:, 6 * k + 1:6 * k + 7])
        np.testing.assert_array_equal(batch["positions"], stream[:, 6 * k:6 * k + 6] % 100)
        np.testing.assert_array_equal(batch["segment_ids"], stream[:, 6 * k:6 * k + 6] // 100 + 1)
        # the target of a row's last token is the next document's first token: unweighted
        np.testing.assert_array_equal(batch["weights"], np.diff(
            stream[:, 6 * k:6 * k + 7] // 100, axis=1) == 0)
    np.testing.assert_array_equal(batches[4]["tokens"], batches[0]["tokens"])  # second pass
    assert (batches[4]["segment_ids"] == batches[0]["segment_ids"] + 5).all()  # new ids
    assert (batches[8]["segment_ids"] == batches[0]["segment_ids"]).all()
    np.testing.assert_array_equal(data.batch(1, 3, rows=np.array([2]))["tokens"],
                                  batches[1]["tokens"][2:])
    row = ContiguousDataset(docs, seq_len=6, num_slots=3, positions="row").batch(1, 3)
    assert row["positions"][0, 0] == 0 and row["positions"][1, 0] == 0
    with pytest.raises(ValueError, match="batch_size=40 slots of 1"):
        ContiguousDataset(docs, seq_len=6, num_slots=40)


def _lm(mixers=RECURRENT):
    return DecoderLM(ml_collections.FrozenConfigDict(dict(
        vocab_size=19, d_model=16, num_layers=len(mixers), num_heads=2, num_kv_heads=2,
        head_dim=8, mlp_dim=16, mixer=",".join(mixers), mixer_options=OPTIONS,
        dtype="float32", norm_eps=1e-6, tie_embeddings=False, remat=False)))


def _random_params(model, tokens):
    """Normal parameters of std 0.3 in the model's shapes (compiling no initializers)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, leaf.shape)
                                     for k, leaf in zip(keys, leaves, strict=True)])


def test_carried_states_equal_one_long_sequence_for_every_recurrent_mixer():
    """Rows of 5 tokens carried from step to step == the 15 tokens in one call: documents
    border inside a row (token 7) and on a row border (token 10)."""
    B, T, steps = 2, 5, 3
    model = _lm()
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 19, size=(B, T * steps)), jnp.int32)
    seg = jnp.asarray([[3] * 7 + [4] * 3 + [5] * 5, [8] * 10 + [9] * 5], jnp.int32)
    pos = jnp.asarray(row_positions(np.asarray(seg)))  # in-document positions
    params = _random_params(model, tokens[:, :T])
    apply = jax.jit(lambda t, s, p, c: model.apply({"params": params}, t, segment_ids=s,
                                                   positions=p, cache=c))
    whole, _ = apply(tokens, seg, pos, None)
    train = ml_collections.ConfigDict(dict(initial_state="carry"))
    carry = initial_state.initial_carry(ml_collections.ConfigDict(dict(
        train=train, data=dict(batch_size=B))), model)
    pieces = []
    for k in range(steps):
        rows = slice(k * T, (k + 1) * T)
        batch = {"segment_ids": seg[:, rows]}
        caches = initial_state.start_caches(train, model, carry, batch, None)
        logits, final = apply(tokens[:, rows], seg[:, rows], pos[:, rows], caches)
        carry = initial_state.next_carry(train, final)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), whole, rtol=2e-4, atol=2e-4)
    # other sequence: row b starts from row b-1's final states (its own first document)
    other = ml_collections.ConfigDict(dict(initial_state="other_sequence"))
    caches = initial_state.start_caches(other, model, carry, {"segment_ids": seg[:, :T]}, None)
    for layer, last in zip(caches, final, strict=True):
        state = layer.get("ssm", layer.get("state"))
        np.testing.assert_array_equal(state, jnp.roll(last.get("ssm", last.get("state")), 1, 0))
        np.testing.assert_array_equal(layer["segment"], seg[:, 0])
        assert (layer["conv"]["seg"] == -1).all() if "conv" in layer else True


def test_noise_states_are_gaussian_and_fresh_per_key():
    model = _lm(("mamba", "s4d", "attention"))  # real, complex and no state
    noise = ml_collections.ConfigDict(dict(initial_state="noise", initial_state_noise_std=0.5))
    batch = {"segment_ids": jnp.full((64, 4), 2, jnp.int32)}
    first, second = (initial_state.start_caches(noise, model, None, batch, jax.random.key(k))
                     for k in (0, 1))
    assert first[2] is None
    for a, b in zip(first[:2], second[:2], strict=True):
        state = np.asarray(a.get("ssm", a.get("state")))  # complex for S4 / S4D
        assert abs(np.std(state) - 0.5) < 0.05 and abs(np.mean(state)) < 0.05
        assert not np.allclose(state, b.get("ssm", b.get("state")))
        assert (a["segment"] == 2).all()


@pytest.mark.parametrize("overrides, message", [
    ({"train.initial_state": "warm"}, "initial_state='warm'; allowed"),
    ({"train.initial_state": "carry"}, "needs config.data.packing='contiguous'"),
    ({"train.initial_state": "other_sequence", "data.packing": "decomposition"},
     "batch size must not change"),
    ({"train.initial_state": "noise", "train.initial_state_noise_std": -1.0}, ">= 0"),
    ({"data.packing": "contiguous", "data.source": "task", "data.task": "copy"},
     "contiguous' needs a text source"),
])
def test_bad_initial_state_config(overrides, message):
    config = config_lib.apply_overrides(config_lib.base_config(), overrides)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)
    if overrides.get("train.initial_state") == "carry":
        config.data.packing = "contiguous"
        with pytest.raises(ValueError, match="parallel.sequence=2"):
            config_lib.validate(config, num_sequence_shards=2)


def test_carried_states_resume_exactly_from_a_checkpoint(tiny_config, tmp_path):
    """The train loop's resume path (Orbax `Checkpointer` of the state, the stream's
    position) after step 2 of 4: steps 3 and 4 as in the unbroken run, carry included."""
    config = tiny_config(model__mixer="mamba", model__num_layers=1, data__packing="contiguous",
                         train__initial_state="carry")
    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    model = build_model(config)
    step = make_train_step(config, model, mesh)

    def run(state, stream, steps):
        losses = []
        for _ in range(steps):
            state, metrics = step(state, put_batch(stream.next(), mesh))
            losses.append(float(metrics["loss"]))
        return state, losses

    stream = make_train_stream(config)
    state, _ = run(create_train_state(config, model, mesh, jax.random.key(0)), stream, 2)
    checkpointer = Checkpointer(tmp_path, config)
    checkpointer.save(2, state, {"stream": stream.state()})
    checkpointer.wait()
    assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(state.carry))
    unbroken, unbroken_losses = run(state, stream, 2)
    restored, data_state = checkpointer.restore(
        abstract_train_state(config, model, mesh))
    resumed_stream = make_train_stream(config)
    resumed_stream.restore(data_state["stream"])
    resumed, resumed_losses = run(restored, resumed_stream, 2)
    assert resumed_losses == unbroken_losses
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(unbroken), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_switching_carried_states_on_starts_them_afresh(tmp_path):
    """Post-training with an intervention resumes a workdir trained without one."""
    params = {"w": jnp.ones((2, 3))}
    checkpointer = Checkpointer(tmp_path, config_lib.base_config())
    checkpointer.save(5, TrainState(step=jnp.int32(5), params=params, opt_state=()), {})
    checkpointer.wait()
    carry = ({"state": jnp.zeros((4, 2))},)
    restored, _ = checkpointer.restore(TrainState(step=jnp.int32(0), params={"w": jnp.zeros(
        (2, 3))}, opt_state=(), carry=carry))
    assert int(restored.step) == 5 and (restored.params["w"] == 1).all()
    assert restored.carry is carry
