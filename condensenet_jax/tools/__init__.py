"""The commands of `python -m condensenet_jax` (`condensenet_jax.cli`), one module each, each
with `HELP`, `add_arguments(parser)` and `run(args)`; `run` returns what it printed, for tests
and scripts."""
