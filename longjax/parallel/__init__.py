"""Meshes, logical axis rules, and sequence parallelism."""
