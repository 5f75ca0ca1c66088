"""Exports a condensed model as a deployment artifact with its preprocessing inside: uint8 RGB
images NHWC in, float32 logits out.

    python -m condensenet_jax export runs/digits --format jax
    python -m condensenet_jax export runs/digits --format tflite

Writes `<workdir>/export/condensed.jax` (a serialized `jax.export` StableHLO module with a
symbolic batch dimension: `jax.export.deserialize(open(path, 'rb').read()).call(images)` runs
it with only JAX installed) or `<workdir>/export/condensed.tflite` (through jax2tf, a
SavedModel and the TFLite converter; the batch is fixed, 1 by default, because the converter
takes no gathers under a symbolic batch), and `<workdir>/export/meta.json`: the input shape and
dtype, the class names, and what to do to an image before (ImageNet: resize the shorter side,
center-crop).
"""

import os
import tempfile

import jax
import jax.numpy as jnp

from condensenet_jax import artifacts, data
from condensenet_jax.execution import Execution
from condensenet_jax.tools import common

HELP = 'the condensed model as a jax.export artifact or a TFLite file, preprocessing inside'

# jax.export platform -> the backend whose execution rules the artifact is built with
PLATFORMS = {'cpu': 'cpu', 'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}


def add_arguments(parser) -> None:
  common.add_model_arguments(parser)
  parser.add_argument('--format', choices=('jax', 'tflite'), required=True)
  parser.add_argument('--out', default=None,
                      help='output directory (default: <workdir>/export, or export/ beside a '
                           'condensed directory or file)')
  parser.add_argument('--platform', choices=sorted(PLATFORMS), default='cpu',
                      help='jax format: the platform the artifact runs on (default: cpu)')
  parser.add_argument('--batch-size', type=int, default=1,
                      help='tflite format: the fixed batch of the TFLite model (default: 1)')


def serving_function(item: artifacts.Loaded, execution: Execution):
  """`fn(images)`: uint8 `[n, s, s, 3]` -> float32 logits `[n, classes]`, normalization and
  weights inside, the model executing as `execution` says."""
  model = item.model.clone(execution=execution)
  variables = jax.tree.map(jnp.asarray, item.variables)
  mean, std = item.preprocessing['mean'], item.preprocessing['std']

  def fn(images):
    return model.apply(variables, data.normalize(images, mean, std)).astype(jnp.float32)
  return fn


def export_jax(item: artifacts.Loaded, path: str, platform: str = 'cpu') -> dict:
  """Writes the `jax.export` artifact of `item` to `path`; returns its meta.json entry."""
  size = item.preprocessing['image_size']
  # No inference chunks: the batch is symbolic.
  fn = serving_function(item, Execution(backend=PLATFORMS[platform], eval_chunk=0))
  batch = jax.export.symbolic_shape('batch')[0]
  spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(fn), platforms=(platform,))(spec)
  with open(path, 'wb') as f:
    f.write(exported.serialize())
  return {'file': os.path.basename(path), 'input_shape': ['batch', size, size, 3],
          'platforms': [platform]}


def export_tflite(item: artifacts.Loaded, path: str, batch_size: int = 1) -> dict:
  """Writes the TFLite model of `item` (fixed batch `batch_size`) to `path`; returns its
  meta.json entry."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  size = item.preprocessing['image_size']
  # The TFLite runtime takes no scatter-add (the gather-free form's, a CondenseNetV2 SFR's):
  # the gathers are kept and SFRs place their outputs by gathers. Its grouped convolutions
  # (XNNPACK) beat the block-diagonal form: docs/performance.md#latency.
  fn = serving_function(item, Execution(backend='cpu', condensed_gathers='keep',
                                        conv_lowering='grouped', eval_chunk=0))
  signature = [tf.TensorSpec((batch_size, size, size, 3), tf.uint8, name='images')]
  module = tf.Module()
  module.serve = tf.function(jax2tf.convert(fn, with_gradient=False),
                             input_signature=signature, autograph=False)
  with tempfile.TemporaryDirectory() as saved:
    tf.saved_model.save(module, saved, signatures=module.serve.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()
  with open(path, 'wb') as f:
    f.write(flatbuffer)
  return {'file': os.path.basename(path), 'input_shape': [batch_size, size, size, 3]}


def run(args) -> str:
  items = artifacts.load(args.path, args.model, args.num_classes, forms=('condensed',))
  if not items or items[0].form != 'condensed':
    raise ValueError(f'{args.path} holds no condensed model (a run writes condensed/ when '
                     'training ends; an official file must be a converted one).')
  item = items[0]
  if item.preprocessing is None:
    raise ValueError(f'{item.source} does not say its preprocessing; export a condensed '
                     'directory written by a run, which saves it.')
  if args.out:
    out = args.out
  elif artifacts.kind(args.path) == 'workdir':
    out = os.path.join(args.path, 'export')
  else:
    out = os.path.join(os.path.dirname(os.path.abspath(item.source.rstrip('/'))), 'export')
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f'condensed.{args.format}')
  if args.format == 'jax':
    entry = export_jax(item, path, args.platform)
  else:
    if args.batch_size < 1:
      raise ValueError(f'--batch-size {args.batch_size}: the TFLite batch must be at least 1.')
    entry = export_tflite(item, path, args.batch_size)
  meta, pre = os.path.join(out, 'meta.json'), item.preprocessing
  common.merge_json(meta, {
      'input_dtype': 'uint8', 'input_layout': 'NHWC, RGB, 0-255',
      'output': 'float32 logits [batch, num_classes]', 'image_size': pre['image_size'],
      'class_names': pre['class_names'], 'resize_shorter': pre.get('resize_shorter'),
      'dataset': pre.get('dataset'), 'source': item.source,
      args.format: {**entry, 'bytes': os.path.getsize(path)}})
  print(f'{args.format}: {path} ({os.path.getsize(path) / 1e6:.2f} MB); {meta}')
  return path
