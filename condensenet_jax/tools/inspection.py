"""A per-layer table of a CondenseNet: what each layer reads and costs, trained and condensed.

    python -m condensenet_jax inspect runs/digits
    python -m condensenet_jax inspect runs/digits/condensed
    python -m condensenet_jax inspect converted_condensenet_4.pth --model CondenseNet74_C4

One row per part of the network (the stem, every dense layer, transitions, the final pooling,
the classifier): the block and layer, the input channels, the groups of the 1x1 convolution,
the inputs each group keeps (read from the masks or the indices), and FLOPs and params in the
official convention for the trained (masked) and the condensed form, with totals. The table
is printed and saved beside the model as layers.csv and layers.md (`--out` elsewhere).
"""

import csv
import io
import os
import re

import numpy as np
from flax import traverse_util

from condensenet_jax import artifacts, flops, models
from condensenet_jax.tools import common

HELP = 'a per-layer table: channels, groups, inputs kept, FLOPs and params in both forms'

COLUMNS = ('layer', 'block', 'in_channels', 'groups', 'kept_per_group', 'trained_flops',
           'trained_params', 'condensed_flops', 'condensed_params')


def add_arguments(parser) -> None:
  common.add_model_arguments(parser)
  parser.add_argument('--out', default=None,
                      help='directory for layers.csv and layers.md (default: beside the model)')


def _kept_per_group(item: artifacts.Loaded) -> dict[str, str]:
  """`{layer: inputs each group of its 1x1 convolution keeps}` from the masks or indices."""
  kept = {}
  for collection in ('masks', 'indices'):
    for key, value in traverse_util.flatten_dict(item.variables.get(collection, {})).items():
      layer = '/'.join(key[:-1])  # <block>/<layer>/conv_1 (mask or index)
      if not layer.endswith('conv_1'):  # the classifier's index
        continue
      value = np.asarray(value)
      if collection == 'masks':
        counts = sorted(set(int(c) for c in value.sum(axis=0)))
      else:
        counts = [value.shape[0] // item.model.group_1x1]
      kept[layer] = '-'.join(str(c) for c in counts)
  return kept


def table(item: artifacts.Loaded) -> list[dict]:
  """The rows of `item`'s table, the totals last."""
  model = item.model
  size = models.default_image_size(model)
  if models.condenses(model):
    v2 = isinstance(model, models.CondenseNetV2)
    trained_cls, condensed_cls = ((models.CondenseNetV2, models.CondensedCondenseNetV2) if v2
                                  else (models.CondenseNet, models.CondensedCondenseNet))
    fields = {k: v for k, v in models.architecture(model).items() if k != 'classifier_keep'}
    trained = models.from_architecture(trained_cls, fields)
    condensed = (model if isinstance(model, condensed_cls) else condensed_cls.from_model(model))
    inputs = {f'denseblock_{b}/denselayer_{l}': c
              for b, l, c, _ in models.dense_layer_inputs(model.stages, model.growth)}
    groups = model.group_1x1
  else:  # DenseNet: no condensed form
    trained, condensed, inputs, groups = model, None, {}, model.group_1x1
  other = {r['layer']: r for r in flops.per_layer(condensed, size)} if condensed else {}
  kept = _kept_per_group(item)
  rows = []
  for r in flops.per_layer(trained, size):
    name = r['layer']
    match = re.match(r'denseblock_(\d+)/', name)
    rows.append({'layer': name, 'block': int(match.group(1)) if match else '',
                 'in_channels': inputs.get(name, ''), 'groups': groups if name in inputs else '',
                 'kept_per_group': kept.get(f'{name}/conv_1', ''),
                 'trained_flops': r['flops'], 'trained_params': r['params'],
                 'condensed_flops': other.get(name, {}).get('flops', ''),
                 'condensed_params': other.get(name, {}).get('params', '')})
  total = {c: '' for c in COLUMNS}
  total['layer'] = 'total'
  for c in COLUMNS[5:]:
    values = [r[c] for r in rows if r[c] != '']
    total[c] = sum(values) if values else ''
  return rows + [total]


def to_csv(rows: list[dict]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, COLUMNS, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def run(args) -> list[dict]:
  items = artifacts.load(args.path, args.model, args.num_classes)
  item = items[0]  # a workdir: its trained form, whose condensed columns follow from it
  rows = table(item)
  out = args.out or item.directory  # beside the model (an official file's directory)
  os.makedirs(out, exist_ok=True)
  markdown = common.markdown_table(rows, COLUMNS)
  for name, text in (('layers.csv', to_csv(rows)), ('layers.md', markdown)):
    with open(os.path.join(out, name), 'w') as f:
      f.write(text)
  print(f'{item.form} model from {item.source}: {models.describe(item.model)}')
  print(markdown, end='')
  print(f'written to {os.path.join(out, "layers.csv")} and layers.md')
  return rows
