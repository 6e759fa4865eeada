"""The experiment config: defaults, `key=value` variants, and validation with clear errors.

Every config in `configs/` starts from `base_config()`; `get_config(arg)` applies the
arg string's overrides with `apply_arg`. `validate(config)` checks a finished config and
names the field and what is allowed when something is wrong.
"""

from __future__ import annotations

import ast
import json

import ml_collections
from ml_collections import config_dict

from longjax.data import decomposition, packing, tokenizer
from longjax.data.sources import SOURCES
from longjax.data.tasks import ruler_rows
from longjax.nn import registry
from longjax.nn.layers import MLPS
from longjax.nn.pattern import layer_mixers
from longjax.nn.position_bias import ABSOLUTE_EMBEDDINGS
from longjax.train import stages as stages_lib
from longjax.train.initial_state import INITIAL_STATES, carries

DTYPES = ("float32", "bfloat16")
PACKINGS = ("concat", "best_fit", "decomposition", "contiguous")


def _option_value(value):
    return config_dict.placeholder(object) if value is None else value


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (a small attention LM on the embedded corpus)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=-(-tokenizer.VOCAB_SIZE // 8) * 8,  # padded to a multiple of 8
        d_model=128, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=config_dict.placeholder(int), mlp_dim=512,
        mixer="attention", dtype="float32", norm_eps=1e-6, tie_embeddings=True, remat=False,
        # Absolute positions added to the embeddings: "none" | "sinusoidal" | "learned"
        # (a table of max_position rows); relative schemes are attention options.
        position_embedding="none", max_position=0,
        # Block and head variants (longjax.nn.lm; the Hugging Face families need them):
        # mlp "swiglu" | "geglu" | "none", post-norms, embeddings times sqrt(d_model),
        # tied logits divided by sqrt(d_model), final logit soft-cap.
        mlp="swiglu", post_norms=False, scale_embeddings=False, scale_tied_logits=True,
        final_logit_softcap=config_dict.placeholder(float),
        # One flax scan over the repeats of the mixer pattern's cycle instead of unrolled
        # layers (longjax.nn.lm): compile time independent of depth; parameters stacked.
        scan_layers=False,
    ))
    c.model.mixer_options = ml_collections.ConfigDict({
        name: {k: _option_value(v) for k, v in registry.mixer_defaults(name).items()}
        for name in registry.mixer_names()
    })
    c.data = ml_collections.ConfigDict(dict(
        source="stdlib", data_dir="", tfds_name="", text_field="text", train_split="train",
        eval_split="validation", path="", seq_len=256, batch_size=16,
        task="", task_options=ml_collections.ConfigDict(), eval_seq_lens=(),
        # Long-context recipes (longjax.data.best_fit, longjax.data.decomposition,
        # longjax.data.contiguous): "concat" | "best_fit" | "decomposition" | "contiguous"
        # (row k+1 of each batch slot continues row k: for train.initial_state="carry");
        # with "decomposition" a step is one
        # bucket's batch of batch_size * seq_len tokens, the bucket drawn by `curriculum`
        # (a name in decomposition.CURRICULA or odds like "64:4,128:2,256:1") over
        # `curriculum_cycles` cycles of the run.
        packing="concat", bucket_lengths=(64, 128, 256), curriculum="uniform",
        curriculum_cycles=1,
        # Positions in a training row (longjax.data.packing): "row" restarts them at 0 at
        # each row and document start (train short: positions < seq_len); "document"
        # continues a cut document's positions (on purpose only).
        positions="row",
        # PoSE (Zhu et al. 2023): > 0 spreads each training row's positions over this
        # length with random skips (config.data.positions must be "row"); 0 = off.
        pose_length=0,
        # A folder with a tokenizer.json (a checkpoint's); "" = bytes (longjax.data.tokenizer).
        tokenizer="",
        # RULER-style tasks mixed into a text source's training batches (longjax.data.
        # tasks.ruler_rows): `ruler_fraction` of each batch's rows are these tasks' prompts
        # followed by their answers, the loss on the answer only, weighted by
        # `ruler_answer_weight` per token (a row's answer is a few tokens against a text
        # row's seq_len). `ruler_options` go to every task that takes them (e.g.
        # haystack="noise"). `ruler_min_length` < 1: each row's prompt and answer take
        # ruler_min_length * seq_len .. seq_len tokens (then padding), so the answer's
        # absolute position varies. Evaluated as "ruler_len{n}" (full-length rows) next
        # to the validation split.
        ruler_tasks=(), ruler_fraction=0.5, ruler_answer_weight=1.0, ruler_min_length=1.0,
        ruler_options=ml_collections.ConfigDict(),
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1,
        weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, log_every=10, progress_bar=True,
        # Progressive length extension (longjax.train.stages): ((steps, seq_len, rope_base),
        # ...) run in order, steps summing to `steps`; () trains at data.seq_len throughout.
        stages=(),
        # The states recurrent layers start each row from (longjax.train.initial_state):
        # "zeros" | "carry" (the slot's previous row's final states; needs data.packing=
        # "contiguous") | "other_sequence" (another row's final states of the previous
        # step) | "noise" (Gaussian, std initial_state_noise_std).
        initial_state="zeros", initial_state_noise_std=1.0,
    ))
    # Start from a Hugging Face checkpoint directory (longjax.hf): its config.json replaces
    # config.model (then `model_overrides`, "key=value,..." under config.model, e.g.
    # "mixer_options.attention.rope_scaling=yarn"), its weights the initial parameters and
    # its tokenizer.json the bytes ("" = random initialisation, byte tokens).
    c.init = ml_collections.ConfigDict(dict(hf="", model_overrides=""))
    c.eval = ml_collections.ConfigDict(dict(every_steps=250, num_batches=-1, batch_size=32))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=250, keep=2))
    c.parallel = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    return c


def saved_config(text: str) -> ml_collections.ConfigDict:
    """A run's `config.json` text as a ConfigDict, with the fields that longjax added
    after the run was saved filled from `base_config()` (so an old workdir evaluates
    under options it predates, e.g. `cache_budget`)."""
    config = ml_collections.ConfigDict(json.loads(text))
    # The defaults as JSON gives them (lists, not tuples), like the saved fields.
    _fill_missing(config, ml_collections.ConfigDict(json.loads(json.dumps(
        base_config().to_dict()))))
    return config


def _fill_missing(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict):
    for key, value in defaults.items():
        if key not in config:
            config[key] = value
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(
                config[key], ml_collections.ConfigDict):
            _fill_missing(config[key], value)


def with_hf_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with `config.model` from the checkpoint `config.init.hf` (compute dtype and
    remat kept; `config.init.model_overrides` applied after) and its tokenizer as
    `config.data.tokenizer` unless one is set; unchanged when `config.init.hf` is ""."""
    if not config.init.hf:
        return config
    if config.model.scan_layers:
        raise ValueError("config.init.hf reads unrolled layers; config.model.scan_layers "
                         "must be False")
    from longjax import hf  # longjax.hf builds on this module's base_config

    config = ml_collections.ConfigDict(config.to_dict())
    model = hf.model_config(hf.read_config(config.init.hf), dtype=config.model.dtype)
    model.remat = config.model.remat
    config.model = model
    config.data.tokenizer = config.data.tokenizer or config.init.hf
    overrides = parse_arg(config.init.model_overrides)
    return apply_overrides(config, {f"model.{k}": v for k, v in overrides.items()})


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets: `"m=(a,b)*2,n=1"` -> two items."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def parse_arg(arg: str | None) -> dict[str, object]:
    """`"a=1,model.mixer=mamba"` -> `{"a": 1, "model.mixer": "mamba"}` (Python literals;
    commas inside brackets stay in their value: `mixer=(mamba,attention)*2`,
    `eval_seq_lens=(64,128)`)."""
    overrides = {}
    for item in filter(None, _split_top_level(arg or "")):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config arg item {item!r} is not key=value")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        overrides[key.strip()] = value
    return overrides


# Short names usable in every config's arg string: the field they set.
SHORT_NAMES = {"mixer": "model.mixer", "steps": "train.steps", "seq_len": "data.seq_len",
               "batch_size": "data.batch_size", "d_model": "model.d_model",
               "num_layers": "model.num_layers", "dtype": "model.dtype",
               "lr": "train.learning_rate"}


def apply_arg(config: ml_collections.ConfigDict, arg: str | None):
    """Applies a `get_config` arg string: `preset=<hybrid preset>` (see
    `longjax.nn.presets`), short names from `SHORT_NAMES`, or dotted field paths."""
    overrides = parse_arg(arg)
    if "preset" in overrides:
        apply_preset(config, str(overrides.pop("preset")))
    return apply_overrides(config, {SHORT_NAMES.get(k, k): v for k, v in overrides.items()})


def apply_preset(config: ml_collections.ConfigDict, name: str):
    """Sets `config.model.mixer` and its mixer options from the hybrid preset `name`."""
    from longjax.nn.presets import preset  # the presets name mixers of every family

    overrides = preset(name)
    config.model.mixer = overrides["mixer"]
    for mixer, options in overrides["mixer_options"].items():
        apply_overrides(config, {f"model.mixer_options.{mixer}.{k}": v
                                 for k, v in options.items()})
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, object]):
    """Sets dotted fields; unknown fields and wrong types raise a ValueError naming them."""
    for dotted, value in overrides.items():
        parent, leaf = lookup_parent(config, dotted)
        current = parent[leaf]
        if isinstance(current, bool) != isinstance(value, bool) and current is not None:
            raise ValueError(f"config.{dotted} expects {type(current).__name__}; got {value!r}")
        try:
            parent[leaf] = value
        except TypeError as e:
            raise ValueError(f"config.{dotted} expects {type(current).__name__}; "
                             f"got {value!r}") from e
    return config


def lookup_parent(config: ml_collections.ConfigDict, dotted: str):
    """The ConfigDict holding `dotted` and its last key; ValueError if a field is unknown."""
    node, parts = config, dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(["config", *parts[:depth]])
            allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ValueError(f"unknown config field config.{dotted}: {where} has no field "
                             f"{part!r}; allowed: {allowed}")
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _positive(config, *fields):
    for dotted in fields:
        parent, leaf = lookup_parent(config, dotted)
        value = parent[leaf]
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.{dotted} must be a positive number; got {value!r}")


def validate(config: ml_collections.ConfigDict, *, num_data_shards: int = 1,
             num_sequence_shards: int = 1) -> None:
    """Raises ValueError naming the first bad field and what is allowed."""
    m, d, t = config.model, config.data, config.train
    if m.mlp not in MLPS:
        raise ValueError(f"config.model.mlp={m.mlp!r}; allowed: {list(MLPS)}")
    _positive(config, *(["model.mlp_dim"] if m.mlp != "none" else []))
    _positive(config, "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
              "model.num_kv_heads", "data.seq_len", "data.batch_size",
              "train.steps", "train.learning_rate", "train.log_every", "eval.every_steps",
              "eval.batch_size", "checkpoint.every_steps", "checkpoint.keep")
    vocab = tokenizer.load(d.get("tokenizer")).vocab_size
    if m.vocab_size < vocab:
        raise ValueError(f"config.model.vocab_size={m.vocab_size} is below the tokenizer's "
                         f"{vocab} ids")
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"config.model.num_heads={m.num_heads} must be a multiple of "
                         f"config.model.num_kv_heads={m.num_kv_heads}")
    if m.head_dim is None and m.d_model % m.num_heads:
        raise ValueError(f"config.model.d_model={m.d_model} is not divisible by "
                         f"config.model.num_heads={m.num_heads}; set config.model.head_dim")
    if m.position_embedding not in ABSOLUTE_EMBEDDINGS:
        raise ValueError(f"config.model.position_embedding={m.position_embedding!r}; allowed: "
                         f"{list(ABSOLUTE_EMBEDDINGS)}")
    if m.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r}; allowed: {list(DTYPES)}")
    for name in layer_mixers(m.mixer, m.num_layers):
        registry.mixer_options(name, m)  # unknown mixer or option -> ValueError
    if d.source not in SOURCES:
        raise ValueError(f"config.data.source={d.source!r}; allowed: {list(SOURCES)}")
    if d.batch_size % num_data_shards or config.eval.batch_size % num_data_shards:
        raise ValueError(
            f"config.data.batch_size={d.batch_size} and config.eval.batch_size="
            f"{config.eval.batch_size} must divide evenly over the {num_data_shards} "
            "data-parallel shards (config.parallel data x fsdp)")
    if not 0 <= t.warmup_steps < t.steps:
        raise ValueError(f"config.train.warmup_steps={t.warmup_steps} must be in "
                         f"[0, config.train.steps={t.steps})")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ValueError(f"config.train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if not t.grad_clip >= 0:
        raise ValueError(f"config.train.grad_clip={t.grad_clip} must be >= 0 (0: no clipping)")
    if config.eval.num_batches == 0 or config.eval.num_batches < -1:
        raise ValueError(f"config.eval.num_batches={config.eval.num_batches} must be positive, "
                         "or -1 for the whole split")
    _validate_recipes(config, num_data_shards)
    _validate_ruler_mix(config)
    _validate_initial_state(config, num_sequence_shards)
    _validate_sequence_shards(config, num_sequence_shards)
    stages = stages_lib.schedule(config)
    longest = max([*d.eval_seq_lens, d.pose_length, *(s.seq_len for s in stages),
                   *(s.pose_length for s in stages)])
    if m.position_embedding == "learned" and d.positions == "document":
        raise ValueError("config.data.positions='document' feeds positions past the learned "
                         "position table (config.model.position_embedding='learned'); use "
                         "'row'")
    if m.position_embedding == "learned" and m.max_position < longest:
        raise ValueError(f"config.model.max_position={m.max_position} must cover the longest "
                         f"length the model runs at ({longest}) with learned positions")


def _validate_ruler_mix(config) -> None:
    """`config.data.ruler_tasks` and its fraction and weight; each training length fits
    at least one task with its answer, the longest fits every task."""
    d = config.data
    if not d.ruler_tasks:
        return
    if d.source == "task" or d.packing not in ("concat", "best_fit"):
        raise ValueError("config.data.ruler_tasks mixes rows into a text source's batches: "
                         "it needs config.data.source in "
                         f"{[s for s in SOURCES if s != 'task']} and packing 'concat' or "
                         f"'best_fit'; got source={d.source!r}, packing={d.packing!r}")
    if not 0 < d.ruler_fraction <= 1:
        raise ValueError(f"config.data.ruler_fraction={d.ruler_fraction!r} must be in (0, 1]")
    if not 0 < d.ruler_min_length <= 1:
        raise ValueError(f"config.data.ruler_min_length={d.ruler_min_length!r} must be in "
                         "(0, 1]: the shortest training row as a fraction of seq_len")
    _positive(config, "data.ruler_answer_weight")
    tok = tokenizer.load(d.get("tokenizer"))
    lengths = sorted({s.seq_len for s in stages_lib.schedule(config)})
    for length in lengths:
        shortest = ruler_rows.shortest_row(d.ruler_min_length, length) or length
        try:
            fitting = ruler_rows.fitting_tasks(d.ruler_tasks, shortest, tok,
                                               d.ruler_options.to_dict())
        except ValueError as e:
            raise ValueError(f"config.data.ruler_tasks={tuple(d.ruler_tasks)!r}, "
                             f"config.data.ruler_options={d.ruler_options.to_dict()}: {e}"
                             ) from None
        if not fitting or (length == lengths[-1] and len(fitting) < len(d.ruler_tasks)):
            raise ValueError(f"config.data.ruler_tasks={tuple(d.ruler_tasks)!r}: only "
                             f"{list(fitting)} fit training rows of {shortest} tokens "
                             f"(seq_len={length}, config.data.ruler_min_length="
                             f"{d.ruler_min_length}) with their answers; the longest length "
                             "must fit every task, the others at least one")


def _validate_initial_state(config, sequence_shards: int) -> None:
    """`config.train.initial_state` and the data it needs (longjax.train.initial_state)."""
    t, d = config.train, config.data
    if t.initial_state not in INITIAL_STATES:
        raise ValueError(f"config.train.initial_state={t.initial_state!r}; allowed: "
                         f"{list(INITIAL_STATES)}")
    if not t.initial_state_noise_std >= 0:
        raise ValueError(f"config.train.initial_state_noise_std={t.initial_state_noise_std} "
                         "must be >= 0")
    if t.initial_state == "carry" and d.packing != "contiguous":
        raise ValueError("config.train.initial_state='carry' continues each batch slot's "
                         "previous row, which needs config.data.packing='contiguous'; got "
                         f"{d.packing!r}")
    if t.initial_state == "zeros":
        return
    if sequence_shards > 1:
        raise ValueError(f"config.train.initial_state={t.initial_state!r} is not supported "
                         f"with the sequence split over config.parallel.sequence="
                         f"{sequence_shards} devices; use 'zeros' or sequence=1")
    if carries(t) and (t.stages or d.packing == "decomposition"):
        raise ValueError(f"config.train.initial_state={t.initial_state!r} carries states of "
                         "config.data.batch_size rows from step to step, so the batch size "
                         "must not change: not with config.train.stages or "
                         "config.data.packing='decomposition'")


def _validate_sequence_shards(config, shards: int) -> None:
    """Every length the model runs at splits evenly over the `sequence` mesh axis (into
    2 x shards chunks when an attention layer uses the zigzag layout)."""
    if shards == 1:
        return
    m = config.model
    zigzag = any(registry.mixer_options(name, m).get("layout") == "zigzag"
                 for name in layer_mixers(m.mixer, m.num_layers))
    multiple = 2 * shards if zigzag else shards
    lengths = {"config.data.seq_len": [config.data.seq_len],
               "config.data.eval_seq_lens": list(config.data.eval_seq_lens),
               "config.train.stages": [s.seq_len for s in stages_lib.schedule(config)]}
    for field, values in lengths.items():
        bad = [n for n in values if n % multiple]
        if bad:
            raise ValueError(
                f"{field} has length {bad[0]}, which does not split over "
                f"config.parallel.sequence={shards} devices: lengths must be multiples of "
                f"{multiple}" + (" (2 x sequence, for the zigzag layout)" if zigzag else ""))


def _validate_recipes(config, num_data_shards: int) -> None:
    """Packing, dataset decomposition, curriculum, length stages and evaluation lengths."""
    d = config.data
    if d.positions not in packing.POSITIONS:
        raise ValueError(f"config.data.positions={d.positions!r}; allowed: "
                         f"{list(packing.POSITIONS)}")
    pose_length = max(d.pose_length, *(s.pose_length for s in stages_lib.schedule(config)))
    if pose_length and (d.positions != "row" or d.packing not in ("concat", "best_fit")
                        or d.source == "task"):
        raise ValueError(f"PoSE (config.data.pose_length or a 'pose:N' stage) needs a text "
                         "source with config.data.positions='row' and 'concat' or 'best_fit' "
                         f"packing; got positions={d.positions!r}, packing={d.packing!r}, "
                         f"source={d.source!r}")
    if d.packing not in PACKINGS:
        raise ValueError(f"config.data.packing={d.packing!r}; allowed: {list(PACKINGS)}")
    bad_lens = [n for n in d.eval_seq_lens if not isinstance(n, int) or n < 1]
    if bad_lens:
        raise ValueError(f"config.data.eval_seq_lens={tuple(d.eval_seq_lens)!r} must be "
                         "positive whole numbers")
    stages = stages_lib.schedule(config)
    for i, stage in enumerate(stages):
        batch = d.batch_size * d.seq_len // stage.seq_len
        if config.train.stages and batch % num_data_shards:
            raise ValueError(f"config.train.stages[{i}] (seq_len={stage.seq_len}) trains "
                             f"batches of {batch} rows, which do not divide over the "
                             f"{num_data_shards} data-parallel shards")
    if d.packing == "contiguous" and d.source == "task":
        raise ValueError("config.data.packing='contiguous' needs a text source; "
                         "config.data.source is 'task'")
    if d.packing != "decomposition":
        return
    if d.source == "task":
        raise ValueError("config.data.packing='decomposition' needs a text source; "
                         "config.data.source is 'task'")
    if config.train.stages:
        raise ValueError("config.train.stages cannot be combined with config.data.packing="
                         "'decomposition' (the buckets set the lengths); use 'concat' or "
                         "'best_fit' packing")
    lengths = decomposition.check_bucket_lengths(d.bucket_lengths)
    decomposition.curriculum_odds(d.curriculum, lengths)
    tokens_per_step = d.batch_size * d.seq_len
    for n in lengths:
        if tokens_per_step % n or (tokens_per_step // n) % num_data_shards:
            raise ValueError(
                f"config.data.bucket_lengths entry {n}: the tokens per step (config.data."
                f"batch_size x seq_len = {tokens_per_step}) must be a multiple of {n} "
                f"whose batch of {tokens_per_step // n if tokens_per_step >= n else 0} rows "
                f"divides over the {num_data_shards} data-parallel shards")
    cycles = d.curriculum_cycles
    if not isinstance(cycles, int) or not 1 <= cycles <= config.train.steps:
        raise ValueError(f"config.data.curriculum_cycles={cycles!r} must be a whole number "
                         f"in [1, config.train.steps={config.train.steps}]")
