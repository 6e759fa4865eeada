"""Orbax checkpoints of the train state and the data position, with resume checks."""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp

from longjax.nn import registry
from longjax.train.config import base_config


class Checkpointer:
    """Saves every `every_steps` (keeping `keep`) and restores the latest checkpoint
    (with the train state's carried recurrent states, `longjax.train.initial_state`).

    The workdir's `config.json` records the config; resuming with a different
    `config.model`, or onto a checkpoint whose arrays differ from the model's, is refused
    with a ValueError that names the difference.
    """

    def __init__(self, workdir, config):
        self.workdir = pathlib.Path(workdir)
        self.config = config
        self.manager = ocp.CheckpointManager(
            (self.workdir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, state):
        """(state, data_state) from the latest checkpoint, or (state, None) if there is none.

        `state` is the freshly initialised state: its shapes and shardings are the target.
        """
        step = self.manager.latest_step()
        if step is None:
            return state, None
        self._check_config()
        self._check_arrays(step, state)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        # A run that switches carried states on (`config.train.initial_state`, e.g. a
        # post-training stage) starts them afresh from a checkpoint that has none.
        fresh_carry = (self.manager.item_metadata(step)["state"].get("carry") is None
                       and state.carry is not None)
        if fresh_carry:
            target = target.replace(carry=None)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        if fresh_carry:
            return restored["state"].replace(carry=state.carry), restored["data"]
        return restored["state"], restored["data"]

    def write_config(self) -> None:
        """`config.json` in the workdir (by process 0), unless it is there."""
        path = self.workdir / "config.json"
        if jax.process_index() == 0 and not path.exists():
            path.write_text(self.config.to_json(indent=2))

    def _check_config(self) -> None:
        path = self.workdir / "config.json"
        if not path.exists():
            return
        saved = _with_new_defaults(json.loads(path.read_text())["model"])
        current = json.loads(self.config.model.to_json())
        diffs = [f"{key}: checkpoint {saved.get(key)!r} vs config {current.get(key)!r}"
                 for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
        if diffs:
            raise ValueError(
                f"workdir {self.workdir} holds a checkpoint of a different model; differing "
                f"config.model fields: {'; '.join(diffs)}. Use a new --workdir or the same model.")

    def _check_arrays(self, step: int, state) -> None:
        saved = _param_shapes(self.manager.item_metadata(step)["state"]["params"])
        wanted = _param_shapes(state.params)
        diffs = [f"{key}: checkpoint {saved.get(key)} vs model {wanted.get(key)}"
                 for key in sorted(set(saved) | set(wanted)) if saved.get(key) != wanted.get(key)]
        if diffs:
            more = f"; and {len(diffs) - 5} more" if len(diffs) > 5 else ""
            shown = "; ".join(diffs[:5]) + more
            raise ValueError(f"the checkpoint in {self.workdir} (step {step}) does not match the "
                             f"model: {shown}. Use a new --workdir or the model it was made with.")


def _with_new_defaults(model: dict) -> dict:
    """The saved `config.model` with fields and mixer options added since it was saved at
    their defaults, so a workdir from an older longjax still resumes."""
    model = {**base_config().model.to_dict(), **model}
    options = model.get("mixer_options") or {}
    for name in registry.mixer_names():  # mixers registered since, too
        options[name] = {**registry.mixer_defaults(name), **options.get(name, {})}
    return json.loads(json.dumps(model))  # as JSON holds them: a tuple default is a list


def _param_shapes(params) -> dict[str, tuple[int, ...]]:
    """`{"layer_0/mixer/query/kernel": shape}` for a params tree or its checkpoint metadata."""
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)

    return {name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
