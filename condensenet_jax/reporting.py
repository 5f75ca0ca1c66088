"""What a person sees during training: a progress bar per epoch, event and eval lines, and
metrics written to `workdir/metrics.jsonl` and TensorBoard event files in `workdir`."""

import json
import os
import sys
import time
from typing import Any, Optional

import jax
import numpy as np

from condensenet_jax import models


class ProgressBar:
  """One line per epoch, redrawn in place on a terminal; printed every `every` steps (and at
  the end of the epoch) when the output is a file or a pipe. `label` replaces the
  'epoch i/n' prefix (for progress that is not an epoch)."""

  def __init__(self, epoch: int, num_epochs: int, total: int, every: int = 50,
               stream=None, enabled: bool = True, label: Optional[str] = None):
    self.epoch, self.num_epochs, self.total, self.every = epoch, num_epochs, total, every
    self.label = label or f'epoch {epoch + 1}/{num_epochs}'
    self.stream = stream or sys.stdout
    self.enabled = enabled
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self.last_draw = 0.0

  def update(self, done: int, values: dict[str, float], final: bool = False) -> None:
    """Shows `done` of `total` steps and `values`; `final` ends the epoch's line. Draws are
    throttled (a terminal at most five times a second, a file every `every` steps); final ones
    never."""
    if not self.enabled:
      return
    now = time.monotonic()
    if self.tty and not final and now - self.last_draw < 0.2:
      return
    if not self.tty and not final and done % self.every:
      return
    self.last_draw = now
    width = 24
    filled = int(width * done / max(self.total, 1))
    bar = '#' * filled + '.' * (width - filled)
    text = ' '.join(_format(k, v) for k, v in values.items())
    line = f'{self.label} [{bar}] {done}/{self.total} {text}'
    if self.tty:
      self.stream.write('\r\033[K' + line + ('\n' if final else ''))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()


def _format(key: str, value: Any) -> str:
  if key == 'stage':
    return f'stage {int(value)}'
  if key == 'lr':
    return f'lr {value:.4g}'
  if key == 'img/s':
    return f'{value:.0f} img/s'
  if key == 'accuracy':
    return f'acc {value:.4f}'
  return f'{key} {value:.4f}'


class MetricsWriter:
  """Appends one JSON object per record to `metrics.jsonl` and scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tensorboard: Optional[Any] = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self.tensorboard = SummaryWriter(workdir)
      except ImportError:
        print('tensorboardX is not installed: no TensorBoard event files '
              '(pip install tensorboardX).', file=sys.stderr)

  def write(self, step: int, kind: str, values: dict[str, float]) -> None:
    """Appends `{'step', 'kind', **values}` as one line; numeric values also go to TensorBoard
    as `kind/key`."""
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'kind': kind, **values}) + '\n')
    if self.tensorboard is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)):
          self.tensorboard.add_scalar(f'{kind}/{key}', value, step)

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer, if any."""
    if self.tensorboard is not None:
      self.tensorboard.close()


class NonFiniteError(FloatingPointError):
  """A training step had a non-finite loss or gradient; it was not applied."""


class MetricsCollector:
  """Collects the step metrics on device and fetches them in groups (one host sync per
  group); stops the run on a non-finite step."""

  def __init__(self, writer: MetricsWriter, batch_size: int):
    self.writer, self.batch_size = writer, batch_size
    self.pending, self.latest = [], {}
    self.timed_since, self.timed_steps = None, 0

  def add(self, metrics) -> None:
    self.pending.append(metrics)
    if self.timed_since is None:  # the first step compiles: time from its end
      jax.block_until_ready(metrics)
      self.timed_since = time.time()
    else:
      self.timed_steps += 1

  def img_per_s(self) -> Optional[float]:
    if not self.timed_steps:
      return None
    return self.timed_steps * self.batch_size / (time.time() - self.timed_since)

  def flush(self, step: int) -> None:
    if not self.pending:
      return
    fetched, self.pending = jax.device_get(self.pending), []
    for i, m in enumerate(fetched):
      if not bool(m['finite']):
        raise NonFiniteError(
            f'non-finite loss or gradient at step {step - len(fetched) + i} (stage '
            f'{int(m["stage"])}, learning rate {float(m["lr"]):.4g}); the step was not '
            'applied and no checkpoint of it was written. Lower config.learning_rate or '
            'check the data.')
    values = {k: float(np.mean([m[k] for m in fetched]))
              for k in ('loss', 'cross_entropy', 'group_lasso', 'accuracy', 'grad_norm',
                        'param_norm')}
    values.update(lr=float(fetched[-1]['lr']), stage=int(fetched[-1]['stage']))
    if (speed := self.img_per_s()) is not None:
      values['img/s'] = speed
    self.latest = values
    self.writer.write(step, 'train', {k.replace('/', '_per_'): v for k, v in values.items()})


def event_line(masks, model, step: int, stage: int) -> str:
  """The line a run prints at a condensing event: how much every group keeps."""
  kept = total = 0
  for mask in jax.tree.leaves(jax.device_get(masks)):
    kept += int(mask.sum())
    total += mask.size
  c = model.condense_factor
  v2 = isinstance(model, models.CondenseNetV2)
  what = 'inputs (outputs, in the SFRs)' if v2 else 'inputs'
  return (f'condensing event {stage}/{c - 1} at step {step}: stage {stage}, every group keeps '
          f'{c - stage}/{c} of its {what} ({kept}/{total} mask entries kept)')


def epochs(n: int) -> str:
  """'1 epoch', '3 epochs'."""
  return f'{n} epoch' + ('s' if n != 1 else '')


def run_header(model, dataset: str, costs: dict[str, int], total_steps: int,
               steps_per_epoch: int, num_epochs: int, batch_size: int, devices: int,
               platform: str) -> str:
  """The line a run opens with: the model, its costs (`flops.costs`) and the schedule."""
  text = (f'{type(model).__name__} {list(model.stages)}x{list(model.growth)} on {dataset}: '
          f'{costs["flops"] / 1e6:.2f}M FLOPs, {costs["params"] / 1e6:.3f}M params')
  if 'condensed_multiply_adds' in costs:
    text += (f' (official convention; multiply-adds really run: '
             f'{costs["masked_multiply_adds"] / 1e6:.1f}M masked, '
             f'{costs["condensed_multiply_adds"] / 1e6:.1f}M condensed)')
  return (f'{text}; {total_steps} steps ({epochs(num_epochs)} of {steps_per_epoch}), '
          f'global batch {batch_size} on {devices} {platform} device(s)')


def write_summary(workdir: str, writer: MetricsWriter, summary: dict[str, Any],
                  step: int) -> str:
  """Writes `summary` to `workdir/summary.json` and its numbers as the 'final' record of
  `writer` at `step`; returns the file's path."""
  writer.write(step, 'final', {k: v for k, v in summary.items() if isinstance(v, (int, float))})
  path = os.path.join(workdir, 'summary.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=1)
  return path


def condensed_line(accuracy: float, costs: dict[str, int]) -> str:
  """The line a run prints after evaluating its condensed model, with `flops.costs`."""
  return (f'test accuracy of the condensed model: {accuracy:.4f} '
          f'({costs["condensed_flops"] / 1e6:.2f}M FLOPs, '
          f'{costs["condensed_params"] / 1e6:.3f}M params; it runs '
          f'{costs["condensed_multiply_adds"] / 1e6:.1f}M multiply-adds an image, the trained '
          f'model {costs["masked_multiply_adds"] / 1e6:.1f}M)')
