"""What the tools share: the arguments that name a model, loading its test data, placing it on
the devices, and writing JSON results beside a model without losing what was there."""

import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from condensenet_jax import artifacts, data, models

AXIS = 'batch'


def add_model_arguments(parser) -> None:
  """PATH, and `--model` / `--num-classes` for official files."""
  parser.add_argument('path', help='a --workdir of train.py, a condensed model directory '
                      '(model.json + variables.npz), or official weights (.pth, .pth.tar, or '
                      '.npz of the official keys)')
  parser.add_argument('--model', default=None,
                      help='for official weights: a variant of condensenet_jax.models (e.g. '
                           'CondenseNet86, CondenseNet74_C4, CondenseNet74_C8) or a JSON file '
                           'of CondenseNet fields')
  parser.add_argument('--num-classes', type=int, default=None,
                      help="for an official file: the number of classes, if not the variant's")


def dataset_for(item: artifacts.Loaded, name, data_dir) -> data.DataSource:
  """The test data `item` is evaluated on: `name`, else the dataset it was trained on. A
  name outside `data.DATASETS` is a tfds dataset with a 'validation' split, streamed and
  center-cropped as ImageNet is (`data.StreamingDataset`).

  Raises:
    ValueError: no dataset is known, or its images or classes do not fit the model.
    data.DatasetUnavailableError: the data is not on disk and cannot be downloaded.
  """
  name = name or item.dataset
  if not name:
    raise ValueError(f'{item.source} does not say which dataset it was trained on; name it with '
                     f'--dataset (one of {", ".join(data.DATASETS)}, or a tfds dataset with a '
                     "'validation' split).")
  needed = models.default_image_size(item.model)
  if name not in data.DATASETS:  # another tfds dataset, evaluated as ImageNet is
    pre = item.preprocessing or artifacts.known_preprocessing('imagenet2012')
    dataset = data.StreamingDataset(name=name, data_dir=data_dir, image_size=needed,
                                    mean=tuple(pre['mean']), std=tuple(pre['std']))
    if dataset.num_classes > item.model.num_classes:
      raise ValueError(f'{name} has {dataset.num_classes} classes, more than the '
                       f'{item.model.num_classes} of {item.source}.')
    return dataset
  size, classes = data.SHAPES[name]
  if size != needed or classes != item.model.num_classes:
    raise ValueError(f'{item.source} takes {needed}x{needed} images in '
                     f'{item.model.num_classes} classes, but {name} has {size}x{size} images in '
                     f'{classes} classes; evaluate it on the dataset it was trained for.')
  return data.load(name, data_dir)


def mesh_and_batch(batch_size: int) -> tuple[Mesh, int]:
  """A 1-D mesh of this process's devices and `batch_size` rounded up to a multiple of them."""
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), (AXIS,))
  return mesh, -(-batch_size // len(devices)) * len(devices)


def markdown_table(rows: list[dict], columns: tuple[str, ...]) -> str:
  """`rows` as a markdown table of `columns`, one line a row."""
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(str(r[c]) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def merge_json(path: str, updates: dict[str, Any]) -> None:
  """Sets the keys of `updates` in the JSON object at `path` (made if missing) and writes it
  back whole; other keys are kept. Written to a temporary name first, then renamed."""
  content = {}
  if os.path.exists(path):
    with open(path) as f:
      content = json.load(f)
  content.update(updates)
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    json.dump(content, f, indent=1)
  os.replace(temporary, path)
