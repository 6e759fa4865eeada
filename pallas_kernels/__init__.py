"""Pallas kernels for GPU and TPU; each is tested on CPU through the interpreter."""
