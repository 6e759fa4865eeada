"""Training: state, step, loop, checkpoints, metrics and the optimizer."""

from longjax.train.loop import evaluate, train_and_evaluate
from longjax.train.state import TrainState, build_model, create_train_state, state_shardings
from longjax.train.step import make_eval_step, make_train_step, process_rows, put_batch

__all__ = [
    "TrainState", "build_model", "create_train_state", "evaluate", "make_eval_step",
    "make_train_step", "process_rows", "put_batch", "state_shardings", "train_and_evaluate",
]
