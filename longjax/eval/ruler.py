"""RULER-style evaluation (Hsieh et al. 2024): a model continues each task prompt of
`longjax.data.tasks.ruler` greedily, and a sample scores as RULER scores it: the share of
its expected strings found in the generation, case-insensitive (RULER's
`string_match_all`; 1.0 only when every answer is there). Scores are averaged per task,
length and needle depth (`longjax.eval.extrapolation.evaluate(ruler_tasks=...)` adds them
to its results; `longjax.eval.report` draws the heatmaps).

    records = ruler_records(model, params, tok, task="niah_multikey", length=4096,
                            depths=(0, 0.5, 1), samples=5, seed=0, batch_size=4)

Each sample is generated for as many tokens as its answers take written out (", "
between them) plus `SLACK_TOKENS`, where RULER gives each task a fixed budget. With
`jrt=True` every prompt is read twice (JRT-Prompt, `longjax.data.tasks.jrt`): its
context repeated before the question, so a prompt of length n holds n + its context's
tokens; the records keep n as the length.
"""

from __future__ import annotations

import numpy as np

from longjax.data.tasks.jrt import jrt_sample
from longjax.data.tasks.ruler import DEPTH_TASKS, Sample, ruler_sample
from longjax.generate import generate

SLACK_TOKENS = 16
RECORD_FIELDS = ("method", "task", "length", "depth", "sample", "score", "answers",
                 "generation")


def recall(generation: str, answers) -> float:
    """The share of `answers` that occur in `generation`, ignoring case."""
    text = generation.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def answer_tokens(tok, answers) -> int:
    """Tokens to generate for `answers`: their text joined by ", ", plus `SLACK_TOKENS`."""
    return len(tok.encode(" " + ", ".join(answers), add_bos=False, add_eos=False)) + \
        SLACK_TOKENS


def task_samples(task: str, *, length: int, depths, samples: int, seed: int,
                 tok, jrt: bool = False, options=None) -> list[Sample]:
    """`samples` prompts of `task` (its `options` over the defaults) at each of `depths`
    (once, undepthed, for the word tasks): sample i of every depth shares its keys and
    values; with `jrt` each prompt's context is read twice."""
    depths = depths if task in DEPTH_TASKS else (None,)
    prompts = [ruler_sample(task, length=length, seed=seed, index=i, depth=depth, tok=tok,
                            **(options or {}))
               for depth in depths for i in range(samples)]
    return [jrt_sample(s) for s in prompts] if jrt else prompts


def generations(model, params, tok, prompts, *, max_new_tokens: int,
                batch_size: int) -> list[str]:
    """The greedy continuation of each prompt (equal lengths) as text, `batch_size` rows
    per call (the last call repeats the last prompt, so every call has one shape)."""
    texts = []
    size = min(batch_size, len(prompts))
    for start in range(0, len(prompts), size):
        batch = [prompts[min(i, len(prompts) - 1)] for i in range(start, start + size)]
        out = generate(model, params, batch, max_new_tokens=max_new_tokens,
                       eos_id=tok.eos_id, pad_id=tok.pad_id)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        texts += [tok.decode(tokens[b, :lengths[b]]) for b in range(size)]
    return texts[:len(prompts)]


def ruler_records(model, params, tok, *, task: str, length: int, depths, samples: int,
                  seed: int, batch_size: int, method: str = "none",
                  jrt: bool = False, options=None) -> list[dict]:
    """One record per sample of `task_samples`: `RECORD_FIELDS` (depth "" for the word
    tasks; answers joined by "|"). Raises `longjax.data.tasks.ruler.TooShort` when the
    length does not hold the task."""
    prompts = task_samples(task, length=length, depths=depths, samples=samples, seed=seed,
                           tok=tok, jrt=jrt, options=options)
    budget = max(answer_tokens(tok, s.answers) for s in prompts)
    texts = generations(model, params, tok, [s.tokens for s in prompts],
                        max_new_tokens=budget, batch_size=batch_size)
    return [{"method": method, "task": task, "length": length,
             "depth": "" if s.depth is None else s.depth, "sample": i % samples,
             "score": recall(text, s.answers), "answers": "|".join(s.answers),
             "generation": text}
            for i, (s, text) in enumerate(zip(prompts, texts, strict=True))]


def depth_means(records) -> dict[float | str, float]:
    """The mean score per depth of one task's records ("" for the undepthed)."""
    depths = dict.fromkeys(r["depth"] for r in records)
    return {d: float(np.mean([r["score"] for r in records if r["depth"] == d]))
            for d in depths}
