"""Per-layer mixer patterns: `"attention"`, `"mamba,mamba,attention"`, `"(rglru,rglru,swa)*4"`.

A pattern is a comma-separated list of items; an item is a mixer name or a parenthesised
pattern followed by `*k`. The expanded list is repeated cyclically to fill `num_layers`
and must divide it evenly.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\s*(?:(\()|(\))\s*(?:\*\s*(\d+))?|([A-Za-z_][\w\-]*)\s*(?:\*\s*(\d+))?|(,))")


def expand_pattern(pattern: str) -> list[str]:
    """Expands the pattern's groups and repeats into a flat list of mixer names."""
    stack: list[list[str]] = [[]]
    pos, expect_item = 0, True
    text = pattern.strip()
    if not text:
        raise ValueError("config.model.mixer is empty; give a mixer name or a pattern")
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"config.model.mixer {pattern!r}: cannot parse at {text[pos:]!r}")
        pos = match.end()
        open_, close, close_rep, name, name_rep, comma = match.groups()
        if open_:
            stack.append([])
        elif close:
            if len(stack) == 1 or expect_item:
                raise ValueError(f"config.model.mixer {pattern!r}: unbalanced or empty ( )")
            group = stack.pop() * int(close_rep or 1)
            stack[-1].extend(group)
            expect_item = False
            continue
        elif name:
            stack[-1].extend([name] * int(name_rep or 1))
            expect_item = False
            continue
        elif comma and expect_item:
            raise ValueError(f"config.model.mixer {pattern!r}: empty item before ','")
        expect_item = True
    if len(stack) != 1 or expect_item:
        raise ValueError(f"config.model.mixer {pattern!r}: unbalanced ( ) or trailing ','")
    if not stack[0]:
        raise ValueError(f"config.model.mixer {pattern!r} expands to no layers")
    return stack[0]


def layer_mixers(pattern: str, num_layers: int) -> list[str]:
    """The mixer name of each of `num_layers` layers."""
    names = expand_pattern(pattern)
    if num_layers % len(names):
        raise ValueError(
            f"config.model.mixer {pattern!r} has {len(names)} layers per cycle, which does not "
            f"divide config.model.num_layers={num_layers}"
        )
    return names * (num_layers // len(names))
