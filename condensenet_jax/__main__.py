"""`python -m condensenet_jax <command> ...`: the tools (see `condensenet_jax.cli`)."""

import sys

from condensenet_jax import cli

if __name__ == '__main__':
  sys.exit(cli.main())
