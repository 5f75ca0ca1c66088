"""Checks of a run's config before anything is loaded, compiled or written.

Every check raises ValueError with one line that names the field, the value and the fix; the
command line prints that line as it is (`train.py`).
"""

from condensenet_jax import condense, data, models, rand_augment, reporting
from condensenet_jax.execution import Execution

# Config fields that must be positive integers, and what each one counts.
_POSITIVE_INTS = {'batch_size': 'the global batch size',
                  'eval_batch_size': 'the evaluation batch size',
                  'num_epochs': 'the number of epochs',
                  'log_every_steps': 'the number of steps between log lines',
                  'keep_checkpoints': 'the number of checkpoints kept'}
_NON_NEGATIVE = ('learning_rate', 'weight_decay', 'group_lasso', 'warmup_epochs',
                 'warmup_initial_lr', 'checkpoint_every_steps', 'eval_every_epochs',
                 'crop_padding')
# Config fields that were renamed: a config that still sets one is told the new name.
RENAMED_FIELDS = {'model.conv_lowering': 'execution.conv_lowering',
                  'model.dense_blocks': 'execution.dense_block_form',
                  'model.gathers': 'execution.condensed_gathers',
                  'cpu_convolutions': 'execution.cpu_convolutions',
                  'eval_chunk': 'execution.eval_chunk'}


def validate(config, devices: int) -> None:
  """Checks of `config` alone, for a run over `devices` devices.

  Raises:
    ValueError: a renamed field, a count that is not a positive integer, a negative rate, a
      label smoothing or EMA decay outside [0, 1), an erasing probability outside [0, 1], a
      RandAugment policy that `rand_augment.Policy.parse` refuses, a classifier fraction
      outside (0, 1], an unknown dataset, a batch that the devices do not divide, or an
      unknown execution choice.
  """
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
  if not 0 <= config.random_erasing <= 1:
    raise ValueError(f'config.random_erasing={config.random_erasing!r} must be a probability '
                     'in [0, 1] (0.2 in the V2 recipe).')
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f'config.label_smoothing={config.label_smoothing!r} must be in [0, 1) '
                     '(the probability spread over all classes; 0.1 in the V2 recipe).')
  if config.rand_augment:
    rand_augment.Policy.parse(config.rand_augment)
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f'config.ema_decay={config.ema_decay!r} must be in [0, 1) (0: no '
                     'average of the weights; 0.9998 in the V2 recipe).')
  if not 0 < config.classifier_keep <= 1:
    raise ValueError(f'config.classifier_keep={config.classifier_keep!r} must be in (0, 1] '
                     '(the fraction of classifier inputs the export keeps).')
  if config.dataset not in data.DATASETS:
    raise ValueError(f'config.dataset={config.dataset!r} is unknown; use one of '
                     f'{data.DATASETS}.')
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise ValueError(f'config.{field}={config[field]} is not divisible by the {devices} '
                       f'devices; use a multiple of {devices}.')
  Execution.from_config(config)


def check_model_and_data(config, model, dataset: data.DataSource) -> None:
  """Checks that `model` can be built and takes `dataset`'s images, and that the run is long
  enough for its condensing events.

  Raises:
    ValueError: an architecture that cannot be built (`CondenseNet.check`), images of another
      size than the model takes, or fewer steps than the condensing events need.
  """
  if models.condenses(model):
    model.check()
  size, needed = dataset.image_size, models.default_image_size(model)
  if size != needed:
    raise ValueError(
        f'config.model.stem={model.stem!r} with {len(model.stages)} dense blocks needs '
        f'{needed}x{needed} images, but {dataset.name} images are {size}x{size}; use '
        f"stem='{'cifar' if size == 32 else 'imagenet'}' or a matching number of stages.")
  per_epoch = data.steps_per_epoch(dataset.num_train, config.batch_size)
  total = config.num_epochs * per_epoch
  if not models.condenses(model):
    return
  c = model.condense_factor
  steps = f'{total} training steps ({reporting.epochs(config.num_epochs)} of {per_epoch})'
  if total < 2 * (c - 1):
    raise ValueError(
        f'{steps} are too few for condense_factor={c}: its {c - 1} condensing events need at '
        f'least {2 * (c - 1)} steps (the condensing stages take the first half of training); '
        'raise config.num_epochs.')
  if len(condense.model_event_steps(model, total)) < c - 1:
    raise ValueError(
        f"{steps} never reach CondenseNetV2's last condensing event: it falls at step "
        f'{-(-total // 2)}, after the official guard stops condensing (progress 0.5005, step '
        f'{condense.last_stage_step(total)}), and the model would not be fully condensed; '
        'make the total an even number of steps or more than 1000 (config.num_epochs).')
