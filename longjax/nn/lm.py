"""Pre-norm decoder language model whose per-layer sequence mixer is chosen by name.

Options beyond longjax's own defaults (they express the Hugging Face families that
`longjax.hf` reads; each defaults to the behaviour of earlier checkpoints):
`mlp` ("swiglu", "geglu" or "none" for mixer-only blocks as in Mamba), `post_norms`
(also normalise each sub-block's output before the residual add, Gemma 2),
`scale_embeddings` (embeddings times sqrt(d_model), Gemma), `scale_tied_logits` (tied
logits divided by sqrt(d_model); on by default, off for imported checkpoints) and
`final_logit_softcap` (logits `c tanh(logits / c)`, Gemma 2).

`decimation` (an evaluation method, `longjax.eval.methods`): `((layer, K, R), ...)`
decimates those Mamba layers as DeciMamba does (Ben-Kish et al. 2024; `MambaMixer`):
from that layer on the stream holds only the tokens it kept, and the logits of the
dropped tokens come back as zeros (uniform), so only the kept positions are scored.

`scan_layers` (off by default) runs the layers as one `flax.linen.scan` over the
repeats of the mixer pattern's cycle (`Cycle`: one block per mixer of the cycle), as
MaxText does: the compiled program holds one cycle whatever the depth, so compiling a
deep model for a TPU slice takes the time of a shallow one. The parameters then live
under `layers/block_<j>` (j the position in the cycle) with a leading axis of
`num_layers / cycle` repeats, whose logical name `layers` is replicated
(`longjax.parallel.mesh.LOGICAL_RULES`); layer `r * cycle + j` of the unrolled model is
repeat `r` of `block_<j>`. Remat, when on, wraps each block as in the unrolled model.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from longjax.nn.layers import GatedMLP, RMSNorm, dense
from longjax.nn.pattern import expand_pattern, layer_mixers
from longjax.nn.position_bias import AbsolutePositions
from longjax.nn.registry import build_mixer

# The cache entries that hold a recurrent layer's state (SSMs: "ssm"; linear attention and
# RG-LRU: "state"); the rest of a cache (short-convolution tails, the last segment id,
# token counters) travels with it.
STATE_KEYS = frozenset({"ssm", "state"})


class Block(nn.Module):
    """`x + mixer(norm(x))`, then `x + mlp(norm(x))` (no MLP when `model.mlp == "none"`);
    with `model.post_norms` each branch's output is normalised too (`x + norm(mixer(norm(x)))`).
    """

    model: ml_collections.FrozenConfigDict
    mixer_name: str
    decimation: tuple[int, int] | None = None  # (K, R) of a decimating Mamba layer

    @nn.compact
    def __call__(self, x, segment_ids, positions, cache):
        """`(x, cache)`, and with `decimation` also the kept token indices (None when the
        call was short enough to keep every token)."""
        cfg = self.model
        dtype = jnp.dtype(cfg.dtype)
        post_norms = cfg.get("post_norms", False)

        def norm(name):
            return RMSNorm(cfg.norm_eps, dtype, name=name)

        extra = {} if self.decimation is None else {"decimation": self.decimation}
        mixer = build_mixer(self.mixer_name, cfg, name="mixer", **extra)
        h, cache, *kept = mixer(norm("mixer_norm")(x), segment_ids=segment_ids,
                                positions=positions, cache=cache)
        if kept and kept[0] is not None:
            x = jnp.take_along_axis(x, kept[0][..., None], axis=1)
        x = x + (norm("mixer_post_norm")(h) if post_norms else h)
        mlp = cfg.get("mlp", "swiglu")
        if mlp != "none":
            h = GatedMLP(cfg.mlp_dim, dtype, mlp, name="mlp")(norm("mlp_norm")(x))
            x = x + (norm("mlp_post_norm")(h) if post_norms else h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, cache) if self.decimation is None else (x, cache, kept[0])


def _block_cls(cfg):
    return nn.remat(Block, static_argnums=()) if cfg.remat else Block


class Cycle(nn.Module):
    """One cycle of the mixer pattern: a block per name of `mixer_names`, in order; the
    carry of `DecoderLM`'s layer scan (`cache` is a tuple with one entry per block)."""

    model: ml_collections.FrozenConfigDict
    mixer_names: tuple[str, ...]

    @nn.compact
    def __call__(self, x, segment_ids, positions, cache):
        block_cls = _block_cls(self.model)
        new_cache = []
        for j, name in enumerate(self.mixer_names):
            x, block_cache = block_cls(self.model, name, name=f"block_{j}")(
                x, segment_ids, positions, None if cache is None else cache[j])
            new_cache.append(block_cache)
        return x, None if cache is None else tuple(new_cache)


def _stack_cycles(per_layer, cycle):
    """Per-layer entries `(l_0, ..., l_{L-1})` -> per cycle position j the entries of
    layers j, j + cycle, ... stacked on a leading axis (the layer scan's input)."""
    return tuple(jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer[j::cycle])
                 for j in range(cycle))


def _unstack_cycles(stacked, cycle, repeats):
    """The inverse of `_stack_cycles`: back to one entry per layer, in layer order."""
    return tuple(jax.tree.map(lambda x, r=r: x[r], stacked[i % cycle])
                 for r in range(repeats) for i in range(r * cycle, (r + 1) * cycle))


class DecoderLM(nn.Module):
    """Token ids `[B, T]` -> logits `[B, T, vocab]` (fp32), and the updated per-layer caches.

    `model` is `config.model` (frozen): vocab_size, d_model, num_layers, num_heads,
    num_kv_heads, head_dim, mlp_dim, mixer (a name or pattern), mixer_options, dtype,
    norm_eps, tie_embeddings, remat, position_embedding ("none", "sinusoidal", "learned"
    with max_position rows) added to the token embeddings, and the options of the module
    docstring (mlp, post_norms, scale_embeddings, scale_tied_logits, final_logit_softcap).
    """

    model: ml_collections.FrozenConfigDict

    def layer_mixers(self):
        return layer_mixers(self.model.mixer, self.model.num_layers)

    def init_cache(self, batch_size, max_length):
        """Per-layer decode caches for `batch_size` sequences of up to `max_length` tokens."""
        dtype = jnp.dtype(self.model.dtype)
        return tuple(
            build_mixer(name, self.model, parent=None).init_cache(batch_size, max_length, dtype)
            for name in self.layer_mixers()
        )

    def init_state_cache(self, batch_size):
        """Empty decode caches of the recurrent layers, None for the others (attention):
        the states training carries from row to row (`longjax.train.initial_state`). A
        layer is recurrent when its cache holds a state of fixed size (`STATE_KEYS`)."""
        return tuple(cache if STATE_KEYS & set(cache) else None
                     for cache in self.init_cache(batch_size, 1))

    @nn.compact
    def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None):
        cfg = self.model
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            name="embed",
        )
        x = embed(tokens)
        if cfg.get("scale_embeddings", False):
            x = x * jnp.asarray(cfg.d_model**0.5, dtype)
        kind = cfg.get("position_embedding", "none")
        if kind != "none":
            if positions is None and cache is not None:
                raise ValueError("decoding with absolute position embeddings needs positions")
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            if kind == "learned" and cache is None and tokens.shape[1] > cfg.max_position:
                raise ValueError(f"{tokens.shape[1]} tokens exceed the learned position table "
                                 f"(config.model.max_position={cfg.max_position})")
            x = x + AbsolutePositions(kind, cfg.d_model, cfg.get("max_position", 0),
                                      name="position_embedding")(positions).astype(dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cfg.get("scan_layers", False):
            x, new_cache = self._scanned_layers(x, segment_ids, positions, cache)
            index = None
        else:
            x, new_cache, index = self._unrolled_layers(x, segment_ids, positions, cache)
        x = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
            if cfg.get("scale_tied_logits", True):
                logits = logits / jnp.sqrt(cfg.d_model).astype(dtype)
        else:
            logits = dense(cfg.vocab_size, axes=("embed", "vocab"), dtype=dtype, name="unembed")(x)
        logits = logits.astype(jnp.float32)
        softcap = cfg.get("final_logit_softcap", None)
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        if index is not None:
            rows = jnp.arange(tokens.shape[0])[:, None]
            logits = jnp.zeros(tokens.shape + logits.shape[-1:], logits.dtype).at[
                rows, index].set(logits)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits, None if cache is None else tuple(new_cache)

    def _unrolled_layers(self, x, segment_ids, positions, cache):
        """The layers one after another: `(x, new_cache, index)`, `index` the input
        position of each stream position once a layer decimated (else None)."""
        cfg = self.model
        block_cls, decimation = _block_cls(cfg), self.decimation()
        index = None
        new_cache = []
        for i, name in enumerate(self.layer_mixers()):
            x, layer_cache, *kept = block_cls(cfg, name, decimation.get(i), name=f"layer_{i}")(
                x, segment_ids, positions, None if cache is None else cache[i])
            if kept and kept[0] is not None:
                take = functools.partial(jnp.take_along_axis, indices=kept[0], axis=1)
                segment_ids, positions = (None if v is None else take(v)
                                          for v in (segment_ids, positions))
                index = kept[0] if index is None else take(index)
            new_cache.append(layer_cache)
        return x, new_cache, index

    def decimation(self) -> dict[int, tuple[int, int]]:
        """`{layer: (K, R)}` from `model.decimation`; ValueError unless each is a Mamba
        layer."""
        out = {}
        mixers = self.layer_mixers()
        for layer, keep, keep_last in self.model.get("decimation", None) or ():
            if not 0 <= layer < len(mixers) or mixers[layer] != "mamba":
                raise ValueError(f"config.model.decimation: layer {layer} must be a mamba "
                                 f"layer; the layers are {list(mixers)}")
            out[layer] = (int(keep), int(keep_last))
        return out

    def _scanned_layers(self, x, segment_ids, positions, cache):
        """The layers as a scan over the pattern cycle's repeats (`model.scan_layers`)."""
        if self.decimation():
            raise ValueError("config.model.decimation needs unrolled layers "
                             "(config.model.scan_layers=False): a scan has one stream length")
        names = tuple(expand_pattern(self.model.mixer))
        cycle, repeats = len(names), len(self.layer_mixers()) // len(names)
        layers = nn.scan(
            Cycle, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0), length=repeats,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(self.model, names, name="layers")
        stacked = None if cache is None else _stack_cycles(cache, cycle)
        x, stacked = layers(x, segment_ids, positions, stacked)
        return x, None if cache is None else _unstack_cycles(stacked, cycle, repeats)

