"""Evaluation programs: a model's logits in eval mode, in chunks, and the sums a test set needs.

`eval_step` runs per device inside `shard_map` over a named axis, as the training step does;
`compile_eval` compiles it for a mesh, `run_eval` feeds it a test set and `summarize` turns its
sums into accuracy, top-5 accuracy and mean loss on the host.
"""

import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
  """Sums over the global batch of correct predictions (top-1 and top-5), loss and real
  examples.

  `batch`: `{'image': uint8 [b, h, w, 3], 'label': int32 [b], 'valid': [b]}` (this device's
  share); examples with `valid` 0 (padding of the last batch) count for nothing. Top-5 counts
  a label among the `min(5, classes)` largest logits.
  """
  logits = inference_logits(model, variables,
                            data.normalize(batch['image'], mean, std, dtype), chunk)
  valid, labels = batch['valid'], batch['label']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  _, top = lax.top_k(logits, min(5, logits.shape[-1]))
  in_top5 = jnp.any(top == labels[:, None], axis=-1)
  return lax.psum({'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * valid),
                   'correct_top5': jnp.sum(in_top5 * valid),
                   'loss': jnp.sum(ce * valid), 'count': jnp.sum(valid)}, axis_name)


def compile_eval(model, mesh: Mesh, axis_name: str, mean, std, dtype) -> Callable:
  """`eval_step` of `model` compiled over `mesh` (batch split along `axis_name`), in the
  chunks and with the XLA options of `model.execution`: `fn(variables, batch) -> sums`."""
  fn = lambda v, b: eval_step(v, b, model=model, mean=mean, std=std, dtype=dtype,
                              chunk=model.execution.inference_chunk(), axis_name=axis_name)
  # check_vma=False: the pmap programming model, as the training step.
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=P(),
                               check_vma=False),
                 compiler_options=model.execution.compiler_options())


def shard_batch(mesh: Mesh, axis_name: str, arrays: dict[str, np.ndarray]):
  """This process's share of a global batch (host arrays) -> global arrays sharded over
  `axis_name` of `mesh`."""
  sharding = NamedSharding(mesh, P(axis_name))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


def run_eval(fn: Callable, variables, batches: Iterable, mesh: Mesh, axis_name: str,
             progress: Optional[Callable[[int], None]] = None) -> dict[str, float]:
  """`summarize` of `fn` (from `compile_eval`) over `batches` of `(images, labels, valid)`,
  with `img_per_s`, the examples a second after the first batch (which compiles).
  `progress(batches_done)` is called after each batch."""
  results, started, first = [], None, 0.0
  for i, (images, labels, valid) in enumerate(batches, start=1):
    out = fn(variables, shard_batch(mesh, axis_name,
                                    {'image': images, 'label': labels, 'valid': valid}))
    results.append(out)
    if started is None:
      jax.block_until_ready(out)
      started, first = time.perf_counter(), float(np.sum(valid))
    if progress is not None:
      progress(i)
  summary = summarize(results)
  seconds = time.perf_counter() - started if started is not None else 0.0
  timed = summary['examples'] - first
  summary['img_per_s'] = timed / seconds if timed > 0 and seconds > 0 else None
  return summary


def summarize(results: Iterable[dict[str, Any]]) -> dict[str, float]:
  """Accuracy, top-5 accuracy, mean loss and number of examples from the `eval_step` results
  of a test set."""
  totals = None
  for out in results:
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'accuracy': float(totals['correct']) / count,
          'top5': float(totals['correct_top5']) / count,
          'loss': float(totals['loss']) / count, 'examples': int(count)}
