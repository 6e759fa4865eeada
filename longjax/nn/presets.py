"""Hybrid-model presets: `config.model` overrides naming a per-layer mixer pattern.

Each preset gives `mixer` (a pattern, see `longjax.nn.pattern`; `num_layers` must be a
multiple of its cycle) and `mixer_options` per mixer name:

- `griffin`: two RG-LRU blocks then one local (sliding-window) attention, window 1024 in
  the paper (De et al. 2024, "Griffin").
- `samba`: Mamba and sliding-window attention alternating, window 2048 (Ren et al. 2024,
  "Samba").
- `jamba`: one attention layer per eight, the others Mamba, attention without positional
  encoding (Lieber et al. 2024, "Jamba"; its MoE layers are not modelled).
- `based`: Taylor linear attention and small sliding-window attention alternating, window
  64 (Arora et al. 2024, "Based").
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "griffin": {
        "mixer": "(rglru,rglru,swa)",
        "mixer_options": {"swa": {"window": 1024}},
    },
    "samba": {
        "mixer": "(mamba,swa)",
        "mixer_options": {"swa": {"window": 2048}},
    },
    "jamba": {
        "mixer": "(mamba*4,attention,mamba*3)",
        "mixer_options": {"attention": {"rope_fraction": 0.0}},
    },
    "based": {
        "mixer": "(based,swa)",
        "mixer_options": {"swa": {"window": 64}},
    },
}


def preset(name: str) -> dict:
    """The `config.model` overrides of preset `name` (a fresh copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    overrides = PRESETS[name]
    return {"mixer": overrides["mixer"],
            "mixer_options": {k: dict(v) for k, v in overrides["mixer_options"].items()}}
