"""longjax: long-sequence models in JAX/Flax.

Layers (dependencies point down): scripts -> train / eval / generate -> nn -> ops ->
pallas_kernels. See README.md for a tour.
"""

__version__ = "0.1.0"
