"""Benchmarks of condensenet_jax: throughput, compile time, per-operation profiles and the
official PyTorch code, each runnable with `python -m benchmarks.<name>`."""
