"""Checkpoints: the whole train state plus a JSON item through orbax, and the condensed model.

Training checkpoints live in `workdir/checkpoints/<step>/` (orbax `CheckpointManager`: items
`state` and `meta`); the condensed model in `workdir/condensed/` as `model.json` (the
`CondensedCondenseNet` architecture and the evaluation preprocessing: dataset, image size,
mean, std, class names) and `variables.npz` (plain numpy, readable without JAX or orbax).
"""

import hashlib
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from flax import traverse_util

from condensenet_jax import condense, data, models


class Checkpoints:
  """Keeps the last `keep` checkpoints of a run; saves asynchronously."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    """The newest saved step, or None when there is none."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts writing `state` (a pytree of arrays) and `meta` (JSON-serializable) as checkpoint
    `step`; returns before the write ends (`wait`)."""
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
    """Blocks until every started save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self.manager.close()


# The classes a condensed model's `model.json` may name (CondensedNet: the earlier name).
CONDENSED_CLASSES = {**{cls.__name__: cls for cls in models.CONDENSED_CLASSES},
                     'CondensedNet': models.CondensedCondenseNet}


def save_condensed(directory: str, model: models.CondensedCondenseNet, variables: Any,
                   preprocessing: Optional[dict[str, Any]] = None) -> None:
  """Writes a condensed model: `model.json` + `variables.npz`.

  `preprocessing` (from `data.preprocessing`) is saved with it, so that `load_classifier` can
  take raw images.
  """
  os.makedirs(directory, exist_ok=True)
  fields = models.architecture(model)
  flat = traverse_util.flatten_dict(dict(variables), sep='/')
  np.savez(os.path.join(directory, 'variables.npz'),
           **{k: np.asarray(v) for k, v in flat.items()})
  with open(os.path.join(directory, 'model.json'), 'w') as f:
    json.dump({'class': type(model).__name__, 'fields': fields, 'preprocessing': preprocessing}, f,
              indent=1)


def read_condensed(directory: str, **overrides) -> tuple[models.CondensedCondenseNet,
                                                         dict[str, Any], dict[str, Any]]:
  """`(model, variables, spec)` of the condensed model in `directory`; `spec` is its
  `model.json` (`fields`, `preprocessing`). Raises as `load_condensed`."""
  paths = [os.path.join(directory, f) for f in ('model.json', 'variables.npz')]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'{directory} is not a condensed model (missing {missing}); it is '
                            'written at the end of training as <workdir>/condensed.')
  with open(paths[0]) as f:
    spec = json.load(f)
  cls = CONDENSED_CLASSES.get(spec.get('class', 'CondensedCondenseNet'))
  if cls is None:
    raise ValueError(f"{paths[0]}: class {spec.get('class')!r} is not one of "
                     f'{sorted(CONDENSED_CLASSES)}; was it written by another program?')
  model = models.from_architecture(cls, spec['fields'], **overrides)
  with np.load(paths[1]) as arrays:
    variables = traverse_util.unflatten_dict({k: arrays[k] for k in arrays.files}, sep='/')
  condense.check_gathered_norms(model, variables)
  return model, variables, spec


def load_condensed(directory: str,
                   **overrides) -> tuple[models.CondensedCondenseNet, dict[str, Any]]:
  """Reads a condensed model written at the end of training (`workdir/condensed`).

  Returns `(model, variables)`; `model.apply(variables, x)` gives logits for normalized float
  images `x` [n, h, w, 3] (`load_classifier` takes raw uint8 images instead). Keyword
  `overrides` set the fields that do not define the network: `dtype`, `execution`.

  Raises:
    FileNotFoundError: `directory` lacks `model.json` or `variables.npz`.
    ValueError: copies of a gathered channel have different BN terms while the model may skip
      its gathers (`condense.check_gathered_norms`; load with
      `execution=Execution(condensed_gathers='keep')`).
  """
  model, variables, _ = read_condensed(directory, **overrides)
  return model, variables


class Classifier:
  """A condensed model with its preprocessing: raw uint8 images in, logits out.

  `classifier(images)` takes uint8 RGB images [n, s, s, 3] with s = `image_size` (for ImageNet,
  resized to a shorter side of `preprocessing['resize_shorter']` and center-cropped, as in
  evaluation) and returns float32 logits [n, num_classes]; normalization happens inside, in
  one compiled program per batch shape. `class_names[i]` names label i. Raises ValueError for
  images of another dtype or shape.
  """

  def __init__(self, model: models.CondensedCondenseNet, variables: dict[str, Any],
               preprocessing: dict[str, Any]):
    self.model, self.variables, self.preprocessing = model, variables, preprocessing
    mean, std = preprocessing['mean'], preprocessing['std']
    self._logits = jax.jit(lambda v, x: model.apply(v, data.normalize(x, mean, std)))

  @property
  def class_names(self) -> list[str]:
    """`num_classes` names; `class_names[i]` names label i."""
    return self.preprocessing['class_names']

  @property
  def image_size(self) -> int:
    """Side of the square images the classifier takes."""
    return self.preprocessing['image_size']

  def __call__(self, images) -> jax.Array:
    images = np.asarray(images)
    s = self.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
      raise ValueError(f'images of dtype {images.dtype} and shape {images.shape}: the '
                       f'classifier takes uint8 RGB images of shape [n, {s}, {s}, 3].')
    return self._logits(self.variables, jnp.asarray(images))


def load_classifier(directory: str, preprocessing: Optional[dict[str, Any]] = None,
                    **overrides) -> Classifier:
  """The condensed model in `directory` as a `Classifier` of raw uint8 images.

  The preprocessing saved in its `model.json` is used; `preprocessing` (see
  `data.preprocessing`) replaces it, for a model saved without one. `overrides` as in
  `load_condensed`.

  Raises:
    FileNotFoundError, ValueError: as `load_condensed`; ValueError also when no preprocessing
      is saved or given.
  """
  model, variables, spec = read_condensed(directory, **overrides)
  preprocessing = preprocessing or spec.get('preprocessing')
  if not preprocessing:
    raise ValueError(f'{directory}/model.json has no preprocessing (mean, std, image size); '
                     'pass preprocessing=data.preprocessing(...) to load_classifier.')
  return Classifier(model, jax.device_put(variables), preprocessing)


# --- resuming: identity of a run, the latest readable checkpoint, the state hash --------

# Fields that fix the data order, the schedule and the condensing stages of a run.
RUN_FIELDS = ('dataset', 'seed', 'batch_size', 'num_epochs')


def run_meta(config, model, step: int, stage: int, steps_per_epoch: int,
             total_steps: int) -> dict[str, Any]:
  """The JSON item saved with checkpoint `step`: the config, the model's class and
  `models.architecture` (what `restore_latest` compares) and where the run stands."""
  epoch, position = divmod(step, steps_per_epoch)
  return {'config': config.to_dict(), 'model': type(model).__name__,
          'model_fields': models.architecture(model), 'step': step, 'stage': stage,
          'epoch': epoch, 'position_in_epoch': position, 'total_steps': total_steps}


def check_same_run(config, meta: dict[str, Any], directory: str) -> None:
  """Raises ValueError if the checkpoint `meta` was written by a run with other `RUN_FIELDS`."""
  saved = meta.get('config', {})
  changed = [f'{f}: {saved.get(f)!r} -> {config.get(f)!r}' for f in RUN_FIELDS
             if saved.get(f) != config.get(f)]
  if changed:
    raise ValueError(
        f'the checkpoints in {directory} belong to a run with other {", ".join(RUN_FIELDS)} '
        f'({"; ".join(changed)}); resuming would change its data order and condensing '
        'schedule. Use the same values, another --workdir, or delete the checkpoints to start '
        'fresh.')


def check_same_ema(config, meta: dict[str, Any], directory: str) -> None:
  """Raises ValueError if the checkpoint `meta` was written by a run that kept an EMA of the
  weights and `config` keeps none, or the other way round (the states differ in shape)."""
  saved = meta.get('config', {}).get('ema_decay', 0.0)
  if bool(saved) != bool(config.get('ema_decay', 0.0)):
    kept = 'keeps an' if saved else 'keeps no'
    raise ValueError(
        f'the checkpoints in {directory} belong to a run that {kept} EMA of the weights '
        f'(ema_decay {saved!r} -> {config.get("ema_decay")!r}); resume with '
        f'--config.ema_decay={saved!r}, or use another --workdir.')


def restore_latest(ckpt: Checkpoints, fresh: Any, model, config, log) -> Any:
  """The state of the latest complete checkpoint in `ckpt`, shaped and placed like `fresh`;
  unreadable ones are moved aside, with a message, and the one before is used; `fresh` when
  none is left.

  Raises:
    ValueError: the checkpoints hold another model (`models.architecture`), another run
      (`check_same_run`) or a state with(out) an EMA that `config` does not (`check_same_ema`).
  """
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          fresh)
  current = (type(model).__name__, models.architecture(model))
  for step in reversed(ckpt.all_steps()):
    try:
      meta = ckpt.meta(step)
    except Exception as e:  # pylint: disable=broad-except
      _report_corrupt(ckpt, step, e, log)
      continue
    saved = (meta.get('model'), meta.get('model_fields'))
    if saved != current:
      raise ValueError(
          f'{os.path.dirname(ckpt.directory)} holds a run of a different model ({saved[0]} '
          f'{saved[1]}) than this '
          f'config ({current[0]} {current[1]}); use another --workdir, or delete '
          f'{ckpt.directory} to start fresh.')
    check_same_run(config, meta, ckpt.directory)
    check_same_ema(config, meta, ckpt.directory)
    try:
      state, _ = ckpt.restore(step, abstract)
    except Exception as e:  # pylint: disable=broad-except
      _report_corrupt(ckpt, step, e, log)
      continue
    log(f'resuming from {ckpt.directory}/{step} (step {step}, stage {meta.get("stage")})')
    return state
  log(f'no complete checkpoint is left in {ckpt.directory}: starting from step 0')
  return fresh


def _report_corrupt(ckpt, step, error, log):
  where = ckpt.quarantine(step)
  reason = str(error).splitlines()[0][:200]
  log(f'checkpoint {ckpt.directory}/{step} is truncated or corrupted ({type(error).__name__}: '
      f'{reason}); moved it to {where} and trying the previous one')


def finished_summary(workdir: str, total_steps: int, config) -> Optional[dict[str, Any]]:
  """The summary of a run that already ended in `workdir` (its checkpoint of `total_steps` and
  its summary.json are there), else None. Decided from files that every process sees alike.

  Raises:
    ValueError: that run had other `RUN_FIELDS` than `config` (`check_same_run`).
  """
  path = os.path.join(workdir, 'summary.json')
  directory = os.path.join(workdir, 'checkpoints')
  if not (os.path.exists(path) and os.path.isdir(os.path.join(directory, str(total_steps)))):
    return None
  ckpt = Checkpoints(directory, config.keep_checkpoints)
  try:
    check_same_run(config, ckpt.meta(total_steps), ckpt.directory)
  finally:
    ckpt.close()
  with open(path) as f:
    return json.load(f)


def state_sha256(state: Any) -> str:
  """SHA-256 of every leaf of the state (path, dtype, shape, bytes), in sorted path order."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()
