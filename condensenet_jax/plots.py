"""Pictures of a run, drawn with matplotlib (headless) into PNG files.

- `curves`: training curves from `metrics.jsonl`: the training loss, training and test
  accuracy, the learning rate; the condensing stages shaded and the condensing events marked.
- `connectivity`: the learned connectivity of each dense block after condensing: for every
  layer (rows) and every source of its input (columns: the block's input and each earlier
  layer of the block), the fraction of (input channel, group) connections kept, and the mean
  absolute kept weight. The picture the paper uses to show that later layers drop early
  features.
- `kept_per_group`: the inputs each group of every learned group convolution keeps, next to
  the inputs it has.

`write_all(workdir)` draws the three into `workdir` (`curves.png`, `connectivity.png`,
`kept_per_group.png`); training calls it at the end.
"""

import json
import os
from typing import Any, Optional

import numpy as np

from condensenet_jax import condense, models


def pyplot():
  """matplotlib's pyplot on the headless Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.jsonl`, in order.

  Raises:
    FileNotFoundError: there is no metrics.jsonl (the run has not logged yet).
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: the run has not logged anything yet; train '
                            f'first (python train.py --config CONFIG --workdir {workdir}).')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def curves(records: list[dict[str, Any]], path: str, title: str = '',
           event_steps: Optional[list[int]] = None) -> str:
  """Draws the training curves of `records` (from `read_metrics`) into the PNG `path`;
  `event_steps`: the condensing events (default: where the logged stage changes)."""
  plt = pyplot()
  train = [r for r in records if r.get('kind') == 'train']
  evals = [r for r in records if r.get('kind') in ('eval', 'final') and 'accuracy' in r]
  steps = np.array([r['step'] for r in train])
  if event_steps is None:
    stages = [r.get('stage', 0) for r in train]
    event_steps = [int(s) for s, a, b in zip(steps[1:], stages, stages[1:]) if b != a]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  loss, accuracy, lr = axes
  loss.plot(steps, [r['loss'] for r in train], label='training loss')
  if any('cross_entropy' in r for r in train):
    loss.plot(steps, [r.get('cross_entropy', np.nan) for r in train], label='cross-entropy',
              alpha=0.7)
  loss.set_yscale('log')
  accuracy.plot(steps, [r['accuracy'] for r in train], label='training accuracy')
  if evals:
    accuracy.plot([r['step'] for r in evals], [r['accuracy'] for r in evals], 'o-',
                  label='test accuracy')
  final = next((r for r in reversed(records) if r.get('kind') == 'final'), None)
  if final and 'condensed_accuracy' in final:
    accuracy.plot([final['step']], [final['condensed_accuracy']], 's', label='condensed test')
  lr.plot(steps, [r['lr'] for r in train], label='learning rate')
  last = event_steps[-1] if event_steps else None
  for ax, name in zip(axes, ('loss', 'accuracy', 'learning rate')):
    if last is not None:
      ax.axvspan(0, last, color='tab:orange', alpha=0.07, label='condensing stages')
    for i, s in enumerate(event_steps):
      ax.axvline(s, color='tab:red', lw=0.8, ls='--', label='condensing event' if i == 0 else None)
    ax.set_xlabel('step')
    ax.set_title(name)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _layers(masks, kernels=None,
            kind: str = 'lgc') -> dict[int, list[tuple[int, np.ndarray, np.ndarray]]]:
  """`{block: [(layer, mask (rows, G), kernel (rows, cols) or None), ...]}` of the learned
  group convolutions (`kind='lgc'`: rows are inputs) or of CondenseNetV2's sparse feature
  reactivations (`'sfr'`: rows are the outputs, the kernel transposed), blocks and layers in
  order; kernels from `kernels` (params) when given."""
  blocks = {}
  for path, kernel, mask in condense.learned_layers(kernels, masks):
    if condense.is_sfr(path) != (kind == 'sfr'):
      continue
    block, layer = (int(k.rsplit('_', 1)[1]) for k in path[:2])
    kernel = np.asarray(kernel) if kernel is not None else None
    blocks.setdefault(block, []).append((layer, np.asarray(mask), kernel))
  return {b: sorted(layers, key=lambda t: t[0]) for b, layers in sorted(blocks.items())}


def connectivity_maps(model, masks, params,
                      kind: str = 'lgc') -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """`{block: (kept, weight)}`, each `[layers, layers]`: row `l - 1` is layer `l`; column 0
  is the block's input, column `k` layer `k`'s features (the last layer feeds none). `kept`:
  the fraction of (channel, group) connections the masks keep; `weight`: the mean absolute
  weight of the kept connections (NaN where a source comes after the layer). With
  `kind='sfr'` (CondenseNetV2) the same for the features each layer's SFR writes back to."""
  maps = {}
  for block, layers in _layers(masks, params, kind).items():
    growth = model.growth[block - 1]
    first_in = layers[0][1].shape[0]
    n = len(layers)
    kept = np.full((n, n), np.nan)
    weight = np.full((n, n), np.nan)
    for row, (_, mask, kernel) in enumerate(layers):
      groups = mask.shape[1]
      connections = mask[:, np.arange(kernel.shape[1]) % groups]  # [in, out]
      bounds = [0, first_in] + [first_in + k * growth for k in range(1, row + 1)]
      for source, (start, end) in enumerate(zip(bounds, bounds[1:])):
        kept[row, source] = mask[start:end].mean()
        live = connections[start:end] > 0
        values = np.abs(kernel[start:end])[live]
        weight[row, source] = values.mean() if values.size else 0.0
    maps[block] = kept, weight
  return maps


def connectivity(model, masks, params, path: str, title: str = '', kind: str = 'lgc') -> str:
  """Draws `connectivity_maps` of every dense block into the PNG `path`: what each layer
  reads (`kind='lgc'`) or, for CondenseNetV2's SFRs (`'sfr'`), what it reactivates."""
  plt = pyplot()
  maps = connectivity_maps(model, masks, params, kind)
  fig, axes = plt.subplots(2, len(maps), figsize=(4.5 * len(maps), 8), squeeze=False)
  kept_name = 'fraction of connections kept' if kind == 'lgc' else 'fraction reactivated'
  axis = 'source' if kind == 'lgc' else 'target'
  for col, (block, (kept, weight)) in enumerate(maps.items()):
    for row, (values, name, cmap) in enumerate(((kept, kept_name, 'Blues'),
                                                (weight, 'mean |kept weight|', 'Reds'))):
      ax = axes[row, col]
      image = ax.imshow(values, cmap=cmap, vmin=0, aspect='auto')
      ax.set_title(f'block {block}: {name}', fontsize=9)
      ax.set_xlabel(f'{axis}: block input, then layer k')
      ax.set_ylabel('layer')
      ax.set_xticks(range(values.shape[1]), ['in'] + [str(k) for k in range(1, values.shape[1])],
                    fontsize=6)
      ax.set_yticks(range(values.shape[0]), [str(k) for k in range(1, values.shape[0] + 1)],
                    fontsize=6)
      fig.colorbar(image, ax=ax)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def kept_per_group(masks, path: str, title: str = '') -> str:
  """Draws the inputs each group of every learned group convolution keeps (bars; the range
  over groups as error bars) next to its inputs (line) into the PNG `path`."""
  plt = pyplot()
  names, inputs, low, high = [], [], [], []
  for block, layers in _layers(masks).items():
    for layer, mask, _ in layers:
      counts = mask.sum(axis=0)
      names.append(f'{block}.{layer}')
      inputs.append(mask.shape[0])
      low.append(counts.min())
      high.append(counts.max())
  fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
  x = np.arange(len(names))
  ax.bar(x, high, label='inputs kept per group')
  ax.vlines(x, low, high, color='k', lw=1)
  ax.plot(x, inputs, 'o-', color='tab:gray', ms=3, label='inputs')
  ax.set_xticks(x, names, rotation=90, fontsize=6)
  ax.set_ylabel('channels')
  ax.set_xlabel('learned group convolution (block.layer)')
  ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_all(workdir: str, model, variables: dict[str, Any],
              event_steps: Optional[list[int]] = None, out: Optional[str] = None,
              step: Optional[int] = None) -> list[str]:
  """Draws the curves of `workdir`'s metrics and, for a model with masks (`variables` of
  training step `step`), its connectivity and inputs kept per group, into `out` (default:
  `workdir`); returns the files written."""
  out = out or workdir
  title = f'{type(model).__name__} {list(model.stages)}x{list(model.growth)}'
  written = [curves(read_metrics(workdir), os.path.join(out, 'curves.png'), title,
                    event_steps)]
  masks = variables.get('masks')
  if masks and models.condenses(model):
    title += f', step {step}' if step is not None else ''
    written.append(connectivity(model, masks, variables['params'],
                                os.path.join(out, 'connectivity.png'), title))
    written.append(kept_per_group(masks, os.path.join(out, 'kept_per_group.png'), title))
    if isinstance(model, models.CondenseNetV2):
      written.append(connectivity(model, masks, variables['params'],
                                  os.path.join(out, 'reactivation.png'), title, kind='sfr'))
  return written
