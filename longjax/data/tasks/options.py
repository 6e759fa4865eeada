"""A task's options over its defaults, checked the same way for every task family."""

from __future__ import annotations

from collections.abc import Mapping


def with_defaults(name: str, options: Mapping, defaults: Mapping[str, Mapping], *,
                  kind: str = "task", field: str = "task_options") -> dict:
    """`options` over `defaults[name]`; a ValueError names an unknown `kind` of task or an
    unknown option (`field`) with what is allowed."""
    if name not in defaults:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {sorted(defaults)}")
    unknown = set(options) - set(defaults[name])
    if unknown:
        raise ValueError(f"{name}: unknown {field} {sorted(unknown)}; allowed: "
                         f"{sorted(defaults[name])}")
    return {**defaults[name], **options}
