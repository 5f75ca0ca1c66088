"""Condensing: the stage schedule, the group-lasso penalty, one condensing event, and the export
of a condensed training-form model into the inference form.

All functions are pure. `condense_event` and `group_lasso` are jit-able and work on the
pytrees that `CondenseNet.init` and `CondenseNetV2.init` return; the learned layers are found
through the `'masks'` collection and their kernels at the same path in `params`:

- a learned group convolution (`.../conv_1/mask`, shape `(in_channels, groups)`; kernel
  `(1, 1, in_channels, out_channels)`): output channel `o` belongs to group `o % groups`, and
  each group drops inputs;
- a sparse feature reactivation (CondenseNetV2; a module named `sfr`, mask `(out_channels,
  groups)`): input channel `c` belongs to group `c % groups`, and each group drops outputs.
  It is condensed as the learned group convolution of its transposed kernel.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from condensenet_jax import layers, models

# The official code clamps each group's squared norm from below before the square root.
LASSO_EPS = 1e-6


def last_stage_step(total_steps: int) -> int:
  """The last step at which CondenseNetV2's layers still move to a new stage: its official
  guard (`progress * 2 < 1 + 1e-3`, progress = step / total_steps) stops every stage change
  from progress 0.5005 on, i.e. the largest step with 2000 step < 1001 total_steps."""
  return (1001 * int(total_steps) - 1) // 2000


def stage_at(step, total_steps, condense_factor, stops_at_half: bool = False):
  """Stage at `step`: min(C-1, floor(2 (C-1) step / total_steps)), in exact integer arithmetic.

  Stages 0 .. C-2 are condensing stages (the first half of training); stage C-1 is the
  optimization stage. With `stops_at_half` (CondenseNetV2, `model.condensing_stops_at_half`)
  the stage is the one of step `min(step, last_stage_step(total_steps))`. Works on Python ints
  and on (traced) integer arrays.
  """
  last = condense_factor - 1
  if isinstance(step, (int, np.integer)) and isinstance(total_steps, (int, np.integer)):
    if stops_at_half:
      step = min(int(step), last_stage_step(total_steps))
    return min(last, (2 * last * int(step)) // int(total_steps))
  step = jnp.asarray(step)
  if stops_at_half:
    step = jnp.minimum(step, last_stage_step(total_steps))
  return jnp.minimum(last, (2 * last * step) // total_steps)


def event_steps(total_steps: int, condense_factor: int,
                stops_at_half: bool = False) -> list[int]:
  """The steps at which condensing events 1 .. C-1 fire (the first step of each stage); with
  `stops_at_half`, only those up to `last_stage_step(total_steps)` (the others never fire)."""
  last = condense_factor - 1
  steps = [-(-k * total_steps // (2 * last)) for k in range(1, last + 1)]
  return [s for s in steps if not stops_at_half or s <= last_stage_step(total_steps)]


def model_stage_at(model, step, total_steps):
  """`stage_at` with `model`'s condense factor and guard (`condensing_stops_at_half`); 0 for a
  model that does not condense (`models.condenses`)."""
  if not models.condenses(model):
    return 0
  return stage_at(step, total_steps, model.condense_factor, model.condensing_stops_at_half)


def model_event_steps(model, total_steps: int) -> list[int]:
  """`event_steps` with `model`'s condense factor and guard; [] for a model that does not
  condense."""
  if not models.condenses(model):
    return []
  return event_steps(total_steps, model.condense_factor, model.condensing_stops_at_half)


def is_condensing(stage, condense_factor):
  """True while the group lasso applies: stages 0 .. C-2 (keyed to C, not to G)."""
  return stage < condense_factor - 1


# The module name of CondenseNetV2's sparse feature reactivations, whose masks are over outputs.
SFR_NAME = 'sfr'


def is_sfr(path: tuple[str, ...]) -> bool:
  """Whether the learned layer at `path` (module path, without the leaf) is an SFR."""
  return path[-1] == SFR_NAME


def mask_rows(path) -> str:
  """What the mask rows of the learned layer at `path` (module path) are, for messages:
  'inputs' of a learned group convolution, 'outputs' of an SFR."""
  return 'outputs' if is_sfr(path) else 'inputs'


def learned_layers(params, masks):
  """Yields `(path, kernel [rows, cols], mask [rows, G])` for every learned layer, in the
  order of `masks`: a learned group convolution's `[in, out]` kernel, an SFR's transposed
  (`[out, in]`), so that in both the mask's rows are what its groups drop and column `j`
  belongs to group `j % G`. With `params=None` the kernels are None.

  Raises:
    ValueError: `params` lack the kernel of a masked layer.
  """
  flat_params = traverse_util.flatten_dict(params) if params is not None else None
  for key, mask in traverse_util.flatten_dict(masks).items():
    path = key[:-1]
    if flat_params is None:
      yield path, None, mask
      continue
    kernel = flat_params.get(path + ('kernel',))
    if kernel is None:
      raise ValueError(f"masks hold {'/'.join(path)}/mask but params have no "
                       f"{'/'.join(path)}/kernel; pass params and masks of the same model.")
    yield path, (kernel[0, 0].T if is_sfr(path) else kernel[0, 0]), mask


def _group_sums(values, groups):
  """`[in, out]` -> `[in, G]`: sum over each group's output channels (o = d*G + g)."""
  in_channels, out = values.shape
  return values.reshape(in_channels, out // groups, groups).sum(axis=1)


def _by_width(params, masks):
  """The learned layers grouped by (kind, kernel columns, groups), in model order: the LGCs
  (or the SFRs) of a dense block, or of several blocks with the same growth. Yields
  `[(path, kernel [rows, cols], mask [rows, G]), ...]` per group (as `learned_layers`)."""
  blocks = {}
  for layer in learned_layers(params, masks):
    path, kernel, mask = layer
    blocks.setdefault((is_sfr(path), kernel.shape[1], mask.shape[1]), []).append(layer)
  yield from blocks.values()


def group_lasso(params, masks, model=None):
  """Unscaled group-lasso sum over all learned layers: for an LGC, the sum over groups g and
  inputs j of sqrt(max(sum over g's output channels of (w * mask)^2, 1e-6)); for an SFR the
  same with inputs and outputs exchanged (the official `lasso_loss` of each).

  The train step multiplies it by lambda while `is_condensing(stage)`. The layers are found
  through the masks; `model` is not needed and is accepted so that calls written
  `group_lasso(params, masks, model)` keep working. Returns a float32 scalar `[]`.
  Raises ValueError if a mask has no kernel at the same path in `params`.
  """
  del model
  total = jnp.zeros((), jnp.float32)
  # Layers of the same output width (a dense block's) have their rows stacked into one
  # [sum of in, out] kernel, which compiles to a few kernels per block instead of per layer.
  for block in _by_width(params, masks):
    kernel = jnp.concatenate([k for _, k, _ in block])
    mask = jnp.concatenate([m for _, _, m in block])
    weight = kernel * layers.expand_mask(mask, kernel.shape[1])
    squares = _group_sums(jnp.square(weight), mask.shape[1])  # [in, G]
    total = total + jnp.sqrt(jnp.maximum(squares, LASSO_EPS)).sum()
  return total


def events_done(mask, condense_factor: int, what: str = 'inputs'):
  """Condensing events a concrete mask `(rows, G)` shows, or raises if it is not one of the
  masks condensing produces (0/1, every group the same number of rows, a multiple of rows/C).
  `what` names the rows in the message: an LGC's inputs, an SFR's 'outputs'."""
  mask = np.asarray(mask)
  rows, groups = mask.shape
  delta = rows // condense_factor
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError('mask entries must be 0 or 1')
  dropped = rows - mask.sum(axis=0)
  if np.any(dropped != dropped[0]) or dropped[0] % delta:
    raise ValueError(f'groups keep {[int(rows - d) for d in dropped]} of {rows} {what}; '
                     f'condensing keeps the same count in every group, dropping {delta} '
                     f'(= {what}/C) per event')
  return int(dropped[0]) // delta


def _drop(kernel, mask, condense_factor, in_channels=None):
  """The mask after one event. `kernel` and `mask` may carry padding rows past `in_channels`
  (mask 0 there): they score +inf like pruned inputs and are never picked."""
  rows, groups = mask.shape
  in_channels = rows if in_channels is None else in_channels
  delta = in_channels // condense_factor
  score = _group_sums(jnp.abs(kernel * layers.expand_mask(mask, kernel.shape[1])), groups)
  score = jnp.where(mask > 0, score, jnp.inf)  # pruned inputs are never picked again
  # Rank of every input within its group in ascending score order, ties to the lower index
  # (what a stable argsort gives), by pairwise comparison: a sort inside the training step
  # takes far longer to compile. The [in, in, G] comparison is small (at most 1936^2 * G entries,
  # in CondenseNet-74's last block) and runs only at the condensing events.
  index = jnp.arange(rows)
  before = (score[None, :, :] < score[:, None, :]) | (
      (score[None, :, :] == score[:, None, :]) & (index[None, :, None] < index[:, None, None]))
  rank = before.sum(axis=1)  # [in, G]: inputs that come before input i in group g
  dropped = jnp.where(rank < delta, 0.0, mask).astype(mask.dtype)
  # A fully condensed layer stays as it is (reachable under jit only; see condense_event).
  full = mask.sum(axis=0).min() <= in_channels - (condense_factor - 1) * delta
  return jnp.where(full, mask, dropped)


@functools.partial(jax.jit, static_argnums=2)
def _condense_event(params, masks, condense_factor):
  new = {}
  # The layers of a dense block go through one loop body (their kernels and masks padded
  # to the block's widest layer): a few compiled kernels per block instead of per layer.
  for block in _by_width(params, masks):
    widest = max(m.shape[0] for _, _, m in block)
    pad = lambda a: jnp.pad(a, ((0, widest - a.shape[0]), (0, 0)))
    kernels = jnp.stack([pad(k) for _, k, _ in block])
    masks_in = jnp.stack([pad(m) for _, _, m in block])
    widths = jnp.array([m.shape[0] for _, _, m in block], jnp.int32)
    dropped = jax.lax.map(lambda a: _drop(*a[:2], condense_factor, a[2]),
                          (kernels, masks_in, widths))
    for i, (path, _, mask) in enumerate(block):
      new[path + ('mask',)] = dropped[i, :mask.shape[0]]
  return traverse_util.unflatten_dict(new)


def condense_event(params, masks, model):
  """One condensing event: in every LGC, each group drops the `in // C` still-alive inputs
  with the smallest L1 norm over the group's output channels (ties broken by input index);
  in every SFR (CondenseNetV2) each group drops the `out // C` still-written outputs with the
  smallest L1 norm over the group's input channels.

  Pure and jit-able; one compiled function serves every event. With concrete arrays it raises
  a ValueError when a layer has already had all C-1 events; under jit such a layer is left
  unchanged.

  Returns:
    The new masks, same structure as `masks`.
  """
  c = model.condense_factor
  if not any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(masks)):
    for name, done in events_done_per_layer(masks, model).items():
      if done >= c - 1:
        raise ValueError(
            f'{name} has already had all {c - 1} condensing events (condense_factor={c}); '
            'there is nothing left to drop.')
  return _condense_event(params, masks, c)


def condense_all(params, masks, model):
  """All C-1 condensing events in a row with the same weights (no training between them): the
  masks `export` needs, e.g. to time or check the condensed form of a model as it stands."""
  for _ in range(model.condense_factor - 1):
    masks = condense_event(params, masks, model)
  return masks


def events_done_per_layer(masks, model) -> dict[str, int]:
  """`{layer path: condensing events its mask shows}` for concrete masks.

  Raises:
    ValueError: naming the layer, if its mask is not one condensing produces (`events_done`).
  """
  out = {}
  for key, mask in traverse_util.flatten_dict(masks).items():
    name = '/'.join(key[:-1])
    try:
      out[name] = events_done(mask, model.condense_factor, mask_rows(key[:-1]))
    except ValueError as e:
      raise ValueError(f'{name}: {e}') from None
  return out


def _export_lgc(kernel, mask, condense_factor):
  """Returns (index [kept], grouped kernel [1, 1, kept/G, out]) of one fully condensed LGC."""
  in_channels, groups = mask.shape
  out = kernel.shape[1]
  index = np.concatenate([np.flatnonzero(mask[:, g]) for g in range(groups)])
  per_group = in_channels // condense_factor
  grouped = np.empty((per_group, out), kernel.dtype)
  d_out = out // groups
  for g in range(groups):
    rows = index[g * per_group:(g + 1) * per_group]
    # Group g's output channels g, g+G, g+2G, ... become the contiguous block g*d_out + k.
    grouped[:, g * d_out:(g + 1) * d_out] = kernel[rows][:, g::groups]
  return index, grouped[None, None]


def _export_sfr(kernel, mask, condense_factor):
  """Returns (index [kept], grouped kernel [1, 1, in/G, kept]) of one fully condensed SFR:
  group g's kept outputs in increasing order, read from its inputs g, g+G, ... in that order
  (the order the channel shuffle of `layers.CondensedSFR` gives)."""
  out, groups = mask.shape
  in_channels = kernel.shape[0]
  index = np.concatenate([np.flatnonzero(mask[:, g]) for g in range(groups)])
  per_group = out // condense_factor
  grouped = np.empty((in_channels // groups, groups * per_group), kernel.dtype)
  for g in range(groups):
    columns = index[g * per_group:(g + 1) * per_group]
    grouped[:, g * per_group:(g + 1) * per_group] = kernel[g::groups][:, columns]
  return index, grouped[None, None]


def export(model: models.CondenseNet, variables: Mapping[str, Any], classifier_keep: float = 0.5):
  """Converts a fully condensed training-form model into its inference form.

  Each LGC becomes an index gather (kept inputs, group after group, increasing index), BN with
  the gathered statistics, its activation, a 1x1 convolution with `group_1x1` groups and a
  channel shuffle; the classifier keeps the `int(features * classifier_keep)` inputs with the
  largest L1 column norm (no fine-tuning). With `classifier_keep=1.0` the result computes
  exactly the masked model's function. A `CondenseNetV2`'s SFRs become grouped convolutions
  whose outputs are scattered into the layer input (`layers.CondensedSFR`); its classifier is
  not condensed (`classifier_keep` does not apply), so its export always computes the masked
  model's function.

  Args:
    model: the training-form `CondenseNet` or `CondenseNetV2`.
    variables: `{'params', 'batch_stats', 'masks'}` after all C-1 condensing events.
    classifier_keep: fraction of classifier inputs to keep (official: 0.5).
  Returns:
    `(CondensedCondenseNet or CondensedCondenseNetV2, {'params', 'batch_stats', 'indices'})`,
    the variables as numpy arrays on the host (computed there; place them where they run).
  Raises:
    ValueError: naming the layer and its event count, if a layer is not fully condensed.
  """
  if not 0 < classifier_keep <= 1:
    raise ValueError(f'classifier_keep={classifier_keep} must be in (0, 1].')
  v2 = isinstance(model, models.CondenseNetV2)
  small = (models.CondensedCondenseNetV2.from_model(model) if v2 else
           models.CondensedCondenseNet.from_model(model, classifier_keep))
  to_np = lambda tree: traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)))
  params, stats, masks = (to_np(variables[c]) for c in ('params', 'batch_stats', 'masks'))
  last = model.condense_factor - 1
  indices = {}
  for name, done in events_done_per_layer(traverse_util.unflatten_dict(masks), model).items():
    if done != last:
      raise ValueError(
          f'{name} has had {done} of the {last} condensing events; export needs every layer '
          'fully condensed (train to the optimization stage, or apply condense_event '
          f'{last - done} more time(s)).')
  for key, mask in masks.items():
    path = key[:-1]
    kernel = params[path + ('kernel',)][0, 0]
    if is_sfr(path):  # its BN is over its own inputs, all read: nothing to gather
      index, params[path + ('kernel',)] = _export_sfr(kernel, mask, model.trans_factor)
      indices[path + ('index',)] = index.astype(np.int32)
      continue
    index, params[path + ('kernel',)] = _export_lgc(kernel, mask, model.condense_factor)
    for tree, leaves in ((params, ('scale', 'bias')), (stats, ('mean', 'var'))):
      for leaf in leaves:
        tree[path + ('norm', leaf)] = tree[path + ('norm', leaf)][index]
    indices[path + ('index',)] = index.astype(np.int32)
  if not v2:  # V2's classifier is not condensed
    kernel = params[('classifier', 'kernel')]  # [features, classes]
    kept = small.num_classifier_inputs
    order = np.argsort(np.abs(kernel).sum(axis=1), kind='stable')  # increasing L1 norm
    index = order[kernel.shape[0] - kept:]
    params[('classifier', 'kernel')] = kernel[index]
    indices[('classifier', 'index')] = index.astype(np.int32)
  small_vars = {c: traverse_util.unflatten_dict(t)
                for c, t in (('params', params), ('batch_stats', stats), ('indices', indices))}
  return small, small_vars


def check_gathered_norms(model: models.CondensedCondenseNet, variables: Mapping[str, Any]) -> None:
  """Raises ValueError where a condensed layer reads one input channel in several groups with
  different BN parameters or statistics, if `model` may run without its gathers.

  Conversion copies every kept channel's BN from the one BN of the training form, so all
  copies of a channel are equal; the gather-free form (`Execution.condensed_conv`) relies on it.
  Copies can only differ if the condensed form itself was trained.
  """
  if model.execution.condensed_gathers == 'keep':
    return
  params, stats, indices = (traverse_util.flatten_dict(dict(variables[c]))
                            for c in ('params', 'batch_stats', 'indices'))
  for key, index in indices.items():
    path = key[:-1]
    if path + ('norm', 'scale') not in params or is_sfr(path):
      continue  # the classifier's gather has no BN; an SFR's index places outputs
    index = np.asarray(index)
    order = np.argsort(index, kind='stable')
    channels = index[order]
    repeated = channels[1:] == channels[:-1]
    for tree, leaf in ((params, 'scale'), (params, 'bias'), (stats, 'mean'), (stats, 'var')):
      values = np.asarray(tree[path + ('norm', leaf)])[order]
      differ = repeated & (values[1:] != values[:-1])
      if differ.any():
        raise ValueError(
            f"{'/'.join(path)} reads input channel {channels[1:][differ][0]} in two groups with "
            f"different BN {leaf} values, which conversion never makes (was the condensed model "
            "trained?). Its function is still defined: load it with "
            "execution=Execution(condensed_gathers='keep'), which gathers every copy.")
