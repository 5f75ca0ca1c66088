"""Preemption: SIGTERM and SIGINT become a request to stop after the current step, agreed by
every process of a multi-host run; the run then writes a checkpoint and raises `Preempted`."""

import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run stopped on SIGTERM/SIGINT after writing a checkpoint; run again to resume."""


class StopSignals:
  """Turns SIGTERM and SIGINT into a request to stop after the current step (a second SIGINT
  interrupts at once)."""

  def __init__(self):
    self.signal, self.previous = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def requested(self, step: int, every: int) -> Optional[str]:
    """The signal to stop for, once every process agrees (they compare every `every` steps;
    a lone process checks at every step)."""
    if jax.process_count() == 1:
      return self.signal
    if step % every:
      return None
    flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
    return (self.signal or 'a signal on another host') if np.any(flags) else None
