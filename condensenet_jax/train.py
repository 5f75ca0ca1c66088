"""Training: the compiled data-parallel step, evaluation, checkpoints, export and summary.

The step is written per device (named axis `'batch'`: `lax.pmean` of gradients, metrics and
BN running statistics) and compiled once with `jax.jit(jax.shard_map(...))` over a 1-D mesh of
all devices; the same program serves one CPU, several GPUs and many hosts. Inside the step the
condensing event of a new stage is applied before the forward pass (decided on device from the
step number), so the whole run, all stages included, is one compilation.
"""

import dataclasses
import functools
import json
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

from condensenet_jax import (checkpoint, condense, data, execution, flops, models, preemption,
                             reporting, startup)

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

  def variables(self, masks=None):
    """The model's variables: `params`, `batch_stats` and, when there are any, `masks`
    (`masks` replaces the state's own)."""
    v = {'params': self.params, 'batch_stats': self.batch_stats}
    masks = self.masks if masks is None else masks
    if masks:
      v['masks'] = masks
    return v


# --- building blocks from the config ------------------------------------------------------

def compute_dtype(config):
  """`jnp.float32` or `jnp.bfloat16` for `config.dtype`; raises ValueError for another."""
  if config.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'.")
  return jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32


def build_model(config, num_classes: int, backend: Optional[str] = None):
  """The training-form model described by `config.model`, executing as `config.execution`
  says on `backend` (default: JAX's).

  Raises:
    ValueError: an unknown `config.model.name` or `config.dtype`.
  """
  m = config.model
  common = dict(stages=tuple(m.stages), growth=tuple(m.growth), bottleneck=m.bottleneck,
                group_1x1=m.group_1x1, group_3x3=m.group_3x3, num_classes=num_classes,
                stem=m.stem, dtype=compute_dtype(config),
                execution=execution.Execution.from_config(config, backend),
                bn_axis_name=AXIS if config.sync_batch_stats else None)
  if m.name == 'CondenseNet':
    return models.CondenseNet(condense_factor=m.condense_factor, dropout_rate=m.dropout_rate,
                              **common)
  if m.name == 'DenseNet':
    return models.DenseNet(reduction=m.reduction, **common)
  raise ValueError(f"config.model.name={m.name!r}: use 'CondenseNet' or 'DenseNet'.")


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Cosine decay per step to 0 (official), after an optional linear warmup; the peak is
  `learning_rate * batch_size / lr_base_batch_size` when `lr_base_batch_size` is set."""
  peak = config.learning_rate
  if config.lr_base_batch_size:
    peak *= config.batch_size / config.lr_base_batch_size
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  if not warmup:
    return cosine
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), cosine], [warmup])


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and PyTorch's coupled weight decay (added to the gradient)."""
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))


# --- the per-device programs --------------------------------------------------------------

def _apply_events(state: TrainState, model, total_steps: int):
  """Masks for this step: the condensing events of every stage entered since the last step
  (one, at the first step of a stage; more only if a stage lasted zero steps)."""
  c = model.condense_factor
  stage = condense.stage_at(state.step, total_steps, c)
  previous = condense.stage_at(jnp.maximum(state.step - 1, 0), total_steps, c)
  event = lambda _, masks: condense.condense_event(state.params, masks, model)
  return lax.fori_loop(0, stage - previous, event, state.masks), stage


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
  x = data.normalize(images, mean, std, compute_dtype(config))
  dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(AXIS))
  use_lasso = bool(state.masks) and config.group_lasso > 0

  def loss_fn(params):
    logits, updates = model.apply(
        {**state.variables(masks), 'params': params}, x, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_key})
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
                      opt_state=opt_state)
  # A non-finite step is not applied: the state stays the last good one, the host stops.
  # One conditional over the whole state, not a select per array (fewer kernels to compile).
  new = lax.cond(finite, lambda: new, lambda: state)
  return new, metrics


def inference_logits(model, variables, x, chunk: int = 0):
  """`model.apply(variables, x)` in eval mode, in chunks of `chunk` examples (`lax.map`) when
  `chunk` divides the batch; the same function (no example sees another in eval mode)."""
  n = x.shape[0]
  if not chunk or n <= chunk or n % chunk:
    return model.apply(variables, x, train=False)
  chunks = x.reshape((n // chunk, chunk) + x.shape[1:])
  logits = lax.map(lambda c: model.apply(variables, c, train=False), chunks)
  return logits.reshape((n,) + logits.shape[2:])


def eval_step(variables, batch, *, model, mean, std, dtype, chunk=0):
  """Sums of correct predictions, loss and real examples over the global batch."""
  logits = inference_logits(model, variables,
                            data.normalize(batch['image'], mean, std, dtype), chunk)
  valid = batch['valid']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return lax.psum({'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * valid),
                   'loss': jnp.sum(ce * valid), 'count': jnp.sum(valid)}, AXIS)


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


# Config fields that must be positive integers, and what each one counts.
_POSITIVE_INTS = {'batch_size': 'the global batch size',
                  'eval_batch_size': 'the evaluation batch size',
                  'num_epochs': 'the number of epochs',
                  'log_every_steps': 'the number of steps between log lines',
                  'keep_checkpoints': 'the number of checkpoints kept'}
# Config fields that were renamed: a config that still sets one is told the new name.
RENAMED_FIELDS = {'model.conv_lowering': 'execution.conv_lowering',
                  'model.dense_blocks': 'execution.dense_block_form',
                  'model.gathers': 'execution.condensed_gathers',
                  'cpu_convolutions': 'execution.cpu_convolutions',
                  'eval_chunk': 'execution.eval_chunk'}
_NON_NEGATIVE = ('learning_rate', 'weight_decay', 'group_lasso', 'warmup_epochs',
                 'checkpoint_every_steps', 'eval_every_epochs', 'crop_padding')


def validate(config, devices: int) -> None:
  """Checks done before anything is loaded or compiled; raises ValueError naming the field,
  the value and the fix."""
  for old, new in RENAMED_FIELDS.items():
    parent, _, leaf = old.rpartition('.')
    if leaf in (config[parent] if parent else config):
      raise ValueError(f'config.{old} is now config.{new}; rename it in the config file.')
  for field, what in _POSITIVE_INTS.items():
    value = config[field]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.{field}={value!r}: {what} must be a positive integer.')
  for field in _NON_NEGATIVE:
    if config[field] < 0:
      raise ValueError(f'config.{field}={config[field]!r} must not be negative.')
  if not 0 < config.classifier_keep <= 1:
    raise ValueError(f'config.classifier_keep={config.classifier_keep!r} must be in (0, 1] '
                     '(the fraction of classifier inputs the export keeps).')
  if config.dataset not in data.DATASETS:
    raise ValueError(f'config.dataset={config.dataset!r} is unknown; use one of '
                     f'{data.DATASETS}.')
  if config.batch_size % devices:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{devices} devices; use a multiple of {devices}.')
  if config.eval_batch_size % devices:
    raise ValueError(f'config.eval_batch_size={config.eval_batch_size} is not divisible by '
                     f'the {devices} devices; use a multiple of {devices}.')
  execution.Execution.from_config(config)


def setup(config, workdir: str, devices=None,
          dataset: Optional[data.DataSource] = None) -> Run:
  """Loads the data and builds the model, schedule and compiled programs of a run over
  `devices` (default: all devices of all processes). A given `dataset` (a `data.DataSource`,
  for example `data.synthetic`) replaces the one `config.dataset` names.

  Raises:
    ValueError: naming the field and the fix, for a config that cannot run (`validate`, the
      model's architecture, an image size the model does not take, too few steps to condense).
    DatasetUnavailableError: the data is not on disk and cannot be downloaded.
  """
  devices = jax.devices() if devices is None else devices
  validate(config, len(devices))
  mesh = Mesh(np.asarray(devices), (AXIS,))
  if dataset is None:
    dataset = data.load(config.dataset, config.data_dir)
  mean, std = dataset.mean, dataset.std
  backend = devices[0].platform
  model = build_model(config, dataset.num_classes, backend)
  if isinstance(model, models.CondenseNet):
    model.check()
  image_size = dataset.image_size
  if image_size != models.default_image_size(model):
    raise ValueError(
        f"config.model.stem={model.stem!r} with {len(model.stages)} dense blocks needs "
        f'{models.default_image_size(model)}x{models.default_image_size(model)} images, but '
        f'{dataset.name} images are {image_size}x{image_size}; use '
        f"stem='{'cifar' if image_size == 32 else 'imagenet'}' or a matching number of "
        'stages.')
  per_epoch = data.steps_per_epoch(dataset.num_train, config.batch_size)
  total = config.num_epochs * per_epoch
  if isinstance(model, models.CondenseNet) and total < 2 * (model.condense_factor - 1):
    c = model.condense_factor
    raise ValueError(
        f'{total} training steps ({_epochs(config.num_epochs)} of {per_epoch}) are too few for '
        f'condense_factor={c}: its {c - 1} condensing events need at least {2 * (c - 1)} steps '
        '(the condensing stages take the first half of training); raise config.num_epochs.')
  schedule = learning_rate_schedule(config, per_epoch, total)
  tx = make_optimizer(config, schedule)
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

  @functools.lru_cache(maxsize=None)
  def compiled_eval(eval_model):
    fn = functools.partial(eval_step, model=eval_model, mean=mean, std=std,
                           dtype=compute_dtype(config), chunk=model.execution.inference_chunk())
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(),
                                 check_vma=False), compiler_options=options)

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
  state = TrainState(step=np.zeros((), np.int32), params=params,
                     batch_stats=variables['batch_stats'], masks=variables.get('masks', {}),
                     opt_state=opt_state, rng=rng)
  return replicate(state, NamedSharding(run.mesh, P()))


def global_batch(run: Run, arrays: dict[str, np.ndarray]):
  """This process's share of a global batch (host arrays) -> global arrays sharded over the
  batch axis of the run's mesh."""
  sharding = NamedSharding(run.mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


def train_batches(run: Run, start_step: int):
  """This process's share of the global batches from `start_step` on."""
  return run.dataset.train_batches(run.config.seed, start_step, run.config.batch_size)


def evaluate(run: Run, eval_model, variables) -> dict[str, float]:
  """Accuracy and loss of `eval_model` on the whole test set."""
  fn = run.eval_step(eval_model)
  totals = None
  for images, labels, valid in run.dataset.eval_batches(run.config.eval_batch_size):
    out = fn(variables, global_batch(run, {'image': images, 'label': labels,
                                           'valid': valid}))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count,
          'examples': int(count)}


def _stage(run: Run, step: int) -> int:
  if not isinstance(run.model, models.CondenseNet):
    return 0
  return condense.stage_at(step, run.total_steps, run.model.condense_factor)


def _meta(run: Run, step: int) -> dict[str, Any]:
  epoch, position = divmod(step, run.steps_per_epoch)
  return {'config': run.config.to_dict(), 'model': type(run.model).__name__,
          'model_fields': models.architecture(run.model), 'step': step,
          'stage': _stage(run, step), 'epoch': epoch, 'position_in_epoch': position,
          'total_steps': run.total_steps}


def _train_loop(run: Run, state: TrainState, ckpt: checkpoint.Checkpoints,
                metrics: reporting.MetricsCollector, log,
                stop: preemption.StopSignals) -> TrainState:
  """Runs the steps from `state.step` to the end, with progress, events, evals and
  checkpoints; on SIGTERM/SIGINT writes a checkpoint after the current step and raises
  `preemption.Preempted`."""
  config, model = run.config, run.model
  lead = jax.process_index() == 0
  event_steps = (condense.event_steps(run.total_steps, model.condense_factor)
                 if isinstance(model, models.CondenseNet) else [])
  step = int(jax.device_get(state.step))
  batches = train_batches(run, step)
  bar = None

  def save(step):
    """Checkpoints `step` unless it is already saved; metrics are flushed first, so a state
    that a non-finite step produced is never written."""
    metrics.flush(step)
    if ckpt.latest_step() != step:
      ckpt.save(step, state, _meta(run, step))

  while step < run.total_steps:
    epoch, position = divmod(step, run.steps_per_epoch)
    if bar is None:
      bar = reporting.ProgressBar(epoch, config.num_epochs, run.steps_per_epoch,
                                  every=config.log_every_steps, enabled=lead)
    first = metrics.timed_since is None
    if first:
      log(f'compiling the training step ({startup.compile_note()})...')
      started, hits = time.time(), startup.cache_hits()
    state, step_metrics = run.train_step(state, global_batch(run, next(batches)))
    metrics.add(step_metrics)  # the first step is waited for
    if first:
      how = 'loaded from the compilation cache' if startup.cache_hits() > hits else 'compiled'
      log(f'training step {how} and run in {time.time() - started:.1f} s')
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
        log(f'eval after epoch {epoch + 1}: accuracy {result["accuracy"]:.4f} '
            f'loss {result["loss"]:.4f}')
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


def _finish(run: Run, state: TrainState, summary: dict[str, Any], log) -> dict[str, Any]:
  """Exports the condensed model, evaluates both forms and fills in the summary."""
  model, config, workdir = run.model, run.config, run.workdir
  lead = jax.process_index() == 0
  masked = evaluate(run, model, state.variables())
  summary.update(accuracy=masked['accuracy'], test_loss=masked['loss'],
                 test_examples=masked['examples'])
  log(f'test accuracy of the trained model: {masked["accuracy"]:.4f} '
      f'({masked["examples"]} images)')
  if isinstance(model, models.CondenseNet):
    summary['condensing_event_steps'] = condense.event_steps(run.total_steps,
                                                             model.condense_factor)
    small, small_vars = condense.export(model, jax.device_get(state.variables()),
                                        classifier_keep=config.classifier_keep)
    condensed = evaluate(run, small, replicate(small_vars, NamedSharding(run.mesh, P())))
    summary.update(condensed_accuracy=condensed['accuracy'],
                   condensed_test_loss=condensed['loss'])
    log(f'test accuracy of the condensed model: {condensed["accuracy"]:.4f} '
        f'({summary["condensed_flops"] / 1e6:.2f}M FLOPs, '
        f'{summary["condensed_params"] / 1e6:.3f}M params; it runs '
        f'{summary["condensed_multiply_adds"] / 1e6:.1f}M multiply-adds an image, the trained '
        f'model {summary["masked_multiply_adds"] / 1e6:.1f}M)')
    if lead:
      checkpoint.save_condensed(os.path.join(workdir, 'condensed'), small, small_vars,
                                preprocessing=run.dataset.preprocessing())
  summary['final_state_sha256'] = checkpoint.state_sha256(state)
  return summary


def _epochs(n: int) -> str:
  return f'{n} epoch' + ('s' if n != 1 else '')


def _costs(run: Run) -> dict[str, int]:
  """Per image: FLOPs and params in the official convention and the multiply-adds really run,
  of the trained model and, for a CondenseNet, of the condensed form the run exports."""
  model = run.model
  size = models.default_image_size(model)
  f, p = flops.count(model, size)
  costs = {'flops': f, 'params': p, 'masked_multiply_adds': flops.multiply_adds(model, size)}
  if isinstance(model, models.CondenseNet):
    small = models.CondensedCondenseNet.from_model(model, run.config.classifier_keep)
    f, p = flops.count(small, size)
    costs.update(condensed_flops=f, condensed_params=p,
                 condensed_multiply_adds=flops.multiply_adds(small, size))
  return costs


def _header(run: Run, costs: dict[str, int]) -> str:
  model, config = run.model, run.config
  text = (f'{type(model).__name__} {list(model.stages)}x{list(model.growth)} on '
          f'{config.dataset}: {costs["flops"] / 1e6:.2f}M FLOPs, '
          f'{costs["params"] / 1e6:.3f}M params')
  if 'condensed_multiply_adds' in costs:
    text += (f' (official convention; multiply-adds really run: '
             f'{costs["masked_multiply_adds"] / 1e6:.1f}M masked, '
             f'{costs["condensed_multiply_adds"] / 1e6:.1f}M condensed)')
  return (f'{text}; {run.total_steps} steps ({_epochs(config.num_epochs)} of '
          f'{run.steps_per_epoch}), global batch {config.batch_size} on {run.mesh.size} '
          f'{jax.devices()[0].platform} device(s)')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, condenses, exports and evaluates; returns (and writes) the run summary.

  Starting again in the same `workdir` resumes from its latest checkpoint; in a workdir whose
  run has ended, returns the saved summary and changes nothing. Mistakes in `config` or
  `workdir` raise ValueError before anything is written.
  """
  start_time = time.time()
  startup.check_workdir(workdir)
  startup.configure_determinism(config)
  # Before the first compilation (JAX decides then whether it uses a persistent cache); the
  # directory is made by the first compilation, after the config has been checked.
  startup.enable_compilation_cache(config, workdir)
  startup.maybe_initialize_distributed()
  lead = jax.process_index() == 0
  log = (lambda *a: print(*a, flush=True)) if lead else (lambda *a: None)
  run = setup(config, workdir)
  model = run.model
  finished = checkpoint.finished_summary(workdir, run.total_steps, config)
  if finished is not None:
    log(f'the run in {workdir} has finished ({run.total_steps} steps, test accuracy '
        f'{finished.get("accuracy", float("nan")):.4f}); its summary is '
        f'{os.path.join(workdir, "summary.json")}. Nothing to do: use another --workdir '
        'to train again.')
    return finished
  costs = _costs(run)
  log(_header(run, costs))
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
    summary = _finish(run, state, summary, log)
    summary['wall_seconds'] = time.time() - start_time
    if lead:
      writer.write(run.total_steps, 'final',
                   {k: v for k, v in summary.items() if isinstance(v, (int, float))})
      with open(os.path.join(workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
      log(f'summary written to {os.path.join(workdir, "summary.json")}')
    return summary
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
