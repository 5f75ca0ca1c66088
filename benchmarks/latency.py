"""Inference latency of the masked and condensed CondenseNet on this machine, batch by batch.

    python -m benchmarks.latency --config configs/cifar.py --batch-sizes 1,32
    python -m benchmarks.latency --config configs/cifar.py --official-dir CHECKOUT

From one set of fully condensed random weights (the config's model, `models.init_variables`,
every condensing event applied, exported with the config's `classifier_keep`), times in one
process, one form after the other at each batch size:

  masked            the trained form, `jit(model.apply)` with the variables as arguments
  masked_folded     the same with the variables closed over: XLA folds what depends on the
                    weights alone (kernel * mask) into constants
  condensed         the condensed form with the variables as arguments (what
                    `checkpoint.load_classifier` runs)
  condensed_folded  the condensed form with the variables closed over
  exported          the `jax.export` artifact of `python -m condensenet_jax export --format
                    jax` (weights inside as constants, uint8 images in)
  tflite     the TFLite model of `export --format tflite` (fixed batch) in the TFLite
             interpreter with as many threads as cores

and, with `--official-dir` (a checkout of the official code of the config's generation,
CondenseNet or CondenseNetV2) and PyTorch, the official masked and converted models of the
same architecture (`benchmarks.official_torch`, eval mode, no gradients, its own random
weights). Median
milliseconds of `--repeats` calls after `--warmup`; the last line is JSON:
`{"masked": {"1": ms, ...}, "condensed": {...}, ..., "ratios": {...}}`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.bench import load_config


def _median_ms(fn, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return 1000 * float(np.median(times))


def _model(config):
  """The config's model, for its dataset's classes."""
  from condensenet_jax import data, recipe  # pylint: disable=g-import-not-at-top
  return recipe.build_model(config, data.SHAPES[config.dataset][1])


def _forms(config):
  """(masked model, variables, condensed model, variables, artifacts.Loaded of the latter)."""
  from condensenet_jax import artifacts, condense, models  # pylint: disable=g-import-not-at-top
  model = _model(config)
  variables = models.init_variables(model, seed=0)
  masks = condense.condense_all(variables['params'], variables['masks'], model)
  variables = {**variables, 'masks': masks}
  small, small_vars = condense.export(model, variables, config.classifier_keep)
  loaded = artifacts.Loaded('condensed', small, small_vars,
                            artifacts.known_preprocessing(config.dataset), config.dataset,
                            '.', 'random weights')
  return model, variables, small, small_vars, loaded


def measure(config, batch_sizes, repeats: int, warmup: int, tflite: bool = True) -> dict:
  """`{form: {batch: median ms}}` for the JAX forms and, if `tflite`, the TFLite model."""
  import jax  # pylint: disable=g-import-not-at-top
  from condensenet_jax import models  # pylint: disable=g-import-not-at-top
  from condensenet_jax.tools import export  # pylint: disable=g-import-not-at-top
  model, variables, small, small_vars, loaded = _forms(config)
  size = models.default_image_size(model)
  variables, small_vars = jax.device_put(variables), jax.device_put(small_vars)
  masked = jax.jit(lambda v, x: model.apply(v, x))
  condensed = jax.jit(lambda v, x: small.apply(v, x))
  masked_folded = jax.jit(lambda x: model.apply(variables, x))
  condensed_folded = jax.jit(lambda x: small.apply(small_vars, x))
  results = {'masked': {}, 'masked_folded': {}, 'condensed': {}, 'condensed_folded': {},
             'exported': {}, 'tflite': {}}
  with tempfile.TemporaryDirectory() as out:
    path = os.path.join(out, 'condensed.jax')
    export.export_jax(loaded, path)
    with open(path, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    for batch in batch_sizes:
      rng = np.random.default_rng(batch)
      images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
      x = jax.device_put(rng.normal(size=(batch, size, size, 3)).astype(np.float32))
      on_device = jax.device_put(images)
      results['masked'][str(batch)] = _median_ms(
          lambda: masked(variables, x).block_until_ready(), repeats, warmup)
      results['masked_folded'][str(batch)] = _median_ms(
          lambda: masked_folded(x).block_until_ready(), repeats, warmup)
      results['condensed'][str(batch)] = _median_ms(
          lambda: condensed(small_vars, x).block_until_ready(), repeats, warmup)
      results['condensed_folded'][str(batch)] = _median_ms(
          lambda: condensed_folded(x).block_until_ready(), repeats, warmup)
      results['exported'][str(batch)] = _median_ms(
          lambda: exported.call(on_device).block_until_ready(), repeats, warmup)
      if tflite:
        results['tflite'][str(batch)] = _tflite_ms(loaded, out, batch, images, repeats, warmup)
  return {k: v for k, v in results.items() if v}


def _tflite_ms(loaded, out, batch, images, repeats, warmup) -> float:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from condensenet_jax.tools import export  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, f'condensed_{batch}.tflite')
  export.export_tflite(loaded, path, batch)
  interpreter = tf.lite.Interpreter(model_path=path, num_threads=os.cpu_count())
  interpreter.allocate_tensors()
  source = interpreter.get_input_details()[0]['index']

  def call():
    interpreter.set_tensor(source, images)
    interpreter.invoke()
  return _median_ms(call, repeats, warmup)


def official(official_dir: str, model, batch_sizes, repeats: int, warmup: int) -> dict:
  """`{'official_masked': {...}, 'official_converted': {...}}` of `model`'s architecture from
  `benchmarks.official_torch` in a subprocess per batch size. Exits with its error line when it
  fails (no PyTorch, or a checkout of the other generation's code)."""
  from condensenet_jax import models  # pylint: disable=g-import-not-at-top
  arch = json.dumps({'name': type(model).__name__, **models.architecture(model)})
  results = {'official_masked': {}, 'official_converted': {}}
  for batch in batch_sizes:
    command = [sys.executable, '-m', 'benchmarks.official_torch', '--official-dir', official_dir,
               '--arch', arch, '--modes', 'infer_masked,infer_converted',
               '--infer-batch', str(batch), '--steps', str(repeats), '--warmup', str(warmup),
               '--device', 'cpu']
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
      lines = done.stderr.strip().splitlines() or ['(no output)']
      raise SystemExit(next((l for l in lines if l.startswith('error:')), f'error: the '
                            f'official model did not run: {lines[-1]}'))
    out = done.stdout
    for line in out.splitlines():
      if line.startswith('{'):
        record = json.loads(line)
        name = 'official_' + record['mode'].removeprefix('infer_')
        results[name][str(batch)] = record['step_ms_median']
  return results


def ratios(results: dict) -> dict:
  """The comparisons the targets name, per batch size: the best condensed form against the
  masked model (as run with its variables as arguments, and at its best) and against the
  official converted model."""
  out = {}
  for batch in results.get('masked', {}):
    best = min(results[f][batch] for f in ('condensed', 'condensed_folded', 'exported', 'tflite')
               if batch in results.get(f, {}))
    best_masked = min(results[f][batch] for f in ('masked', 'masked_folded'))
    out[batch] = {'best_condensed_over_masked': best / results['masked'][batch],
                  'best_condensed_over_best_masked': best / best_masked}
    if batch in results.get('official_converted', {}):
      out[batch]['official_converted_over_best_condensed'] = (
          results['official_converted'][batch] / best)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--batch-sizes', default='1,32')
  parser.add_argument('--repeats', type=int, default=50)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--no-tflite', action='store_true')
  parser.add_argument('--official-dir', default=None)
  args = parser.parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  config = load_config(args.config)
  results = measure(config, batch_sizes, args.repeats, args.warmup, not args.no_tflite)
  if args.official_dir:
    results.update(official(args.official_dir, _model(config), batch_sizes, args.repeats,
                            args.warmup))
  results['ratios'] = ratios(results)
  for form, values in results.items():
    if form != 'ratios':
      print(f'{form:20s}' + ''.join(f'  batch {b}: {ms:8.2f} ms' for b, ms in values.items()))
  print(json.dumps(results))
  return results


if __name__ == '__main__':
  main()
