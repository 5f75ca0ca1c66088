"""Evaluation programs: a model's logits in eval mode, in chunks, and the sums a test set needs.

`eval_step` runs per device inside `shard_map` over the named axis `train.AXIS`, as the
training step does; `summarize` adds its results over a test set on the host.
"""

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from condensenet_jax import data


def inference_logits(model, variables, x, chunk: int = 0):
  """`model.apply(variables, x)` in eval mode, in chunks of `chunk` examples (`lax.map`) when
  `chunk` divides the batch; the same function (no example sees another in eval mode)."""
  n = x.shape[0]
  if not chunk or n <= chunk or n % chunk:
    return model.apply(variables, x, train=False)
  chunks = x.reshape((n // chunk, chunk) + x.shape[1:])
  logits = lax.map(lambda c: model.apply(variables, c, train=False), chunks)
  return logits.reshape((n,) + logits.shape[2:])


def eval_step(variables, batch, *, model, mean, std, dtype, chunk=0, axis_name='batch'):
  """Sums of correct predictions, loss and real examples over the global batch.

  `batch`: `{'image': uint8 [b, h, w, 3], 'label': int32 [b], 'valid': bool [b]}` (this
  device's share); examples with `valid` False (padding of the last batch) count for nothing.
  """
  logits = inference_logits(model, variables,
                            data.normalize(batch['image'], mean, std, dtype), chunk)
  valid = batch['valid']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  return lax.psum({'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * valid),
                   'loss': jnp.sum(ce * valid), 'count': jnp.sum(valid)}, axis_name)


def summarize(results: Iterable[dict[str, Any]]) -> dict[str, float]:
  """Accuracy, mean loss and number of examples from the `eval_step` results of a test set."""
  totals = None
  for out in results:
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count,
          'examples': int(count)}
