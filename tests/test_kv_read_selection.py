"""Quest, InfLLM and Squeezed Attention (`longjax.nn.kv_cache.quest / infllm / squeezed`):
the keys each query reads, per KV head, equal dense NumPy definitions written from the
papers (GQA, a left-padded row, a chunked prefill then decoding); through the attention
mixer the outputs are attention over those keys, and with a budget that covers the
context they are full attention's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longjax.nn import build_mixer
from longjax.nn.kv_cache import NewTokens, cache_policy

B, T, H, K, D = 2, 24, 4, 2, 8  # G = 2 query heads per KV head
G = H // K
PAD = 5  # row 1 is left-padded: its first prefill chunk is 5 padding tokens and 1 real
PROMPT = 18
CHUNKS = [(0, 6), (6, 12), (12, 18)] + [(t, t + 1) for t in range(PROMPT, T)]
SEG = np.ones((B, T), np.int32)
SEG[1, :PAD] = 0
POS = np.stack([np.arange(T), np.maximum(np.arange(T) - PAD, 0)]).astype(np.int32)

# Small budgets, so that queries read strict subsets.
POLICIES = {
    "quest": dict(budget=8, options={"page_size": 4}),
    "infllm": dict(budget=12, options={"initial_tokens": 2, "block_size": 3,
                                       "num_representatives": 2, "top_k_blocks": 2}),  # W 4
    "squeezed": dict(budget=6, options={"num_clusters": 4, "kmeans_iterations": 5}),
}


# ---- The papers' definitions, in NumPy, over one row's real tokens (index = row order).

def quest_reads(q, k, budget, page_size):
    """Quest (Tang et al. 2024, Sec. 3): `[n, K, n]` bool. Page p holds tokens
    p*size .. (p+1)*size-1 with elementwise key min / max; query i's page bound is
    sum_d max(q_d min_d, q_d max_d), the max over the KV head's query heads; it reads its
    own page and the ceil(budget / size) - 1 earlier pages of highest bound."""
    n = len(q)
    reads = np.zeros((n, K, n), bool)
    for i in range(n):
        current = i // page_size
        for kv in range(K):
            bounds = []
            for p in range(current):
                keys = k[p * page_size:(p + 1) * page_size, kv]
                lo, hi = keys.min(0), keys.max(0)
                bounds.append(max(np.maximum(q[i, h] * lo, q[i, h] * hi).sum()
                                  for h in range(kv * G, (kv + 1) * G)))
            chosen = {current, *np.argsort(-np.array(bounds), kind="stable")[
                :-(-budget // page_size) - 1].tolist()}
            reads[i, kv] = [j <= i and j // page_size in chosen for j in range(n)]
    return reads


def infllm_reads(q, k, calls, budget, num_sinks, block_size, num_reps, top_k):
    """InfLLM (Xiao et al. 2024, Sec. 3.2): `[n, K, n]` bool for the queries in `calls`
    (lists of indices, one per chunk). Window W = budget - sinks - top_k * block_size;
    token m's score sums q_t . k_m over t with 0 <= t - m < W and the KV head's query
    heads; block j (tokens S + j*bs ..) is in query t's memory when its last token is
    <= t - W; its representative is the sum of its num_reps top-score keys; a chunk
    retrieves the top_k memory blocks (of its last query) by sum over its queries and
    heads of q . rep; query t reads sinks, retrieved blocks and tokens not in its memory."""
    n = len(q)
    W = budget - num_sinks - top_k * block_size
    reads = np.zeros((n, K, n), bool)
    qk = q.reshape(n, K, G, D).sum(2)  # the KV head's query heads summed
    for call in calls:
        if not call:
            continue
        last = max(call)
        score = np.zeros((n, K))
        for m in range(n):
            for t in range(m, min(m + W, last + 1)):
                score[m] += (qk[t] * k[m]).sum(-1)

        def memory(t):
            return sum(1 for j in range(n) if num_sinks + (j + 1) * block_size - 1 <= t - W)

        relevance = []
        for j in range(memory(last)):
            block = slice(num_sinks + j * block_size, num_sinks + (j + 1) * block_size)
            rep = np.stack([k[block, kv][np.argsort(-score[block, kv], kind="stable")[
                :num_reps]].sum(0) for kv in range(K)])
            relevance.append(sum((qk[t] * rep).sum() for t in call))
        retrieved = set(np.argsort(-np.array(relevance), kind="stable")[:top_k].tolist())
        for t in call:
            for j in range(t + 1):
                block = (j - num_sinks) // block_size
                reads[t, :, j] = (j < num_sinks or block >= memory(t) or block in retrieved)
    return reads


def kmeans_numpy(x, clusters, iterations):
    """Lloyd's k-means from the keys at floor(j n / C): `(centroids, labels)`."""
    n = len(x)
    c = x[[j * n // clusters for j in range(clusters)]].copy()
    for _ in range(iterations):
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(clusters):
            if (labels == j).any():
                c[j] = x[labels == j].mean(0)
    return c, ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)


def squeezed_reads(q, k, fixed, budget, clusters, iterations):
    """Squeezed Attention (Hooper et al. 2024, Sec. 3): `[n, K, n]` bool. The first
    `fixed` keys of each KV head are clustered by k-means; a query after them ranks the
    clusters by max over its KV head's query heads of q . centroid and reads the best
    while their total size fits the budget, plus every token after the fixed context;
    a query inside it reads all before it."""
    n = len(q)
    reads = np.tril(np.ones((n, n), bool))[:, None].repeat(K, 1)
    for kv in range(K):
        centroids, labels = kmeans_numpy(k[:fixed, kv], clusters, iterations)
        sizes = np.bincount(labels, minlength=clusters)
        for i in range(fixed, n):
            score = [max(q[i, h] @ c for h in range(kv * G, (kv + 1) * G)) for c in centroids]
            chosen, total = set(), 0
            for c in np.argsort(-np.array(score), kind="stable"):
                if total + sizes[c] > budget:
                    break
                chosen.add(c)
                total += sizes[c]
            reads[i, kv, :fixed] = [labels[j] in chosen for j in range(fixed)]
    return reads


def oracle_reads(name, q, k, calls, budget, fixed=None):
    """The definition of `name` for one row: `[n, K, n]`; `calls`: the row's indices per
    call; the fixed context of Squeezed Attention: `fixed` tokens, or the prompt."""
    spec = POLICIES[name]
    options = spec["options"]
    if name == "quest":
        return quest_reads(q, k, budget, options["page_size"])
    if name == "infllm":
        return infllm_reads(q, k, calls, budget, options["initial_tokens"],
                            options["block_size"], options["num_representatives"],
                            options["top_k_blocks"])
    fixed = sum(len(c) for c in calls[:3]) if fixed is None else fixed
    return squeezed_reads(q, k, fixed, budget, options["num_clusters"],
                          options["kmeans_iterations"])


# ---- The cache policies, streamed.

def _options(name, budget):
    spec = POLICIES[name]
    return ml_collections.ConfigDict(dict(
        cache_mode=name, cache_budget=budget, cache_options=tuple(sorted(spec["options"].items())),
        num_sinks=0, window=None, train_length=None))


def _policy(name, budget):
    return cache_policy(name, _options(name, budget), where="test")


def _policy_reads(policy, q, k, v):
    """Streams q, k, v `[B, T, ...]` through `policy.read` in CHUNKS: `[B, T, K, L]` bool,
    the slots each query reads (its `keep` under the causal and segment masks)."""

    @jax.jit
    def read(cache, q, k, v, pos, seg):
        parts, cache = policy.read(cache, NewTokens(k, v, pos, seg, q=q))
        (part,) = parts
        causal = part.q_slots[:, :, None] >= part.kv_slots[:, None, :]
        same = (seg[:, :, None] == part.segment_ids[:, None, :]) & (seg[:, :, None] != 0)
        reads = part.keep & (causal & same)[:, :, None, :]
        return jnp.broadcast_to(reads, (*q.shape[:2], K, reads.shape[-1])), cache

    init = policy.init(B, T, (K, D), jnp.float32)
    cache, out = init, []
    for lo, hi in CHUNKS:
        mask, cache = read(cache, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], POS[:, lo:hi],
                           SEG[:, lo:hi])
        out.append(mask)
    spec = lambda x: (x.shape, x.dtype)  # noqa: E731
    assert jax.tree.map(spec, cache) == jax.tree.map(spec, init)  # a scan carry
    return np.concatenate(out, axis=1)


def _row_chunks(b):
    """Row b's real-token indices, per chunk."""
    real = np.cumsum(SEG[b]) - 1
    return [[int(real[t]) for t in range(lo, hi) if SEG[b, t]] for lo, hi in CHUNKS]


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal(s).astype(np.float32)
                 for s in ((B, T, H, D), (B, T, K, D), (B, T, K, D)))


@pytest.mark.parametrize("name", list(POLICIES))
def test_reads_equal_the_papers_definition(name, qkv):
    """Per row (row 1 left-padded), query and KV head, the keys read equal the NumPy
    definition, through a chunked prefill (a chunk of 5 padding tokens and 1 real) and
    one-token decoding; the budget makes some queries read strictly fewer keys than
    causal attention, and the KV heads read different keys where the method is per head."""
    q, k, v = qkv
    budget = POLICIES[name]["budget"]
    got = _policy_reads(_policy(name, budget), q, k, v)
    for b in range(B):
        real = SEG[b] != 0
        n = int(real.sum())
        want = oracle_reads(name, q[b, real], k[b, real], _row_chunks(b), budget)
        np.testing.assert_array_equal(got[b, real][:, :, :n], want, err_msg=f"{name} row {b}")
        assert not got[b, real][:, :, n:].any()
        assert want.sum(-1).min(0).max() < n  # strictly fewer than causal somewhere
    if name != "infllm":  # InfLLM's retrieval is shared by the KV heads
        assert (got[:, :, 0] != got[:, :, 1]).any()


def _mixer(name, budget, position="rope", **options):
    spec = POLICIES.get(name, {})
    config = ml_collections.ConfigDict(dict(
        d_model=16, num_heads=H, num_kv_heads=K, head_dim=D, dtype="float32",
        mixer_options={"attention": dict(
            cache_mode=name, cache_budget=budget,
            cache_options={**spec.get("options", {}), **options}, position=position,
            impl="reference")}))
    return build_mixer("attention", config, parent=None)


X = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, 16)), jnp.float32)


@pytest.fixture(scope="module")
def params():
    """Random parameters of the mixer's shapes, without compiling its init."""
    abstract = nn.unbox(jax.eval_shape(_mixer("full", None).init, jax.random.key(0), X))
    rng = np.random.default_rng(2)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, a.dtype),
                        abstract)


def _forward(mixer, params):
    return np.asarray(jax.jit(
        lambda x: mixer.apply(params, x, segment_ids=SEG, positions=POS)[0])(X))


@pytest.fixture(scope="module")
def full_attention(params):
    return _forward(_mixer("full", None), params)


@pytest.mark.parametrize("name", list(POLICIES))
def test_budget_covering_the_context_is_full_attention(name, params, full_attention):
    """Budget = the context (RoPE, GQA, the left-padded row): streamed in chunks of 6,
    the outputs are full attention's."""
    mixer = _mixer(name, T)
    step = jax.jit(lambda x, seg, pos, c: mixer.apply(params, x, segment_ids=seg, positions=pos,
                                                      cache=c))
    cache, got = mixer.init_cache(B, T), []
    for lo in range(0, T, 6):
        y, cache = step(X[:, lo:lo + 6], SEG[:, lo:lo + 6], POS[:, lo:lo + 6], cache)
        got.append(y)
    real = SEG != 0
    np.testing.assert_allclose(np.concatenate(got, 1)[real], full_attention[real], atol=1e-5)


@pytest.mark.parametrize("name", list(POLICIES))
def test_mixer_attends_to_the_keys_read(name, params):
    """The mixer's full forward with a small budget (no positions, so NumPy needs no
    RoPE) is softmax attention over the definition's keys per KV head, then the output
    projection."""
    fixed = dict(fixed_length=10) if name == "squeezed" else {}
    got = _forward(_mixer(name, POLICIES[name]["budget"], position="none", **fixed), params)
    p = {n: np.asarray(params["params"][n]["kernel"]) for n in ("query", "key", "value", "out")}
    x = np.asarray(X)
    for b in range(B):
        real = SEG[b] != 0
        q, k, v = (np.einsum("tc,chd->thd", x[b, real], p[n]) for n in ("query", "key", "value"))
        n = len(q)
        reads = oracle_reads(name, q, k, [list(range(n))], POLICIES[name]["budget"], fixed=10)
        s = np.einsum("thd,shd->hts", q, np.repeat(k, G, axis=1)) * D**-0.5
        s = np.where(np.repeat(reads, G, axis=1).transpose(1, 0, 2), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out = np.einsum("hts,shd->thd", w / w.sum(-1, keepdims=True), np.repeat(v, G, axis=1))
        np.testing.assert_allclose(got[b, real], np.einsum("thd,hdc->tc", out, p["out"]),
                                   atol=1e-5, err_msg=f"{name} row {b}")


@pytest.mark.parametrize("name, budget, options, message", [
    ("quest", None, {}, r"cache_budget must be an int >= 1 for cache_mode='quest'"),
    ("quest", 8, {"page_size": 0}, r"cache_options.page_size must be a positive int"),
    ("infllm", 12, {"num_representatives": 4}, r"num_representatives must be an int in \[1, "
                                               r"block_size=3\]"),
    ("infllm", 12, {"top_k_blocks": -1}, r"top_k_blocks must be an int >= 0 or None"),
    ("infllm", 12, {"initial_tokens": None}, r"initial_tokens must be an int >= 0 for"),
    ("infllm", 8, {}, r"cache_budget=8 leaves no local window"),
    ("squeezed", 6, {"num_clusters": 0}, r"cache_options.num_clusters must be a positive int"),
    ("squeezed", 6, {"fixed_length": 0}, r"fixed_length must be a positive int or None"),
    ("quest", 8, {"window": 4}, r"test.window and num_sinks must be unset for "
                                r"cache_mode='quest'"),
    ("infllm", 12, {"window": 4}, r"test.window and num_sinks must be unset for "
                                  r"cache_mode='infllm'"),
])
def test_bad_options_are_named(name, budget, options, message):
    spec = POLICIES[name]
    config = _options(name, budget)
    config.window = options.pop("window", None)
    config.cache_options = tuple(sorted({**spec["options"], **options}.items()))
    with pytest.raises(ValueError, match=message):
        cache_policy(name, config, where="test")


def test_selectable_from_the_scripts_flags():
    """`--cache_policy=infllm --cache_budget=48 --cache_options=...` (scripts/
    evaluate_lengths.py, generate.py) sets the attention options that build the policy."""
    from absl import flags

    from longjax.eval import cache_flags
    from longjax.eval.methods import method_overrides

    fv = flags.FlagValues()
    cache_flags.define_flags(fv)
    fv(["test", "--cache_policy=infllm", "--cache_budget=48",
        "--cache_options=block_size=8,top_k_blocks=2"])
    overrides = method_overrides(cache_flags.method_part_from_flags(fv), train_length=64,
                                 eval_length=64)
    assert overrides == {"cache_mode": "infllm", "cache_budget": 48,
                         "cache_options": (("block_size", 8), ("top_k_blocks", 2))}
    options = _options("infllm", 48)
    options.cache_options = overrides["cache_options"]
    policy = cache_policy("infllm", options, where="test")
    assert (policy.top_k, policy.local_window) == (2, 48 - 4 - 2 * 8)
