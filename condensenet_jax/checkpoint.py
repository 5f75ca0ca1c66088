"""Checkpoints: the whole train state plus a JSON item through orbax, and the condensed model.

Training checkpoints live in `workdir/checkpoints/<step>/` (orbax `CheckpointManager`: items
`state` and `meta`); the condensed model in `workdir/condensed/` as `model.json` (the
`CondensedNet` fields) and `variables.npz` (plain numpy, readable without JAX or orbax).
"""

import json
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from flax import traverse_util

from condensenet_jax import condense, models


class Checkpoints:
  """Keeps the last `keep` checkpoints of a run; saves asynchronously."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of checkpoint `step`; without `abstract_state` the state comes back as
    nested dicts of arrays (for inspection)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], restored['meta']

  def meta(self, step: int) -> dict[str, Any]:
    """The JSON item of checkpoint `step` alone (cheap: no arrays are read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        'meta']

  def quarantine(self, step: int) -> str:
    """Moves the unreadable checkpoint `step` aside (it is never deleted); returns where."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.directory, f'corrupt-{step}-{int(time.time())}')
    if jax.process_index() == 0:
      os.rename(source, target)
    multihost_utils.sync_global_devices(f'quarantine checkpoint {step}')
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_condensed(directory: str, model: models.CondensedNet, variables: Any) -> None:
  """Writes a condensed model: `model.json` + `variables.npz`."""
  os.makedirs(directory, exist_ok=True)
  fields = {'stages': list(model.stages), 'growth': list(model.growth),
            'bottleneck': model.bottleneck, 'group_1x1': model.group_1x1,
            'group_3x3': model.group_3x3, 'condense_factor': model.condense_factor,
            'num_classes': model.num_classes, 'stem': model.stem,
            'classifier_keep': model.classifier_keep}
  flat = traverse_util.flatten_dict(dict(variables), sep='/')
  np.savez(os.path.join(directory, 'variables.npz'),
           **{k: np.asarray(v) for k, v in flat.items()})
  with open(os.path.join(directory, 'model.json'), 'w') as f:
    json.dump({'class': 'CondensedNet', 'fields': fields}, f, indent=1)


def load_condensed(directory: str, **overrides) -> tuple[models.CondensedNet, dict[str, Any]]:
  """Reads a condensed model written at the end of training (`workdir/condensed`).

  Returns `(model, variables)`; `model.apply(variables, images_nhwc)` gives logits. Keyword
  `overrides` set model fields such as `dtype`, `conv_lowering`, `dense_blocks` or `gathers`.
  """
  paths = [os.path.join(directory, f) for f in ('model.json', 'variables.npz')]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'{directory} is not a condensed model (missing {missing}); it is '
                            'written at the end of training as <workdir>/condensed.')
  with open(paths[0]) as f:
    spec = json.load(f)
  model = models.CondensedNet(**{**spec['fields'], **overrides})
  with np.load(paths[1]) as arrays:
    variables = traverse_util.unflatten_dict({k: arrays[k] for k in arrays.files}, sep='/')
  condense.check_gathered_norms(model, variables)
  return model, variables
