"""Length extrapolation: how a trained checkpoint does at and beyond its training length.

    results = evaluate_workdir("workdirs/quickstart", lengths=(256, 1024, 4096),
                               methods=("none", "yarn:auto"))
    results.table("nonoverlapping", "bits_per_byte")   # {method: {length: value}}

For each method (`longjax.eval.methods`, applied per evaluation length) and length n:

- Text checkpoints (a text `config.data.source`): bits per byte and perplexity on the
  validation split, read as the training pipeline reads it. The scored text is the same
  at every length: passages of M + 1 tokens (M = the longest length) cut from the
  documents that hold one, the first passage of each document first, until they hold
  `num_tokens` targets. Each passage is scored by windows of n tokens that restart
  positions at 0 (one document, no padding), two ways: `"nonoverlapping"` windows, and
  sliding windows (`"sliding:<stride>"`, or `"sliding:n/2"` with half of each length as
  the stride) whose ends advance by the stride, each scoring the targets after the
  previous window's end (its last `stride`; the first scores all n): the sliding-window
  evaluation of Press et al. (Shortformer 2021, ALiBi 2022) and the Hugging Face
  perplexity guide. When n does not divide M, the last window ends at the passage's end
  and scores the targets left, in both ways.
- The loss per position (`loss_curves`): the non-overlapping windows' loss at each
  position (the target at position p sees p + 1 tokens), averaged over windows and
  pooled into log- or linear-spaced bins: where a model breaks beyond its training length.
- Passkey retrieval (Mohtashami & Jaggi 2023, `longjax.data.tasks` "passkey") at each
  needle depth: a row counts when every digit of the key is the argmax under teacher
  forcing.
- RULER-style tasks (Hsieh et al. 2024, `longjax.eval.ruler`, `ruler_tasks`): greedy
  generations scored by the share of the expected strings they hold, per length and
  needle depth; with `jrt=True` each prompt's context is read twice (JRT-Prompt, Arora
  et al. 2024).
- Synthetic-task checkpoints (`config.data.source == "task"`): token accuracy and exact
  match (every answer token of a row right) per test size n (the task's `min_length` =
  `max_length` = n, at the smallest sequence length that fits it). A checkpoint trained
  on the `passkey` task gets the passkey rows above at each length, and no text metrics.

The model runs forward only, jitted, a few windows at a time (`batch_size`); attention
takes the blockwise O(T)-memory path on CPU, so 16x the training length fits a CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from longjax import hf
from longjax.data import tasks
from longjax.data import tokenizer as tokenizer_lib
from longjax.data.pipeline import EVAL_SEED, load_token_docs
from longjax.data.tasks.ruler import RULER_TASKS, TooShort, check_shared_options, task_options
from longjax.eval import ruler
from longjax.eval.methods import apply_method, reads_through_cache
from longjax.generate import load_model
from longjax.nn import DecoderLM
from longjax.train import stages as stages_lib
from longjax.train.config import base_config, saved_config

NONOVERLAPPING = "nonoverlapping"
PASSKEY = "passkey"
RULER = "ruler"
_ROW_KEYS = ("tokens", "segment_ids", "positions", "targets")


@dataclasses.dataclass
class Checkpoint:
    """A training workdir's config (as its last stage trained it), parameters and step,
    and the tokenizer of its text (bytes; an imported checkpoint's `tokenizer.json`)."""

    config: ml_collections.ConfigDict
    params: dict
    step: int
    tokenizer: object = dataclasses.field(default_factory=tokenizer_lib.ByteTokenizer)

    @property
    def train_length(self) -> int:
        """The context length the model was trained at last."""
        return int(self.config.data.seq_len)


@dataclasses.dataclass
class Results:
    """What `evaluate` measured.

    rows: `{"method", "mode", "length", "metric", "value"}` records (results.csv); `mode`
    is "nonoverlapping", "sliding:<stride>", "sliding:n/2", "passkey" (mean over depths),
    "passkey@<depth>", "ruler:<task>" (mean over depths and samples), "ruler:<task>@<depth>"
    or "task:<name>" (its `length` is the test size).
    loss_curves: `{"method", "length", "start", "stop", "count", "loss"}`, the mean loss
    (nats) of the `count` targets at positions start .. stop - 1 of the non-overlapping
    windows.
    ruler_samples: one record per RULER sample (`longjax.eval.ruler.RECORD_FIELDS`).
    jrt: whether the RULER prompts were read twice (JRT-Prompt).
    """

    workdir: str
    step: int | None  # None: combined runs, each at its last checkpoint
    train_length: int
    scored_tokens: int = 0  # text targets scored per length and mode
    task_seq_lens: dict[int, int] = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)
    loss_curves: list[dict] = dataclasses.field(default_factory=list)
    ruler_samples: list[dict] = dataclasses.field(default_factory=list)
    jrt: bool = False

    def add(self, method: str, mode: str, length: int, metrics: dict[str, float]) -> None:
        self.rows.extend({"method": method, "mode": mode, "length": length, "metric": k,
                          "value": float(v)} for k, v in metrics.items())

    def table(self, mode: str, metric: str) -> dict[str, dict[int, float]]:
        """`{method: {length: value}}` of one mode and metric."""
        out: dict[str, dict[int, float]] = {}
        for r in self.rows:
            if r["mode"] == mode and r["metric"] == metric:
                out.setdefault(r["method"], {})[r["length"]] = r["value"]
        return out


def load_checkpoint(workdir) -> Checkpoint:
    """The latest checkpoint of a training workdir (see `longjax.generate.load_model`)."""
    _, params, step = load_model(workdir)
    config = saved_config((pathlib.Path(workdir) / "config.json").read_text())
    config = stages_lib.stage_config(config, stages_lib.schedule(config)[-1])
    return Checkpoint(config, params, step)


def load_hf_checkpoint(path, *, dtype="float32", train_length=None,
                       data_path="") -> Checkpoint:
    """A Hugging Face checkpoint directory (`longjax.hf`) with its tokenizer, evaluated on
    the default corpus (or the text files under `data_path`). Its training length is
    `train_length`, else the RoPE scaling's original length or `max_position_embeddings`
    from config.json."""
    hf_config = hf.read_config(path)
    model, params = hf.load(path, dtype=dtype)
    config = base_config()
    config.model = ml_collections.ConfigDict(model.model.to_dict())
    length = (train_length or config.model.mixer_options.attention.get("train_length")
              or hf_config.get("max_position_embeddings"))
    if not length:
        raise ValueError(f"{path}: config.json gives no training length "
                         f"(max_position_embeddings); pass train_length (--train_length)")
    config.data.seq_len = int(length)
    if data_path:
        config.data.source, config.data.path = "files", str(data_path)
    return Checkpoint(config, {"params": params}, 0, tokenizer_lib.load(path))


# --- Text: passages, windows, scores -------------------------------------------------

def text_passages(token_docs, *, length: int, num_tokens: int) -> np.ndarray:
    """`[P, length + 1]` token passages holding `P = ceil(num_tokens / length)` x `length`
    targets: consecutive passages of each document long enough (sharing one token), the
    first of every document, then the second, ...; ValueError if there are too few."""
    count = -(-num_tokens // length)
    spans = sorted((k, d, start) for d, doc in enumerate(token_docs)
                   for k, start in enumerate(range(0, len(doc) - length, length)))
    if len(spans) < count:
        raise ValueError(
            f"the validation documents hold {len(spans)} passages of {length + 1} tokens "
            f"(documents of at least the longest evaluation length + 1 tokens), and "
            f"num_tokens={num_tokens} needs {count}; lower num_tokens or the longest length")
    return np.stack([token_docs[d][s:s + length + 1] for _, d, s in spans[:count]])


def window_spans(total: int, length: int, stride: int) -> list[tuple[int, int]]:
    """`(start, first)` of the windows of `length` over `total` targets: window ends
    advance by `stride` (the last ends at `total`), and a window scores its targets from
    index `first` (the previous end) on. `stride == length`: non-overlapping windows."""
    if not 1 <= stride <= length <= total:
        raise ValueError(f"windows need 1 <= stride <= length <= total targets; got "
                         f"stride={stride}, length={length}, total={total}")
    spans, end = [], 0
    while end < total:
        new_end = min(total, length if not spans else end + stride)
        spans.append((new_end - length, end))
        end = new_end
    return spans


def text_windows(passages: np.ndarray, length: int, stride: int) -> dict[str, np.ndarray]:
    """The windows of every passage, each `[N, length]`: `tokens`, `targets`, `weights`
    (1.0 on the targets it scores), `segment_ids` (1) and `positions` (0 .. length - 1)."""
    total = passages.shape[1] - 1
    spans = window_spans(total, length, stride)
    starts = np.array([s for s, _ in spans])
    index = starts[:, None] + np.arange(length)  # [W, length]
    tokens = passages[:, index].reshape(-1, length)
    targets = passages[:, index + 1].reshape(-1, length)
    scored = index >= np.array([first for _, first in spans])[:, None]
    weights = np.broadcast_to(scored, (len(passages), *scored.shape)).reshape(-1, length)
    return {"tokens": tokens, "targets": targets, "weights": weights.astype(np.float32),
            "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)}


@functools.partial(jax.jit, static_argnames=("model", "cache_chunk"))
def _token_scores(model, params, tokens, segment_ids, positions, targets, cache_chunk=None):
    """Per-token nll (fp32) and argmax hits `[B, T]` of one forward pass, or with
    `cache_chunk` of the row fed through the model's caches that many tokens per call
    (the last call takes the rest), so a bounded cache policy holds while scoring."""

    def scores(tokens, segment_ids, positions, targets, cache=None):
        logits, cache = model.apply(params, tokens, segment_ids=segment_ids,
                                    positions=positions, cache=cache)
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return cache, (nll, jnp.argmax(logits, axis=-1) == targets)

    rows = (tokens, segment_ids, positions, targets)
    if cache_chunk is None:
        return scores(*rows)[1]
    B, T = tokens.shape
    n = T // cache_chunk * cache_chunk
    cache = model.init_cache(B, T)
    chunks = tuple(jnp.swapaxes(x[:, :n].reshape(B, -1, cache_chunk), 0, 1) for x in rows)
    cache, (nll, hits) = jax.lax.scan(lambda c, x: scores(*x, cache=c), cache, chunks)
    nll, hits = (jnp.swapaxes(x, 0, 1).reshape(B, n) for x in (nll, hits))
    if n < T:
        _, (rest_nll, rest_hits) = scores(*(x[:, n:] for x in rows), cache=cache)
        nll, hits = (jnp.concatenate(pair, 1) for pair in ((nll, rest_nll), (hits, rest_hits)))
    return nll, hits


def score_rows(model, params, rows: dict[str, np.ndarray], *, batch_size: int,
               cache_chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(nll, hits)`, each `[N, T]`, of the `N` rows (`tokens`, `segment_ids`,
    `positions`, `targets`), `batch_size` rows per call (the last call repeats the last
    row, so every call has one shape); through the caches `cache_chunk` tokens per call
    when given."""
    n = len(rows["tokens"])
    size = min(batch_size, n)
    nll, hits = [], []
    for i in range(0, n, size):
        index = np.minimum(np.arange(i, i + size), n - 1)
        out = _token_scores(model, params, *(jnp.asarray(rows[k][index]) for k in _ROW_KEYS),
                            cache_chunk=cache_chunk)
        nll.append(np.asarray(out[0])[:n - i])
        hits.append(np.asarray(out[1])[:n - i])
    return np.concatenate(nll), np.concatenate(hits)


def text_metrics(nll, targets, weights, token_bytes=None) -> dict[str, float]:
    """Bits per byte (the nats over the UTF-8 bytes of the targets' text, / ln 2) and
    perplexity per token (exp of the mean nats per token) of the weighted targets;
    `token_bytes` `[V]` gives each id's bytes (default: the byte tokenizer's)."""
    if token_bytes is None:
        token_bytes = tokenizer_lib.ByteTokenizer().token_bytes()
    loss_sum = float(np.sum(nll * weights, dtype=np.float64))
    count = max(float(np.sum(weights)), 1.0)
    num_bytes = max(float(np.sum(weights * np.take(token_bytes, targets, mode="clip"))), 1.0)
    return {"bits_per_byte": loss_sum / (math.log(2) * num_bytes),
            "perplexity": math.exp(loss_sum / count)}


def position_bins(length: int, num_bins: int, spacing: str) -> np.ndarray:
    """Bin edges over positions 0 .. length: about `num_bins` bins, their sizes growing
    geometrically in p + 1 (`spacing="log"`) or equal ("linear"); no bin is empty."""
    if spacing == "log":
        edges = np.geomspace(1, length + 1, num_bins + 1) - 1
    elif spacing == "linear":
        edges = np.linspace(0, length, num_bins + 1)
    else:
        raise ValueError(f"bin spacing must be 'log' or 'linear'; got {spacing!r}")
    return np.unique(np.round(edges).astype(int))


def loss_per_position(nll, weights, *, num_bins: int = 32,
                      spacing: str = "log") -> list[tuple[int, int, int, float]]:
    """`(start, stop, count, mean loss)` per bin of positions of `[N, T]` scores: the
    weighted mean over the `count` scored targets of every window at positions
    start .. stop - 1 (bins without one are left out)."""
    edges = position_bins(nll.shape[1], num_bins, spacing)
    sums = np.sum(nll * weights, axis=0, dtype=np.float64)
    counts = np.sum(weights, axis=0, dtype=np.float64)
    return [(int(a), int(b), int(counts[a:b].sum()), float(sums[a:b].sum() / counts[a:b].sum()))
            for a, b in zip(edges[:-1], edges[1:], strict=True) if counts[a:b].sum() > 0]


# --- Synthetic tasks -------------------------------------------------------------------

def accuracy(hits, weights) -> dict[str, float]:
    """Token accuracy of the weighted targets and exact match (the share of the rows with
    a weighted target whose weighted targets are all hits) of `[N, T]` argmax hits."""
    weights = weights > 0
    scored = weights.any(axis=1)
    exact = np.all(hits | ~weights, axis=1) & scored
    return {"token_accuracy": float((hits & weights).sum() / max(weights.sum(), 1)),
            "exact_match": float(exact.sum() / max(scored.sum(), 1))}


def passkey_rows(length: int, depth: float, *, samples: int, seed: int,
                 tok=None) -> dict[str, np.ndarray]:
    """`samples` passkey rows of `length` tokens with the needle at `depth` (the same keys
    at every depth), in bytes or in the tokens of `tok`."""
    encode = None
    if tok is not None and not isinstance(tok, tokenizer_lib.ByteTokenizer):
        encode = functools.partial(tok.encode, add_bos=False, add_eos=False)
    return tasks.task_batch(PASSKEY, seed=seed, step=0, batch_size=samples, seq_len=length,
                            depth=float(depth), encode=encode)


def passkey_accuracy(model, params, length: int, depths, *, samples: int, seed: int,
                     batch_size: int, tok=None, cache_chunk=None) -> list[float]:
    """Passkey exact match at each needle depth (`samples` rows each, scored together)."""
    rows = [passkey_rows(length, depth, samples=samples, seed=seed, tok=tok)
            for depth in depths]
    merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    _, hits = score_rows(model, params, merged, batch_size=batch_size,
                         cache_chunk=cache_chunk)
    return [accuracy(hits[i * samples:(i + 1) * samples], r["weights"])["exact_match"]
            for i, r in enumerate(rows)]


def size_task_rows(config, size: int, *, samples: int) -> dict[str, np.ndarray]:
    """`samples` rows of the checkpoint's task at size `size` (min_length = max_length =
    size), at the smallest sequence length that fits them."""
    d = config.data
    options = {**d.task_options.to_dict(), "min_length": size, "max_length": size}
    seq_len = tasks.task_seq_len(d.task, **options)
    return tasks.task_batch(d.task, seed=config.seed + EVAL_SEED, step=0,
                            batch_size=samples, seq_len=seq_len, **options)


# --- The harness -----------------------------------------------------------------------

def default_lengths(train_length: int) -> tuple[int, ...]:
    """1x, 2x, 4x, 8x and 16x the training length."""
    return tuple(train_length * 2 ** k for k in range(5))


def _check_args(lengths, methods, num_tokens, stride, passkey_depths, batch_size,
                ruler_tasks=(), ruler_depths=(), ruler_options=None):
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"evaluation lengths must be ints >= 1; got {list(lengths)}")
    if not methods:
        raise ValueError("methods is empty; give at least one, e.g. 'none'")
    if num_tokens < 1 or batch_size < 1:
        raise ValueError(f"num_tokens and batch_size must be >= 1; got {num_tokens}, "
                         f"{batch_size}")
    if stride is not None and not 0 <= stride <= min(lengths):
        raise ValueError(f"stride={stride} must be in [0, the shortest length {min(lengths)}] "
                         f"(0: no sliding-window evaluation; None: half of each length); a "
                         f"window scores its last stride tokens")
    if any(not 0 <= d <= 1 for d in passkey_depths):
        raise ValueError(f"passkey depths must be in [0, 1]; got {list(passkey_depths)}")
    unknown = [t for t in ruler_tasks if t not in RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; allowed: {list(RULER_TASKS)}")
    check_shared_options(ruler_tasks, ruler_options)
    if ruler_tasks and (not ruler_depths or any(not 0 <= d <= 1 for d in ruler_depths)):
        raise ValueError(f"RULER depths must be in [0, 1], at least one; got "
                         f"{list(ruler_depths)}")


def _models(checkpoint: Checkpoint, methods, lengths) -> dict[tuple[str, int], DecoderLM]:
    """The model of each method at each length (all checked before anything runs)."""
    return {(m, n): DecoderLM(apply_method(checkpoint.config.model, m,
                                           train_length=checkpoint.train_length,
                                           eval_length=n))
            for m in methods for n in lengths}


def evaluate(checkpoint: Checkpoint, *, lengths=None, methods=("none",), num_tokens=32768,
             stride=None, passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_samples=5,
             task_sizes=None, task_samples=64, batch_size=4, num_bins=32, bin_spacing="log",
             ruler_tasks=(), ruler_samples=5, ruler_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
             jrt=False, ruler_options=None, cache_chunk=64, workdir="") -> Results:
    """Evaluates `checkpoint` under each method at each length (see the module doc).

    Text checkpoints: `lengths` (default 1x .. 16x the training length), `num_tokens`
    targets per length and mode, sliding windows of `stride` (None: half of each length;
    0: none), `passkey_samples` rows per length and depth (0: no passkey), loss
    curves of `num_bins` bins (`bin_spacing` "log" or "linear"), `ruler_samples` samples
    of each of `ruler_tasks` per length and depth of `ruler_depths` (read twice with
    `jrt`: JRT-Prompt; `ruler_options`, e.g. `{"haystack": "noise"}`, to every task that
    takes them). Task checkpoints: `task_sizes` (required) and `task_samples` rows per
    size; passkey checkpoints: the passkey arguments and `lengths` (no text).
    `batch_size`: rows per forward call. Methods with a cache policy (`cache:...`) score
    text, passkey and task rows through the cache `cache_chunk` tokens per call; RULER
    prompts are prefilled in one call and decoded through it.
    """
    if not (isinstance(cache_chunk, int) and cache_chunk > 0):
        raise ValueError(f"cache_chunk must be a positive int; got {cache_chunk!r}")
    results = Results(workdir=str(workdir), step=checkpoint.step,
                      train_length=checkpoint.train_length, jrt=bool(jrt))
    d = checkpoint.config.data
    text = d.source != "task"
    if not text and d.task != PASSKEY:
        _evaluate_task(checkpoint, results, methods=methods, sizes=task_sizes,
                       samples=task_samples, batch_size=batch_size, cache_chunk=cache_chunk)
        return results
    if not (text or passkey_samples):
        raise ValueError("the checkpoint was trained on the passkey task: it is scored by "
                         "passkey rows alone; passkey_samples (--passkey_samples) must be >= 1")
    lengths = tuple(dict.fromkeys(lengths or default_lengths(checkpoint.train_length)))
    methods = tuple(dict.fromkeys(methods))
    _check_args(lengths, methods, num_tokens, stride, passkey_depths, batch_size,
                ruler_tasks, ruler_depths, ruler_options)
    models = _models(checkpoint, methods, lengths)
    if text:
        docs = load_token_docs(d, "validation", seed=checkpoint.config.seed,
                               tok=checkpoint.tokenizer)
        token_bytes = checkpoint.tokenizer.token_bytes()
        passages = text_passages(docs, length=max(lengths), num_tokens=num_tokens)
        results.scored_tokens = passages.size - len(passages)
    passkey_min = tasks.task_seq_len(PASSKEY)
    if passkey_samples and min(lengths) < passkey_min:
        logging.warning("No passkey below length %d (the needle and question)", passkey_min)
    for method in methods:
        for n in lengths:
            tick = time.perf_counter()
            model = models[method, n]
            chunk = cache_chunk if reads_through_cache(method) else None
            if text:
                _score_text(results, method, n, model, checkpoint.params, passages,
                            stride=stride, num_bins=num_bins, bin_spacing=bin_spacing,
                            batch_size=batch_size, token_bytes=token_bytes, cache_chunk=chunk)
            if passkey_samples and n >= passkey_min:
                accuracies = passkey_accuracy(
                    model, checkpoint.params, n, passkey_depths, samples=passkey_samples,
                    seed=checkpoint.config.seed + EVAL_SEED, batch_size=batch_size,
                    tok=checkpoint.tokenizer, cache_chunk=chunk)
                for depth, value in zip(passkey_depths, accuracies, strict=True):
                    results.add(method, f"{PASSKEY}@{depth:g}", n, {"accuracy": value})
                results.add(method, PASSKEY, n, {"accuracy": np.mean(accuracies)})
            for task in ruler_tasks if ruler_samples else ():
                _score_ruler(results, method, n, model, checkpoint, task, depths=ruler_depths,
                             samples=ruler_samples, batch_size=batch_size, jrt=jrt,
                             options=ruler_options)
            logging.info("%s at length %d: %s (%.1f s)", method, n, _summary(results, method, n),
                         time.perf_counter() - tick)
    return results


def _score_text(results, method, n, model, params, passages, *, stride, num_bins, bin_spacing,
                batch_size, token_bytes, cache_chunk) -> None:
    """Adds the bits per byte and perplexity of the passages at length `n` (non-overlapping
    and, unless `stride == 0`, sliding windows) and the loss curve to `results`."""
    score = functools.partial(score_rows, model, params, batch_size=batch_size,
                              cache_chunk=cache_chunk)
    windows = text_windows(passages, n, n)
    nll, _ = score(windows)
    results.add(method, NONOVERLAPPING, n,
                text_metrics(nll, windows["targets"], windows["weights"], token_bytes))
    results.loss_curves.extend(
        {"method": method, "length": n, "start": a, "stop": b, "count": c, "loss": loss}
        for a, b, c, loss in loss_per_position(nll, windows["weights"], num_bins=num_bins,
                                            spacing=bin_spacing))
    if stride == 0:
        return
    step, total = stride or max(1, n // 2), passages.shape[1] - 1
    if window_spans(total, n, step) != window_spans(total, n, n):  # else the same windows
        windows = text_windows(passages, n, step)
        nll, _ = score(windows)
    results.add(method, f"sliding:{stride or 'n/2'}", n,
                text_metrics(nll, windows["targets"], windows["weights"], token_bytes))


def _score_ruler(results, method, n, model, checkpoint, task, *, depths, samples,
                 batch_size, jrt, options) -> None:
    """Adds the RULER task's accuracy at length `n` (mean, and per depth) and its samples
    to `results`; a length too short for the task is skipped with a warning."""
    try:
        records = ruler.ruler_records(
            model, checkpoint.params, checkpoint.tokenizer, task=task, length=n,
            depths=depths, samples=samples, seed=checkpoint.config.seed + EVAL_SEED,
            batch_size=batch_size, method=method, jrt=jrt,
            options=task_options(task, options))
    except TooShort as e:
        logging.warning("No %s at length %d: %s", task, n, e)
        return
    results.ruler_samples.extend(records)
    results.add(method, f"{RULER}:{task}", n,
                {"accuracy": np.mean([r["score"] for r in records])})
    for depth, value in ruler.depth_means(records).items():
        if depth != "":
            results.add(method, f"{RULER}:{task}@{depth:g}", n, {"accuracy": value})


def _evaluate_task(checkpoint, results, *, methods, sizes, samples, batch_size,
                   cache_chunk) -> None:
    """Adds each method's accuracy per test size of the checkpoint's task to `results`."""
    task = checkpoint.config.data.task
    if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"the checkpoint was trained on task {task!r}; give its test sizes "
                         f"(task_sizes, --task_sizes) as ints >= 1; got {sizes!r}")
    if "max_length" not in tasks.TASKS.get(task, {}):
        raise ValueError(f"test sizes set min_length = max_length of a length task; task "
                         f"{task!r} has options {sorted(tasks.TASKS.get(task, {}))}")
    _check_args(sizes, methods, 1, None, (), batch_size)
    rows = {n: size_task_rows(checkpoint.config, n, samples=samples) for n in sizes}
    results.task_seq_lens = {n: r["tokens"].shape[1] for n, r in rows.items()}
    models = _models(checkpoint, methods, set(results.task_seq_lens.values()))
    for method in methods:
        for n in sizes:
            model = models[method, results.task_seq_lens[n]]
            _, hits = score_rows(model, checkpoint.params, rows[n], batch_size=batch_size,
                                 cache_chunk=cache_chunk if reads_through_cache(method)
                                 else None)
            results.add(method, f"task:{task}", n, accuracy(hits, rows[n]["weights"]))
            logging.info("%s at size %d: %s", method, n, _summary(results, method, n))


def _summary(results: Results, method: str, length: int) -> str:
    return ", ".join(f"{r['mode']} {r['metric']}={r['value']:.4g}" for r in results.rows
                     if r["method"] == method and r["length"] == length
                     and r["metric"] in ("bits_per_byte", "accuracy", "exact_match")
                     and "@" not in r["mode"])


def evaluate_workdir(workdir, **kwargs) -> Results:
    """`evaluate(load_checkpoint(workdir), **kwargs)`."""
    return evaluate(load_checkpoint(workdir), workdir=workdir, **kwargs)


def evaluate_hf(path, *, dtype="float32", train_length=None, data_path="",
                **kwargs) -> Results:
    """`evaluate(load_hf_checkpoint(path, ...), **kwargs)`: a Hugging Face checkpoint on
    the default corpus (or `data_path`'s files), tokenized by its own tokenizer."""
    checkpoint = load_hf_checkpoint(path, dtype=dtype, train_length=train_length,
                                    data_path=data_path)
    return evaluate(checkpoint, workdir=path, **kwargs)
