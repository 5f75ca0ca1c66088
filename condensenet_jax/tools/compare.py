"""Compares runs: runs whose configs differ only in the seed form one group, with the mean and
standard deviation of their results.

    python -m condensenet_jax compare runs/digits_s0 runs/digits_s1 runs/digits_s2
    python -m condensenet_jax compare runs/* --csv compare.csv --plot compare.png

Reads each run's summary.json and its config (from its latest checkpoint); prints a markdown
table with, per group: the number of seeds, test accuracy and condensed test accuracy (mean
+- sample standard deviation), FLOPs and params of both forms, and wall time. `--csv` writes
the same rows, `--plot` a bar chart of the accuracies with their spread.
"""

import csv
import json
import os

import numpy as np
from flax import traverse_util

from condensenet_jax import artifacts
from condensenet_jax.tools import common

HELP = 'group runs that differ only in the seed; mean +- std of their results'

# Config fields (or groups of them) that do not change what a run computes; the renamed
# execution fields of earlier versions among them.
IGNORED = ('seed', 'compilation_cache_dir', 'data_dir', 'log_every_steps',
           'checkpoint_every_steps', 'keep_checkpoints', 'execution', 'cpu_convolutions',
           'eval_chunk', 'model.conv_lowering', 'model.dense_blocks', 'model.gathers')
COLUMNS = ('group', 'runs', 'seeds', 'accuracy', 'condensed_accuracy', 'flops', 'params',
           'condensed_flops', 'condensed_params', 'wall_seconds')


def add_arguments(parser) -> None:
  parser.add_argument('workdirs', nargs='+', help='finished runs (--workdir of train.py)')
  parser.add_argument('--csv', default=None, help='also write the table as CSV here')
  parser.add_argument('--plot', default=None, help='also draw the accuracies into this PNG')


def _read(workdir: str) -> tuple[dict, dict]:
  path = os.path.join(workdir, 'summary.json')
  if not os.path.isfile(path):
    raise ValueError(f'{workdir} has no summary.json: the run has not finished; finish it '
                     '(run its train.py command again) or leave it out.')
  with open(path) as f:
    summary = json.load(f)
  config = traverse_util.flatten_dict(artifacts.run_config(workdir).to_dict(), sep='.')
  return summary, config


def _mean_std(values, digits: int = 4) -> str:
  values = np.asarray([v for v in values if v is not None], np.float64)
  if not values.size:
    return ''
  if values.size == 1:
    return f'{values[0]:.{digits}f}'
  return f'{values.mean():.{digits}f} +- {values.std(ddof=1):.{digits}f}'


def groups(workdirs: list[str]) -> list[dict]:
  """One row per group of runs whose configs differ only in `IGNORED` fields."""
  runs = [(w,) + _read(w) for w in workdirs]
  grouped = {}
  for workdir, summary, config in runs:
    key = tuple(sorted((k, repr(v)) for k, v in config.items()
                       if k not in IGNORED and k.split('.')[0] not in IGNORED))
    grouped.setdefault(key, []).append((workdir, summary, config))
  rows = []
  for members in grouped.values():
    summaries = [s for _, s, _ in members]
    first = summaries[0]
    config = members[0][2]
    name = (f"{config.get('dataset')} {config.get('model.name')} "
            f"{'-'.join(str(n) for n in config.get('model.stages', ()))}")
    if any(r['group'] == name for r in rows):  # same model, other settings
      name += f' ({len(rows) + 1})'
    rows.append({
        'group': name,
        'runs': ' '.join(os.path.basename(os.path.normpath(w)) for w, _, _ in members),
        'seeds': len(members),
        'accuracy': _mean_std([s.get('accuracy') for s in summaries]),
        'condensed_accuracy': _mean_std([s.get('condensed_accuracy') for s in summaries]),
        'flops': first.get('flops'), 'params': first.get('params'),
        'condensed_flops': first.get('condensed_flops', ''),
        'condensed_params': first.get('condensed_params', ''),
        'wall_seconds': _mean_std([s.get('wall_seconds') for s in summaries], digits=1),
        '_accuracies': [[s.get('accuracy') for s in summaries],
                        [s.get('condensed_accuracy') for s in summaries]]})
  return rows


def _plot(rows: list[dict], path: str) -> None:
  from condensenet_jax import plots  # pylint: disable=g-import-not-at-top
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(max(5, 2 * len(rows)), 4))
  x = np.arange(len(rows))
  for offset, (index, label) in zip((-0.2, 0.2), enumerate(('trained', 'condensed'))):
    values = [np.asarray([v for v in r['_accuracies'][index] if v is not None]) for r in rows]
    means = [v.mean() if v.size else np.nan for v in values]
    spread = [v.std(ddof=1) if v.size > 1 else 0 for v in values]
    ax.bar(x + offset, means, 0.4, yerr=spread, capsize=4, label=label)
  ax.set_xticks(x, [r['group'] for r in rows], fontsize=8)
  ax.set_ylabel('test accuracy')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(args) -> list[dict]:
  rows = groups(args.workdirs)
  print(common.markdown_table(rows, COLUMNS), end='')
  if args.csv:
    with open(args.csv, 'w', newline='') as f:
      writer = csv.DictWriter(f, COLUMNS, extrasaction='ignore')
      writer.writeheader()
      writer.writerows(rows)
  if args.plot:
    _plot(rows, args.plot)
  return rows
