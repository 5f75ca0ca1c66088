"""The command line of the tools: `python -m condensenet_jax <command> ...` (or `condensenet`
once the package is installed).

    evaluate  top-1, top-5, loss, FLOPs and speed of a run, a condensed model or an official file
    inspect   a per-layer table: channels, groups, inputs kept, FLOPs and params in both forms
    plot      training curves, the learned connectivity map, inputs kept per group (PNG)
    compare   runs that differ only in the seed, grouped: mean +- std of their results
    export    the condensed model as a jax.export artifact or a TFLite file, preprocessing inside
    predict   classify image files with a condensed model or an exported artifact

Every command has `--help`. A mistake (a missing or half-written run, weights that do not fit,
an unreadable image, a dataset that is not prepared) ends in one `error: ...` line and exit
code 1, and nothing is overwritten.
"""

import argparse
import importlib
import sys
from typing import Optional

# command -> module of condensenet_jax.tools with `HELP`, `add_arguments(parser)`, `run(args)`
COMMANDS = {'evaluate': 'evaluate', 'inspect': 'inspection', 'plot': 'plot',
            'compare': 'compare', 'export': 'export', 'predict': 'predict'}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m condensenet_jax',
      description='Tools for CondenseNet runs, condensed models and official weights.')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  for name, module in COMMANDS.items():
    tool = importlib.import_module(f'condensenet_jax.tools.{module}')
    sub = commands.add_parser(name, help=tool.HELP, description=tool.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    tool.add_arguments(sub)
    sub.set_defaults(run=tool.run)
  return parser


def one_line(error: BaseException) -> str:
  """The first line of an error's message (tools' messages are one line already)."""
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0]


def main(argv: Optional[list[str]] = None) -> int:
  """Runs one command; returns the exit code (0, or 1 after one `error:` line)."""
  args = _parser().parse_args(argv)
  from condensenet_jax import data  # pylint: disable=g-import-not-at-top  # after --help
  try:
    args.run(args)
  except (ValueError, FileNotFoundError, data.DatasetUnavailableError) as e:
    print(f'error: {one_line(e)}', file=sys.stderr)
    return 1
  return 0
