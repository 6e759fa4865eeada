"""Packaging for longjax: long-sequence models in JAX/Flax."""

from setuptools import find_packages, setup

# jax and flax lower bounds: the versions the test suite (kernels and lowering included)
# runs with; older releases are untested (Pallas' compiler parameters and lowering change
# between JAX releases).
CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "ml_collections>=1.0.0",
    "absl-py>=2.1.0",
    "tensorflow-datasets>=4.9.7",
    "array_record>=0.7.0",
    "importlib_resources>=6.0",  # tfds imports it when TensorFlow is absent
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "numpy>=1.26",
    "safetensors>=0.6",  # longjax.hf reads and writes checkpoints as numpy
    "tokenizers>=0.21",  # longjax.data.tokenizer reads a checkpoint's tokenizer.json
]

EXTRAS = {
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        "chex>=0.1.88",
        "ruff>=0.6",
        "nbformat>=5.9",  # tests/test_notebooks.py runs colab/ notebooks
        "nbclient>=0.10",
        "ipykernel>=6.29",
        "torch>=2.4",  # tests/test_hf*.py: transformers' models are the oracle
        "transformers>=5.0",
        # the TPU compiler: tests compile kernels and train steps for TPU topologies
        "libtpu>=0.0.52; platform_system == 'Linux'",
    ],
    # scripts/bench_ring.py's row for the ringattention package (Liu et al.'s JAX ring)
    "bench": ["ringattention>=0.1.2", "einops>=0.8"],
    "gpu": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "notebook": ["jupyter>=1.0", "nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6.29"],
}

setup(
    name="longjax",
    version="0.1.0",
    description="Long-sequence models in JAX/Flax: attention, SSMs, linear attention, "
    "sequence parallelism and length extrapolation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["longjax", "longjax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
