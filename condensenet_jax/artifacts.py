"""What the tools read: a run's workdir, a condensed model directory, official weights.

`load(path)` returns the models a path holds, each as a `Loaded`: the model, its variables as
host arrays, the evaluation preprocessing it was trained with (when known) and where results
about it are written. Every mistake a user can make with a path raises `ArtifactError`, a
ValueError whose message is one line naming the problem and the fix.
"""

import dataclasses
import json
import os
import re
from typing import Any, Optional

import ml_collections
import numpy as np

from condensenet_jax import checkpoint, data, models, recipe, torch_import


class ArtifactError(ValueError):
  """A path that holds no model the tools can read; the message names the fix."""


@dataclasses.dataclass
class Loaded:
  """One model read from a path.

  `form`: 'trained' (a training-form `CondenseNet` with masks, or a `DenseNet`) or
  'condensed' (a `CondensedCondenseNet`). `variables`: numpy arrays. `preprocessing`: as
  `data.preprocessing`, or None when the path does not say (an official file). `dataset`: the
  dataset it was trained on, when known. `directory`: where results about it go (`eval.json`,
  tables). `step`: the training step of a checkpoint.
  """
  form: str
  model: Any
  variables: dict[str, Any]
  preprocessing: Optional[dict[str, Any]]
  dataset: Optional[str]
  directory: str
  source: str
  step: Optional[int] = None


# Files of official weights: PyTorch checkpoints, or a state dict saved as numpy arrays under
# the official key names.
OFFICIAL_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.npz')


def kind(path: str) -> str:
  """'workdir', 'condensed', 'official' or 'missing' for `path`."""
  if os.path.isfile(path) and path.endswith(OFFICIAL_SUFFIXES):
    return 'official'
  if os.path.isfile(os.path.join(path, 'model.json')):
    return 'condensed'
  if os.path.isdir(os.path.join(path, 'checkpoints')) or os.path.isfile(
      os.path.join(path, 'summary.json')):
    return 'workdir'
  return 'missing'


def load(path: str, model_name: Optional[str] = None, num_classes: Optional[int] = None,
         forms: tuple[str, ...] = ('trained', 'condensed')) -> list[Loaded]:
  """The models at `path`, in `forms`.

  - A workdir: its latest checkpoint in the training form (the EMA of the weights, with the
    checkpoint's masks, when the run kept one) and its `condensed/` export (when the run has
    finished).
  - A condensed model directory (`model.json` + `variables.npz`).
  - Official weights: a `.pth` / `.pth.tar` file (needs PyTorch) or a `.npz` of the official
    key names. `model_name` names the architecture: a named variant of `models` such as
    'CondenseNet86' or 'CondenseNet74_C4', or a JSON file of `CondenseNet` fields (other
    keys are ignored); `num_classes` overrides its class count. The training or the
    converted form, whichever the file holds.

  Raises:
    ArtifactError: the path does not exist or holds none of these, a workdir has no complete
      checkpoint, an official file without `model_name`, or weights that do not fit it.
  """
  found = kind(path)
  if found == 'missing':
    raise ArtifactError(
        f'{path} is not a run directory (no checkpoints/ or summary.json), a condensed model '
        f'(no model.json) or official weights ({", ".join(OFFICIAL_SUFFIXES)}); give a '
        '--workdir of train.py, its condensed/ directory, or a weights file.')
  if found == 'official':
    return [_load_official(path, model_name, num_classes)]
  if found == 'condensed':
    return [_load_condensed(path)]
  loaded = []
  if 'trained' in forms:
    loaded.append(_load_checkpoint(path))
  condensed = os.path.join(path, 'condensed')
  if 'condensed' in forms and os.path.isfile(os.path.join(condensed, 'model.json')):
    loaded.append(_load_condensed(condensed))
  return loaded


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir`, from its latest checkpoint.

  Raises:
    ArtifactError: no complete checkpoint.
  """
  return ml_collections.ConfigDict(_read_latest(workdir)[1]['config'])


def _read_latest(workdir: str, with_state: bool = False) -> tuple[int, dict[str, Any], Any]:
  """`(step, meta, state)` of the latest checkpoint of `workdir` whose meta can be read;
  `state` (nested dicts of arrays) only `with_state`, else None. Reads; never writes."""
  directory = os.path.join(workdir, 'checkpoints')
  no_checkpoint = ArtifactError(f'{workdir} has no checkpoint yet (nothing in {directory}); '
                                f'train first: python train.py --config CONFIG --workdir '
                                f'{workdir}')
  if not os.path.isdir(directory):  # the manager would make it
    raise no_checkpoint
  ckpt = checkpoint.Checkpoints(directory)
  try:
    steps = ckpt.all_steps()[::-1]
    if not steps:
      raise no_checkpoint
    for step in steps:
      try:
        meta = ckpt.meta(step)
      except Exception:  # pylint: disable=broad-except  # a half-written checkpoint
        continue
      if not with_state:
        return step, meta, None
      try:
        return step, meta, ckpt.restore(step)[0]
      except Exception as e:  # pylint: disable=broad-except  # orbax: truncated or damaged
        raise ArtifactError(f'{directory}/{step} cannot be read ({type(e).__name__}: '
                            f'{str(e).splitlines()[0][:200]}); resuming the run moves it '
                            'aside and uses the one before.') from None
  finally:
    ckpt.close()
  raise ArtifactError(f'no checkpoint in {directory} is complete ({steps} are half-written); '
                      f'resume the run to write one: python train.py --config CONFIG '
                      f'--workdir {workdir}')


def _load_checkpoint(workdir: str) -> Loaded:
  step, meta, state = _read_latest(workdir, with_state=True)
  cls = getattr(models, meta.get('model', ''), None)
  if cls is None or 'model_fields' not in meta:
    raise ArtifactError(f'{workdir}/checkpoints/{step} names no model this version knows '
                        f"({meta.get('model')!r}); read it with the version that wrote it.")
  config = ml_collections.ConfigDict(meta['config'])
  model = models.from_architecture(cls, meta['model_fields'],
                                   dtype=recipe.compute_dtype(config))
  variables = {c: _numpy(state[c]) for c in ('params', 'batch_stats', 'masks') if state.get(c)}
  source = f'{workdir}/checkpoints/{step}'
  if state.get('ema'):  # the run kept an average of the weights: that is the model it exports
    variables.update({c: _numpy(v) for c, v in state['ema'].items()})
    source += ' (EMA of the weights)'
  return Loaded('trained', model, variables, _preprocessing_of(config.dataset, workdir),
                config.dataset, workdir, source, step)


def _preprocessing_of(dataset: str, workdir: str) -> Optional[dict[str, Any]]:
  """The preprocessing the run's condensed model saved, else the one its dataset implies."""
  path = os.path.join(workdir, 'condensed', 'model.json')
  if os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f).get('preprocessing')
    if saved:
      return saved
  return known_preprocessing(dataset)


def known_preprocessing(dataset: str) -> Optional[dict[str, Any]]:
  """The preprocessing of `dataset` from what this package knows of it (sizes, class counts
  and normalization statistics; class names '0', '1', ...), or None for another name."""
  if dataset not in data.SHAPES:
    return None
  if dataset == 'digits':
    return data.digits().preprocessing()
  size, classes = data.SHAPES[dataset]
  mean, std = data.CIFAR_STATS.get(dataset, data.IMAGENET_STATS)
  resize = data.eval_resize(size) if dataset == 'imagenet2012' else None
  return data.preprocessing(dataset, size, mean, std, classes, resize_shorter=resize)


def _load_condensed(directory: str) -> Loaded:
  try:
    model, variables, spec = checkpoint.read_condensed(directory)
  except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
    raise ArtifactError(f'{directory} holds no readable condensed model ({e}); export it '
                        'again from its run.') from None
  preprocessing = spec.get('preprocessing')
  return Loaded('condensed', model, _numpy(variables), preprocessing,
                (preprocessing or {}).get('dataset'), directory, directory)


def _architecture(model_name: Optional[str], path: str, num_classes: Optional[int]):
  """The training-form model `model_name` names: a variant of `models` or a JSON file."""
  if not model_name:
    raise ArtifactError(f'{path}: official weights do not say their architecture; name it with '
                        '--model (a variant of condensenet_jax.models, e.g. CondenseNet86 or '
                        'CondenseNet74_C4, or a JSON file of CondenseNet fields).')
  overrides = {'num_classes': num_classes} if num_classes else {}
  if model_name.endswith('.json'):
    try:
      with open(model_name) as f:
        given = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ArtifactError(f'--model {model_name}: cannot be read ({e}).') from None
    names = {f.name for f in dataclasses.fields(models.CondenseNet)} - set(models.RUNTIME_FIELDS)
    fields = {k: v for k, v in given.items() if k in names - {'parent', 'name'}}
    return models.from_architecture(models.CondenseNet, {**fields, **overrides})
  factory = getattr(models, model_name, None)
  if factory is None or model_name.startswith('_'):
    raise ArtifactError(f'--model {model_name}: condensenet_jax.models has no such variant; '
                        'use e.g. CondenseNet86, CondenseNet74_C4, CondenseNet74_C8 or '
                        'DenseNetBC100, or a JSON file of CondenseNet fields.')
  return factory(**overrides)


def _load_official(path: str, model_name: Optional[str], num_classes: Optional[int]) -> Loaded:
  model = _architecture(model_name, path, num_classes)
  if path.endswith('.npz'):
    with np.load(path) as arrays:
      state_dict = {k: arrays[k] for k in arrays.files}
  else:
    try:
      state_dict = torch_import.load_pth(path)
    except ImportError as e:
      raise ArtifactError(f'{path}: {e}') from None
  converted = any(k.endswith('.index') for k in state_dict)
  try:
    if converted:
      model = models.CondensedCondenseNet.from_model(model)
      variables = torch_import.load_converted_state_dict(model, state_dict)
    else:
      variables = torch_import.load_state_dict(model, state_dict)
  except torch_import.StateDictError as e:
    lines = str(e).splitlines()
    count = re.search(r'(\d+) problem', lines[0])
    raise ArtifactError(f'{path} does not fit --model {model_name}: {lines[1].strip()} '
                        f'({count.group(1) if count else "several"} problems in all); check '
                        '--model and --num-classes.') from None
  directory = os.path.dirname(os.path.abspath(path))
  stats = (model.num_classes, models.default_image_size(model))
  dataset = {(1000, 224): 'imagenet2012', (10, 32): 'cifar10', (100, 32): 'cifar100'}.get(
      stats)
  return Loaded('condensed' if converted else 'trained', model, _numpy(variables),
                known_preprocessing(dataset) if dataset else None, dataset, directory, path)


def _numpy(tree):
  if isinstance(tree, dict):
    return {k: _numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
