"""Pure functions for the math of long-sequence models (no Flax)."""
