"""Draws a run's pictures: training curves, the learned connectivity, inputs kept per group.

    python -m condensenet_jax plot runs/digits

Writes `curves.png` (training loss, training and test accuracy, learning rate, with the
condensing stages and events marked) and, from the latest checkpoint's masks,
`connectivity.png` (for every dense block, which earlier layers' features each layer still
reads: the fraction of connections kept and their mean absolute weight) and
`kept_per_group.png` into the workdir (`--out` elsewhere); for a CondenseNetV2 also
`reactivation.png` (which earlier features each layer's SFR writes back to). Training draws
them at its end.
"""

import json
import os

from condensenet_jax import artifacts, plots

HELP = 'training curves, the learned connectivity map and inputs kept per group, as PNG'


def add_arguments(parser) -> None:
  parser.add_argument('workdir', help='a --workdir of train.py')
  parser.add_argument('--out', default=None, help='directory for the PNG files (default: the '
                      'workdir)')


def run(args) -> list[str]:
  if artifacts.kind(args.workdir) != 'workdir':
    raise ValueError(f'{args.workdir} is not a run directory (no checkpoints/ or summary.json); '
                     'give a --workdir of train.py.')
  item = artifacts.load(args.workdir, forms=('trained',))[0]
  out = args.out or args.workdir
  os.makedirs(out, exist_ok=True)
  summary = os.path.join(args.workdir, 'summary.json')
  events = None
  if os.path.isfile(summary):
    with open(summary) as f:
      events = json.load(f).get('condensing_event_steps')
  written = plots.write_all(args.workdir, item.model, item.variables, events, out, item.step)
  for path in written:
    print(path)
  return written
