"""Times the grouped-convolution lowerings of a model on the current backend.

    python -m benchmarks.lowering --model CondenseNet86 --batch-size 64

For each lowering ('grouped', 'block_diagonal', 'per_group') prints the compile time and the
median time of the training-form forward pass (train mode: batch statistics), of forward +
backward (gradient of the summed logits w.r.t. the params), and of condensed-model inference;
the last line is a JSON object with all figures. The lowering 'auto' picks on this backend is
marked. Programs are compiled with the training run's options (`execution.compiler_options`;
`--cpu-convolutions` as `config.execution.cpu_convolutions`).
"""

import argparse
import json
import time

import jax
import numpy as np

from condensenet_jax import condense, execution, models


def _time(fn, *args, repeats):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times)) * 1000


def _condensed(model):
  variables = models.init_variables(model, seed=0)
  masks = condense.condense_all(variables['params'], variables['masks'], model)
  return condense.export(model, {**variables, 'masks': masks})


def main():
  """Times each lowering named by the command line and prints one row each, then the JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='CondenseNet86')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--lowerings', default=','.join(execution.LOWERINGS))
  parser.add_argument('--cpu-convolutions', choices=execution.CPU_CONVOLUTIONS, default='xla')
  args = parser.parse_args()
  options = execution.Execution(cpu_convolutions=args.cpu_convolutions).compiler_options()
  jit = lambda fn: jax.jit(fn, compiler_options=options)
  base = getattr(models, args.model)()
  size = models.default_image_size(base)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.batch_size, size, size, 3))
  variables = models.init_variables(base, seed=0)
  small, small_vars = _condensed(base)
  auto = execution.Execution().lowering()
  results = []
  print(f'{args.model}, batch {args.batch_size}, {jax.devices()[0].device_kind} '
        f'({jax.default_backend()}); median of {args.repeats}, milliseconds')
  for lowering in args.lowerings.split(','):
    policy = execution.Execution(conv_lowering=lowering)
    model, small_model = base.clone(execution=policy), small.clone(execution=policy)
    forward = jit(lambda v, x, m=model: m.apply(v, x, train=True,
                                                mutable=['batch_stats'])[0])
    grad = jit(jax.grad(lambda p, v, x, m=model: m.apply(
        {**v, 'params': p}, x, train=True, mutable=['batch_stats'])[0].sum()))
    infer = jit(small_model.apply)
    row = {'lowering': lowering, 'auto': lowering == auto}
    row['forward_compile_s'], row['forward_ms'] = _time(forward, variables, x,
                                                        repeats=args.repeats)
    row['train_compile_s'], row['forward_backward_ms'] = _time(
        grad, variables['params'], variables, x, repeats=args.repeats)
    row['condensed_compile_s'], row['condensed_ms'] = _time(infer, small_vars, x,
                                                            repeats=args.repeats)
    results.append(row)
    print(f"{lowering:15s}{' (auto)' if row['auto'] else '       '} forward "
          f"{row['forward_ms']:8.1f}  forward+backward {row['forward_backward_ms']:8.1f}  "
          f"condensed inference {row['condensed_ms']:8.1f}", flush=True)
  print(json.dumps({'model': args.model, 'batch_size': args.batch_size,
                    'device': jax.devices()[0].device_kind, 'compiler_options': options,
                    'results': results}))


if __name__ == '__main__':
  main()
