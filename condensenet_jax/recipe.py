"""The training recipe a config describes: the model, the learning-rate schedule, the optimizer.

`config.model` names the network (`build_model`), `config.execution` how it runs
(`execution.Execution`), and the optimization fields the official recipe: SGD with Nesterov
momentum, PyTorch's coupled weight decay and a per-step cosine schedule.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from condensenet_jax import models
from condensenet_jax.execution import Execution


def compute_dtype(config):
  """`jnp.float32` or `jnp.bfloat16` for `config.dtype`; raises ValueError for another."""
  if config.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'.")
  return jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32


def build_model(config, num_classes: int, backend: Optional[str] = None,
                bn_axis_name: Optional[str] = None):
  """The training-form model described by `config.model`, executing as `config.execution`
  says on `backend` (default: JAX's); with `config.sync_batch_stats` its BN batch statistics
  are averaged over the mapped axis `bn_axis_name`.

  Raises:
    ValueError: an unknown `config.model.name` or `config.dtype`.
  """
  m = config.model
  common = dict(stages=tuple(m.stages), growth=tuple(m.growth), bottleneck=m.bottleneck,
                group_1x1=m.group_1x1, group_3x3=m.group_3x3, num_classes=num_classes,
                stem=m.stem, dtype=compute_dtype(config),
                execution=Execution.from_config(config, backend),
                bn_axis_name=bn_axis_name if config.sync_batch_stats else None)
  if m.name == 'CondenseNet':
    return models.CondenseNet(condense_factor=m.condense_factor, dropout_rate=m.dropout_rate,
                              **common)
  if m.name == 'CondenseNetV2':
    return models.CondenseNetV2(
        condense_factor=m.condense_factor, group_trans=m.group_trans,
        trans_factor=m.trans_factor, hs_start_block=m.hs_start_block,
        se_start_block=m.se_start_block, last_se_reduction=m.last_se_reduction,
        fc_channel=m.fc_channel, **common)
  if m.name == 'DenseNet':
    return models.DenseNet(reduction=m.reduction, **common)
  raise ValueError(f"config.model.name={m.name!r}: use 'CondenseNet', 'CondenseNetV2' or "
                   "'DenseNet'.")


def learning_rate_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Cosine decay per step to 0 (official), after an optional linear warmup from
  `warmup_initial_lr`; the peak is `learning_rate * batch_size / lr_base_batch_size` when
  `lr_base_batch_size` is set."""
  peak = config.learning_rate
  if config.lr_base_batch_size:
    peak *= config.batch_size / config.lr_base_batch_size
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  if not warmup:
    return cosine
  return optax.join_schedules(
      [optax.linear_schedule(config.warmup_initial_lr, peak, warmup), cosine], [warmup])


def make_optimizer(config, schedule) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and PyTorch's coupled weight decay (added to the gradient);
  with `weight_decay_vectors=False` no decay of the 1-D parameters (BN scales and biases,
  biases), as timm's optimizer factory does for CondenseNetV2."""
  mask = None if config.weight_decay_vectors else (
      lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
