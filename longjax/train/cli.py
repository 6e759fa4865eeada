"""Clear errors for command-line config overrides, before absl parses them.

`config_flags` reports an unknown `--config.a.b=...` field as a bare `AttributeError`;
this check names the field, says which fields exist there, and checks the value's type.
"""

from __future__ import annotations

import ast
import importlib.util
import sys

from longjax.train.config import lookup_parent


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("longjax_user_config", path)
    if module_spec is None:
        raise ValueError(f"--config={spec}: {path!r} is not a Python config file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except FileNotFoundError as e:
        raise ValueError(f"--config={spec}: no such file {path!r}") from e
    return module.get_config(arg or None)


def _config_flags(argv):
    """`(config spec, {dotted field: text})` from argv."""
    spec, overrides, args = None, {}, iter(argv[1:])
    for item in args:
        if item in ("--config", "-config"):
            spec = next(args, None)
        elif item.startswith(("--config=", "-config=")):
            spec = item.split("=", 1)[1]
        elif item.startswith(("--config.", "-config.")):
            name, sep, value = item.lstrip("-")[len("config."):].partition("=")
            overrides[name] = value if sep else next(args, "")
    return spec, overrides


def _check_type(dotted, current, text):
    if current is None or isinstance(current, str):
        return
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool):
        ok = isinstance(value, bool) or text.lower() in ("true", "false")
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif isinstance(current, tuple):
        ok = isinstance(value, tuple | list | int | float | str)
    else:
        ok = True
    if not ok:
        raise ValueError(f"--config.{dotted}={text}: config.{dotted} expects "
                         f"{type(current).__name__} (it is {current!r})")


def check_config_overrides(argv) -> None:
    """Exits with a clear message if a `--config.*` override names no field or has the
    wrong type; does nothing when there is no `--config`."""
    spec, overrides = _config_flags(argv)
    if not spec or not overrides:
        return
    try:
        config = load_config_file(spec)
        for dotted, text in overrides.items():
            parent, leaf = lookup_parent(config, dotted)
            _check_type(dotted, parent[leaf], text)
    except ValueError as e:
        sys.exit(f"error: {e}")
