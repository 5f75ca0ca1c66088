"""What a person sees during training: a progress bar per epoch, event and eval lines, and
metrics written to `workdir/metrics.jsonl` and TensorBoard event files in `workdir`."""

import json
import os
import sys
import time
from typing import Any, Optional


class ProgressBar:
  """One line per epoch, redrawn in place on a terminal; printed every `every` steps (and at
  the end of the epoch) when the output is a file or a pipe."""

  def __init__(self, epoch: int, num_epochs: int, total: int, every: int = 50,
               stream=None, enabled: bool = True):
    self.epoch, self.num_epochs, self.total, self.every = epoch, num_epochs, total, every
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
    line = (f'epoch {self.epoch + 1}/{self.num_epochs} [{bar}] {done}/{self.total} {text}')
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
