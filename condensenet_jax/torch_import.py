"""Official PyTorch CondenseNet weights -> Flax variables (numpy in; torch is optional).

`load_state_dict(model, state_dict)` reads a training checkpoint of the official code
(`models/condensenet.py`, `models/densenet.py`) into `{'params', 'batch_stats', 'masks'}`;
`load_converted_state_dict(condensed_model, state_dict)` reads a converted one
(`models/condensenet_converted.py`) into `{'params', 'batch_stats', 'indices'}`. A
`state_dict` maps the official key names (with or without DataParallel's `module.` prefix) to
arrays. `load_pth(path)` reads a `.pth` / `.pth.tar` file into such a mapping with
`torch.load(weights_only=True)`, which refuses pickles that carry code.

Layouts: PyTorch conv kernels are `(out, in/groups, kh, kw)`, Flax's `(kh, kw, in/groups, out)`;
Linear weights `(out, in)` vs `(in, out)`; an LGC's `_mask` is `(out, in, 1, 1)` with rows
`g, g+G, ...` equal (group g), ours `(in, G)`; an SFR's (CondenseNetV2) is `(out, in, 1, 1)`
with columns `g, g+G, ...` equal, ours `(out, G)`. CondenseNetV2's SE layers keep their two
maps as `se.fc.0.weight` and `se.fc.2.weight`, ours as `se/squeeze` and `se/excite`.
"""

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from condensenet_jax import condense, models

# Keys the official code keeps for bookkeeping; accepted, never required.
BOOKKEEPING = ('num_batches_tracked', '_count', '_stage')


class StateDictError(ValueError):
  """A state dict that does not fit the model; the message lists every problem found."""


_LINEAR_LEAVES = {'kernel': 'weight', 'bias': 'bias', 'index': 'index'}
_SE_LEAVES = {'squeeze': 'fc.0.weight', 'excite': 'fc.2.weight'}


def _official_key(collection: str, path: tuple[str, ...], condensed: bool) -> str:
  *module, leaf = path
  if module == ['classifier']:
    prefix = 'classifier.linear.' if condensed and leaf != 'index' else 'classifier.'
    return prefix + _LINEAR_LEAVES[leaf]
  if module == ['fc']:  # CondenseNetV2's linear layer before the classifier
    return 'fc.' + _LINEAR_LEAVES[leaf]
  stem = 'features.' + '.'.join(module)
  if leaf in _SE_LEAVES:
    return stem + '.' + _SE_LEAVES[leaf]
  if collection == 'masks':
    return stem + '._mask'
  if collection == 'indices':
    return stem + '.index'
  if module[-1] in ('norm', 'norm_last'):
    return stem + '.' + {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                         'var': 'running_var'}[leaf]
  if module == ['init_conv']:
    return stem + '.weight'
  return stem + '.conv.weight'  # LGC, Conv and transition kernels


def _torch_shape(collection, path, shape, flat_shapes, model):
  """The official array shape for a Flax leaf of shape `shape`."""
  if collection == 'indices' and condense.is_sfr(path[:-1]):
    # The official converted SFR keeps a dense (kept, features) 0/1 matrix, ours its argmax.
    return (shape[0], shape[0] * model.trans_factor // model.group_trans)
  if collection == 'masks':
    kernel = flat_shapes[('params',) + path[:-1] + ('kernel',)]
    return (kernel[3], kernel[2], 1, 1)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _mask_from_torch(key, array, groups, sfr=False):
  """(out, in, 1, 1) official mask -> (in, G) for an LGC, (out, G) for an SFR (`sfr`), checking
  the group structure."""
  if sfr:
    array = array.transpose(1, 0, 2, 3)  # an SFR's groups are input channels: rows here
  rows = array[:, :, 0, 0]
  if not np.all((rows == 0) | (rows == 1)):
    raise StateDictError(f'{key}: mask entries must be 0 or 1.')
  expected = rows[np.arange(rows.shape[0]) % groups]
  bad = np.flatnonzero(np.any(rows != expected, axis=1))
  if bad.size:
    o = int(bad[0])
    if sfr:
      raise StateDictError(
          f'{key}: mask is not group-structured: input channel {o} (group {o % groups} of '
          f'{groups}) differs from input channel {o % groups}; in a sparse feature reactivation '
          'all input channels of a group share one mask (input channel c belongs to group '
          'c % G). Check group_trans.')
    raise StateDictError(
        f'{key}: mask is not group-structured: row {o} (group {o % groups} of {groups}) differs '
        f'from row {o % groups}; in a learned group convolution all output channels of a group '
        'share one mask (output channel o belongs to group o % G). Check group_1x1.')
  return np.ascontiguousarray(rows[:groups].T)


def _mask_groups(model, path) -> int:
  """The groups of the learned layer whose mask is at `path` (module path + leaf)."""
  if condense.is_sfr(path[:-1]):
    return model.group_trans
  return getattr(model, 'group_1x1', 1)


def _index_from_matrix(key, array):
  """An official converted SFR's (kept, features) matrix -> the position each row adds to."""
  if not (np.isin(array, (0, 1)).all() and (array.sum(axis=1) == 1).all()):
    raise StateDictError(f'{key}: every row must hold one 1 and zeros (the position that grouped '
                         'output is added to); this is not a converted SFR index.')
  return np.argmax(array, axis=1)


def _to_flax(collection, key, array, groups, sfr=False):
  if collection == 'masks':
    return _mask_from_torch(key, array, groups, sfr).astype(np.float32)
  if collection == 'indices':
    return (_index_from_matrix(key, array) if sfr else array).astype(np.int32)
  if array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0)).astype(np.float32)
  if array.ndim == 2:
    return np.ascontiguousarray(array.T).astype(np.float32)
  return array.astype(np.float32)


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  keys = list(state_dict)
  if keys and all(k.startswith('module.') for k in keys):
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  return {k: np.asarray(v) for k, v in state_dict.items()}


def _load(model, state_dict, condensed: bool):
  if models.condenses(model):
    model.check()
  state = _strip_prefix(state_dict)
  flat_shapes = {k: tuple(v.shape) for k, v in
                 traverse_util.flatten_dict(dict(models.variable_shapes(model))).items()}
  problems, flat = [], {}
  expected_keys = set()
  for (collection, *path), shape in flat_shapes.items():
    path = tuple(path)
    # Only V1's converted classifier is condensed (`classifier.linear.*`).
    key = _official_key(collection, path,
                        condensed and isinstance(model, models.CondensedCondenseNet))
    expected_keys.add(key)
    want = _torch_shape(collection, path, shape, flat_shapes, model)
    if key not in state:
      problems.append(f'missing key {key} (expected shape {want})')
      continue
    found = state[key].shape
    if tuple(found) != want:
      problems.append(f'{key}: expected shape {want}, found {tuple(found)}')
      continue
    try:
      sfr = collection in ('masks', 'indices') and condense.is_sfr(path[:-1])
      flat[(collection,) + path] = _to_flax(collection, key, state[key],
                                            _mask_groups(model, path), sfr)
    except StateDictError as e:
      problems.append(str(e))
  for key in sorted(set(state) - expected_keys):
    if key.rsplit('.', 1)[-1] not in BOOKKEEPING:
      problems.append(f'unexpected key {key} (shape {tuple(state[key].shape)})')
  if problems:
    listed = '\n  '.join(problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise StateDictError(
        f'the state dict does not fit {models.describe(model)}: {len(problems)} problem(s):\n'
        f'  {listed}{more}\nCheck that the model fields (stages, growth, groups, '
        f"condense_factor, num_classes, stem) match the checkpoint's training arguments"
        + ('.' if condensed else ', and that a converted checkpoint is loaded with '
           'load_converted_state_dict.'))
  variables = traverse_util.unflatten_dict(flat)
  if indices := variables.get('indices'):
    _check_indices(indices, model)
  if masks := variables.get('masks'):
    _check_bookkeeping(state, masks, model)
  return variables


def _check_indices(indices, model):
  """Every gathered index must name an existing input channel."""
  for key, index in traverse_util.flatten_dict(indices).items():
    if key[:-1] == ('classifier',):
      limit = model.num_features
    elif condense.is_sfr(key[:-1]):  # positions in the layer input: kept * T / G of them
      limit = index.shape[0] * model.trans_factor // model.group_trans
    else:  # kept = in * G / C
      limit = index.shape[0] * model.condense_factor // model.group_1x1
    if index.size and (index.min() < 0 or index.max() >= limit):
      raise StateDictError(
          f"{_official_key('indices', key, True)}: indices must lie in [0, {limit}), found "
          f'[{index.min()}, {index.max()}].')


def _check_bookkeeping(state, masks, model):
  """`_count` and `_stage` of each LGC and SFR, when present, must agree with its mask."""
  c = model.condense_factor
  for key, mask in traverse_util.flatten_dict(masks).items():
    stem = _official_key('masks', key, False)[:-len('._mask')]
    rows = condense.mask_rows(key[:-1])
    try:
      events = condense.events_done(mask, c, rows)
    except ValueError as e:
      raise StateDictError(f'{stem}._mask: {e}') from None
    delta = mask.shape[0] // c
    if stem + '._count' in state:
      count = int(np.asarray(state[stem + '._count']).reshape(-1)[0])
      if count != events * delta:
        raise StateDictError(
            f'{stem}._count = {count} but the mask has dropped {events * delta} {rows} per '
            f'group ({events} events of {delta}); the checkpoint is inconsistent.')
    if stem + '._stage' in state:
      stage = int(np.asarray(state[stem + '._stage']).reshape(-1)[0])
      if stage != events:
        raise StateDictError(
            f'{stem}._stage = {stage} but the mask shows {events} condensing events; the '
            'checkpoint is inconsistent.')


def load_state_dict(model, state_dict: Mapping[str, Any]):
  """Official training-form state dict -> `{'params', 'batch_stats', 'masks'}` for `model`
  (`CondenseNet`, `CondenseNetV2`, or `DenseNet`, which has no masks).

  Raises:
    TypeError: `model` is a `CondensedCondenseNet` (use `load_converted_state_dict`).
    StateDictError: (a ValueError) listing every missing, unexpected or misshapen key, a mask
      that is not group-structured, or `_count` / `_stage` that disagree with a mask.
  """
  if models.is_condensed(model):
    raise TypeError('load_state_dict takes the training form; use load_converted_state_dict '
                    f'for a {type(model).__name__}.')
  return _load(model, state_dict, condensed=False)


def load_converted_state_dict(condensed_model: models.CondensedCondenseNet,
                              state_dict: Mapping[str, Any]):
  """Official converted state dict -> `{'params', 'batch_stats', 'indices'}`, for a
  `CondensedCondenseNet` (V1's `models/condensenet_converted.py`) or a `CondensedCondenseNetV2`
  (V2's `convert_model`, whose SFR index is a dense 0/1 matrix read into positions).

  Raises:
    TypeError: `condensed_model` is not a `CondensedCondenseNet`.
    StateDictError: (a ValueError) listing the keys that do not fit, or an index outside its
      layer's input channels.
    ValueError: copies of a gathered channel with different BN terms while the model may skip
      its gathers (`condense.check_gathered_norms`).
  """
  if not models.is_condensed(condensed_model):
    raise TypeError('load_converted_state_dict takes a CondensedCondenseNet (e.g. '
                    'models.CondensedCondenseNet.from_model(model)); use load_state_dict for the '
                    'training form.')
  variables = _load(condensed_model, state_dict, condensed=True)
  condense.check_gathered_norms(condensed_model, variables)
  return variables


def load_pth(path: str) -> dict[str, np.ndarray]:
  """Reads an official `.pth` / `.pth.tar` file into `{key: numpy array}`.

  Uses `torch.load(weights_only=True)`, which refuses pickles that carry code; accepts a bare
  state dict or a checkpoint dict holding one under `'state_dict'`.

  Raises:
    ImportError: PyTorch is not installed.
    ValueError: the file is unreadable, refused as a weights-only checkpoint, or holds no
      state dict.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('reading .pth files needs PyTorch (any CPU build): pip install torch. '
                      'Or pass a dict of numpy arrays to load_state_dict.') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError with its own explanation
    raise ValueError(f'{path}: refused or unreadable as a weights-only checkpoint: {e}') from e
  if isinstance(obj, dict) and 'state_dict' in obj:
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: holds a {type(obj).__name__}, not a state dict.')
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, 'detach')}
