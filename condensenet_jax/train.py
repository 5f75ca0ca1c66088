"""Training: the compiled data-parallel step, evaluation, checkpoints, export and summary.

The step is written per device (named axis `'batch'`: `lax.pmean` of gradients, metrics and
BN running statistics) and compiled once with `jax.jit(jax.shard_map(...))` over a 1-D mesh of
all devices; the same program serves one CPU, several GPUs and many hosts. Inside the step the
condensing event of a new stage is applied before the forward pass (decided on device from the
step number), so the whole run, all stages included, is one compilation.
"""

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from condensenet_jax import (checkpoint, condense, data, evaluation, flops, models, plots,
                             preemption, rand_augment, recipe, reporting, startup, validation)

AXIS = 'batch'


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree, replicated over the mesh."""
  step: jax.Array         # int32 []
  params: Any
  batch_stats: Any
  masks: Any              # {} for models without learned group convolutions
  opt_state: Any
  rng: jax.Array          # uint32 [2], the run's base key
  # {} without `config.ema_decay`; else the exponential moving average of `params` and
  # `batch_stats` ({'params': ..., 'batch_stats': ...}, the same trees).
  ema: Any

  def variables(self, masks=None):
    """The model's variables: `params`, `batch_stats` and, when there are any, `masks`
    (`masks` replaces the state's own)."""
    v = {'params': self.params, 'batch_stats': self.batch_stats}
    masks = self.masks if masks is None else masks
    if masks:
      v['masks'] = masks
    return v

  def ema_variables(self):
    """The variables of the averaged model: the EMA's `params` and `batch_stats` with the
    state's own `masks` (masks are never averaged, as in the official V2 training)."""
    return {**self.variables(), **self.ema}


# --- the per-device programs --------------------------------------------------------------

# Random erasing and RandAugment draw from the step's augmentation key folded with these
# numbers, far from the example positions the crops and flips fold in, so that turning either
# on changes nothing else.
ERASE_STREAM = 2**31 - 1
RAND_AUGMENT_STREAM = 2**31 - 2


def _apply_events(state: TrainState, model, total_steps: int):
  """Masks for this step: the condensing events of every stage entered since the last step
  (one, at the first step of a stage; more only if a stage lasted zero steps)."""
  stage = condense.model_stage_at(model, state.step, total_steps)
  previous = condense.model_stage_at(model, jnp.maximum(state.step - 1, 0), total_steps)
  event = lambda _, masks: condense.condense_event(state.params, masks, model)
  return lax.fori_loop(0, stage - previous, event, state.masks), stage


def update_ema(ema, params, batch_stats, decay: float):
  """`ema * decay + (1 - decay) * new` for every leaf of the averaged `params` and
  `batch_stats` (timm's `ModelEma`, the update of the official V2 training after each optimizer
  step); `ema` unchanged when it is empty (no EMA in the run)."""
  if not ema:
    return ema
  new = {'params': params, 'batch_stats': batch_stats}
  return jax.tree.map(lambda e, n: e * decay + (1.0 - decay) * n, ema, new)


def train_step(state: TrainState, batch, *, model, tx, schedule, config, total_steps, mean,
               std, augment_on_device: bool, count_trace: Callable[[], None] = lambda: None):
  """One SGD step on this device's share of the global batch (runs inside shard_map).

  `batch`: `{'image': uint8 [b, h, w, 3], 'label': int32 [b]}`, augmented here when
  `augment_on_device` (else already on the host). Returns `(new state, metrics)`; a step with
  a non-finite loss or gradient returns the state unchanged and `metrics['finite']` False.
  """
  count_trace()
  local_batch = batch['label'].shape[0]
  if state.masks:
    masks, stage = _apply_events(state, model, total_steps)
  else:
    masks, stage = state.masks, jnp.zeros((), jnp.int32)
  key = jax.random.fold_in(state.rng, state.step)
  augment_key, dropout_key = jax.random.split(key)
  # Randomness per example, keyed by its position in the global batch: the same run on any
  # number of devices sees the same crops and flips.
  positions = lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)
  images = batch['image']
  if augment_on_device:
    example_keys = jax.vmap(lambda i: jax.random.fold_in(augment_key, i))(positions)
    images = data.augment(images, example_keys, config.crop_padding, config.flip)
  if config.rand_augment:  # after the crop and flip, before normalization (timm's order)
    ra_key = jax.random.fold_in(augment_key, RAND_AUGMENT_STREAM)
    images = rand_augment.rand_augment(
        images, jax.vmap(lambda i: jax.random.fold_in(ra_key, i))(positions),
        rand_augment.Policy.parse(config.rand_augment), rand_augment.fill_color(mean))
  x = data.normalize(images, mean, std, recipe.compute_dtype(config))
  if config.random_erasing:
    erase_key = jax.random.fold_in(augment_key, ERASE_STREAM)
    x = data.random_erase(x, jax.vmap(lambda i: jax.random.fold_in(erase_key, i))(positions),
                          config.random_erasing)
  dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(AXIS))
  use_lasso = bool(state.masks) and config.group_lasso > 0

  def loss_fn(params):
    logits, updates = model.apply(
        {**state.variables(masks), 'params': params}, x, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_key})
    if config.label_smoothing:  # (1 - s) on the label, s spread over all classes
      targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], logits.shape[-1]),
                                    config.label_smoothing)
      ce = optax.softmax_cross_entropy(logits, targets).mean()
    else:
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    lasso = condense.group_lasso(params, masks) if use_lasso else jnp.zeros(())
    weight = config.group_lasso * condense.is_condensing(stage, model.condense_factor) \
        if use_lasso else 0.0
    return ce + weight * lasso, (logits, updates['batch_stats'], ce, lasso)

  (loss, (logits, batch_stats, ce, lasso)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, AXIS)
  batch_stats = lax.pmean(batch_stats, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = update_ema(state.ema, params, batch_stats, config.ema_decay)
  metrics = lax.pmean({
      'loss': loss, 'cross_entropy': ce, 'group_lasso': lasso,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
  }, AXIS)
  # Norms of the flattened trees: one reduction each instead of one per parameter (the step
  # has ~260 parameters, and every kernel costs compile time on CPU).
  grad_norm = jnp.linalg.norm(ravel_pytree(grads)[0])
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
  metrics.update(grad_norm=grad_norm, param_norm=jnp.linalg.norm(ravel_pytree(params)[0]),
                 lr=schedule(state.step), stage=stage, finite=finite)
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, masks=masks,
                      opt_state=opt_state, ema=ema)
  # A non-finite step is not applied: the state stays the last good one, the host stops.
  # One conditional over the whole state, not a select per array (fewer kernels to compile).
  new = lax.cond(finite, lambda: new, lambda: state)
  return new, metrics


# --- host side ----------------------------------------------------------------------------

def replicate(tree, sharding):
  """Host arrays (equal on every process) -> global arrays replicated over the mesh."""
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda idx, x=np.asarray(x): x[idx]), tree)


@dataclasses.dataclass
class Run:
  """Everything fixed for one run: data, model, schedule, compiled programs."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  model: Any
  dataset: data.DataSource  # also gives the normalization (mean, std)
  steps_per_epoch: int
  total_steps: int
  schedule: Any
  tx: Any
  train_step: Any
  eval_step: Callable
  traces: list


def setup(config, workdir: str, devices=None,
          dataset: Optional[data.DataSource] = None) -> Run:
  """Loads the data and builds the model, schedule and compiled programs of a run over
  `devices` (default: all devices of all processes). A given `dataset` (a `data.DataSource`,
  for example `data.synthetic`) replaces the one `config.dataset` names.

  Raises:
    ValueError: naming the field and the fix, for a config that cannot run
      (`validation.validate`, `validation.check_model_and_data`).
    DatasetUnavailableError: the data is not on disk and cannot be downloaded.
  """
  devices = jax.devices() if devices is None else devices
  validation.validate(config, len(devices))
  mesh = Mesh(np.asarray(devices), (AXIS,))
  if dataset is None:
    dataset = data.load(config.dataset, config.data_dir)
  mean, std = dataset.mean, dataset.std
  backend = devices[0].platform
  model = recipe.build_model(config, dataset.num_classes, backend, AXIS)
  validation.check_model_and_data(config, model, dataset)
  per_epoch = data.steps_per_epoch(dataset.num_train, config.batch_size)
  total = config.num_epochs * per_epoch
  schedule = recipe.learning_rate_schedule(config, per_epoch, total)
  tx = recipe.make_optimizer(config, schedule)
  traces = []
  step = functools.partial(
      train_step, model=model, tx=tx, schedule=schedule, config=config, total_steps=total,
      mean=mean, std=std, augment_on_device=dataset.augment_on_device,
      count_trace=lambda: traces.append(1))
  # check_vma=False: the pmap programming model. Gradients stay per device until the explicit
  # pmean (with varying-value tracking, JAX would psum them when transposing instead).
  options = model.execution.compiler_options()
  compiled_step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)),
                                        out_specs=(P(), P()), check_vma=False),
                          donate_argnums=0, compiler_options=options)

  compiled_eval = functools.lru_cache(maxsize=None)(functools.partial(
      evaluation.compile_eval, mesh=mesh, axis_name=AXIS, mean=mean, std=std,
      dtype=recipe.compute_dtype(config)))

  return Run(config, workdir, mesh, model, dataset, per_epoch, total, schedule, tx,
             compiled_step, compiled_eval, traces)


def initial_state(run: Run) -> TrainState:
  """Step 0 of `run`: variables from `models.init_variables` (seeded by `config.seed`), fresh
  optimizer state; built on the host and placed on the run's mesh once, replicated."""
  variables = models.init_variables(run.model, seed=run.config.seed)
  params = variables['params']
  with jax.default_device(jax.local_devices(backend='cpu')[0]):  # the host's own device
    opt_state = jax.device_get(run.tx.init(params))
    rng = jax.device_get(jax.random.PRNGKey(run.config.seed + 1))
  # The average starts from the initial weights (timm copies the model when training starts).
  ema = ({'params': params, 'batch_stats': variables['batch_stats']}
         if run.config.ema_decay else {})
  state = TrainState(step=np.zeros((), np.int32), params=params,
                     batch_stats=variables['batch_stats'], masks=variables.get('masks', {}),
                     opt_state=opt_state, rng=rng, ema=ema)
  return replicate(state, NamedSharding(run.mesh, P()))


def global_batch(run: Run, arrays: dict[str, np.ndarray]):
  """This process's share of a global batch (host arrays) -> global arrays sharded over the
  batch axis of the run's mesh."""
  return evaluation.shard_batch(run.mesh, AXIS, arrays)


def train_batches(run: Run, start_step: int):
  """This process's share of the global batches from `start_step` on."""
  return run.dataset.train_batches(run.config.seed, start_step, run.config.batch_size)


def evaluate(run: Run, eval_model, variables) -> dict[str, float]:
  """Accuracy, top-5 accuracy, loss and number of examples of `eval_model` on the whole test
  set (`evaluation.run_eval`)."""
  batches = run.dataset.eval_batches(run.config.eval_batch_size)
  result = evaluation.run_eval(run.eval_step(eval_model), variables, batches, run.mesh, AXIS)
  result.pop('img_per_s')
  return result


def _stage(run: Run, step: int) -> int:
  return condense.model_stage_at(run.model, step, run.total_steps)


def _train_loop(run: Run, state: TrainState, ckpt: checkpoint.Checkpoints,
                metrics: reporting.MetricsCollector, log,
                stop: preemption.StopSignals) -> TrainState:
  """Runs the steps from `state.step` to the end, with progress, events, evals and
  checkpoints; on SIGTERM/SIGINT writes a checkpoint after the current step and raises
  `preemption.Preempted`."""
  config, model = run.config, run.model
  lead = jax.process_index() == 0
  event_steps = condense.model_event_steps(model, run.total_steps)
  step = int(jax.device_get(state.step))
  batches = train_batches(run, step)
  bar = None

  def save(step):
    """Checkpoints `step` unless it is already saved; metrics are flushed first, so a state
    that a non-finite step produced is never written."""
    metrics.flush(step)
    if ckpt.latest_step() != step:
      ckpt.save(step, state, checkpoint.run_meta(run.config, run.model, step, _stage(run, step),
                                                 run.steps_per_epoch, run.total_steps))

  while step < run.total_steps:
    epoch, position = divmod(step, run.steps_per_epoch)
    if bar is None:
      bar = reporting.ProgressBar(epoch, config.num_epochs, run.steps_per_epoch,
                                  every=config.log_every_steps, enabled=lead)
    first = metrics.timed_since is None
    with startup.first_compilation(log) if first else contextlib.nullcontext():
      state, step_metrics = run.train_step(state, global_batch(run, next(batches)))
      metrics.add(step_metrics)  # the first step is waited for
    step += 1
    if step - 1 in event_steps:
      metrics.flush(step)
      event = event_steps.index(step - 1) + 1
      log(('\n' if bar.tty else '') + reporting.event_line(state.masks, model, step - 1, event))
    end_of_epoch = step % run.steps_per_epoch == 0 or step == run.total_steps
    if step % config.log_every_steps == 0 or end_of_epoch:
      metrics.flush(step)
      shown = ('loss', 'accuracy', 'lr', 'stage', 'img/s')
      bar.update(position + 1, {k: metrics.latest[k] for k in shown if k in metrics.latest},
                 final=end_of_epoch)
    if end_of_epoch:
      bar = None
      if (config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0
          and step < run.total_steps):
        result = evaluate(run, model, state.variables())
        metrics.writer.write(step, 'eval', result)
        line = (f'eval after epoch {epoch + 1}: accuracy {result["accuracy"]:.4f} '
                f'loss {result["loss"]:.4f}')
        if state.ema:
          averaged = evaluate(run, model, state.ema_variables())
          metrics.writer.write(step, 'eval_ema', averaged)
          line += f'; EMA {averaged["accuracy"]:.4f} loss {averaged["loss"]:.4f}'
        log(line)
    if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
      save(step)
    if (received := stop.requested(step, config.log_every_steps)) and step < run.total_steps:
      save(step)
      ckpt.wait()
      log(('\n' if bar is not None and bar.tty else '') +
          f'{received}: stopped after step {step} (stage {_stage(run, step)}) and wrote '
          f'{ckpt.directory}/{step}; run the same command again to resume.')
      raise preemption.Preempted(step)
  save(step)
  return state


def _finish(run: Run, state: TrainState, summary: dict[str, Any], log
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Exports the condensed model, evaluates both forms (and the EMA model, if any) and fills
  in the summary; returns it with the host variables that were exported."""
  model, config, workdir = run.model, run.config, run.workdir
  lead = jax.process_index() == 0
  masked = evaluate(run, model, state.variables())
  summary.update(accuracy=masked['accuracy'], test_loss=masked['loss'],
                 test_examples=masked['examples'])
  log(f'test accuracy of the trained model: {masked["accuracy"]:.4f} '
      f'({masked["examples"]} images)')
  # The EMA model, when the run keeps one, is the one exported (as the official V2 conversion).
  final = state.variables()
  if state.ema:
    final = state.ema_variables()
    averaged = evaluate(run, model, final)
    summary.update(ema_accuracy=averaged['accuracy'], ema_test_loss=averaged['loss'])
    log(f'test accuracy of the EMA of the weights: {averaged["accuracy"]:.4f}')
  final = jax.device_get(final)
  if models.condenses(model):
    summary['condensing_event_steps'] = condense.model_event_steps(model, run.total_steps)
    summary['condensed_from'] = 'ema' if state.ema else 'weights'
    small, small_vars = condense.export(model, final, classifier_keep=config.classifier_keep)
    condensed = evaluate(run, small, replicate(small_vars, NamedSharding(run.mesh, P())))
    summary.update(condensed_accuracy=condensed['accuracy'],
                   condensed_test_loss=condensed['loss'])
    log(reporting.condensed_line(condensed['accuracy'], summary))
    if lead:
      checkpoint.save_condensed(os.path.join(workdir, 'condensed'), small, small_vars,
                                preprocessing=run.dataset.preprocessing())
  summary['final_state_sha256'] = checkpoint.state_sha256(state)
  return summary, final


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, condenses, exports and evaluates; returns (and writes) the run summary.

  Starting again in the same `workdir` resumes from its latest checkpoint; in a workdir whose
  run has ended, returns the saved summary and changes nothing. Mistakes in `config` or
  `workdir` raise ValueError before anything is written.
  """
  start_time = time.time()
  log = startup.start(config, workdir)
  lead = jax.process_index() == 0
  run = setup(config, workdir)
  model = run.model
  finished = checkpoint.finished_summary(workdir, run.total_steps, config)
  if finished is not None:
    log(f'the run in {workdir} has finished ({run.total_steps} steps, test accuracy '
        f'{finished.get("accuracy", float("nan")):.4f}); its summary is '
        f'{os.path.join(workdir, "summary.json")}. Nothing to do: use another --workdir '
        'to train again.')
    return finished
  costs = flops.costs(model, config.classifier_keep)
  log(reporting.run_header(model, config.dataset, costs, run.total_steps, run.steps_per_epoch,
                           config.num_epochs, config.batch_size, run.mesh.size,
                           jax.devices()[0].platform))
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  writer = reporting.MetricsWriter(workdir, enabled=lead)
  try:
    with preemption.StopSignals() as stop:
      state = initial_state(run)
      if ckpt.latest_step() is not None:
        state = checkpoint.restore_latest(ckpt, state, run.model, run.config, log)
      start_step = int(jax.device_get(state.step))
      metrics = reporting.MetricsCollector(writer, config.batch_size)
      state = _train_loop(run, state, ckpt, metrics, log, stop)
      ckpt.wait()
    summary = {'model': type(model).__name__, 'dataset': config.dataset,
               'total_steps': run.total_steps, 'steps_this_run': run.total_steps - start_step,
               'resumed_from_step': start_step or None, 'train_img_per_s': metrics.img_per_s(),
               'train_step_compilations': len(run.traces), **costs}
    summary, final = _finish(run, state, summary, log)
    summary['wall_seconds'] = time.time() - start_time
    if lead:
      path = reporting.write_summary(workdir, writer, summary, run.total_steps)
      log(f'summary written to {path}')
      drawn = plots.write_all(workdir, model, final, summary.get('condensing_event_steps'))
      log(f'pictures: {", ".join(os.path.basename(p) for p in drawn)} in {workdir}')
    return summary
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
