"""Classifies image files with a condensed model or an exported artifact.

    python -m condensenet_jax predict runs/digits path/to/image.png
    python -m condensenet_jax predict runs/digits/export/condensed.jax images/ --top-k 3

MODEL is a workdir (its condensed model), a condensed model directory, or an artifact of
`export` (`condensed.jax` or `condensed.tflite`, with its meta.json beside). IMAGES are PNG or
JPEG files of any size, or directories of them. Each image gets the evaluation preprocessing
of the dataset the model was trained on (the shorter side resized, the center cropped to the
model's input size; `data.center_crop`); the top-k classes are printed with their names and
probabilities.
"""

import json
import os

import numpy as np

from condensenet_jax import artifacts, data

HELP = 'classify image files with a condensed model or an exported artifact'

SUFFIXES = ('.png', '.jpg', '.jpeg')


def add_arguments(parser) -> None:
  parser.add_argument('model', help='a workdir, a condensed model directory, or an exported '
                      'condensed.jax / condensed.tflite')
  parser.add_argument('images', nargs='+', help='PNG / JPEG files or directories of them')
  parser.add_argument('--top-k', type=int, default=5, help='classes shown per image')


def image_files(paths: list[str]) -> list[str]:
  """The files `paths` name, directories expanded to their PNG / JPEG files, sorted.

  Raises:
    FileNotFoundError: a path does not exist, or a directory holds no image.
  """
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.lower().endswith(SUFFIXES))
      if not found:
        raise FileNotFoundError(f'{path} holds no PNG or JPEG file.')
      files += found
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f'{path}: no such file or directory.')
  return files


def load_image(path: str, image_size: int, resize_shorter) -> np.ndarray:
  """uint8 `[image_size, image_size, 3]` RGB of the image file at `path`.

  Raises:
    ValueError: the file cannot be decoded as an image.
  """
  tf = data.tensorflow()
  try:
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
    raise ValueError(f'{path} cannot be decoded as an image ({e.message.splitlines()[0]}); '
                     'give PNG or JPEG files.') from None
  return data.center_crop(image, resize_shorter or image_size, image_size).numpy()


class _Artifact:
  """An exported condensed.jax / condensed.tflite with its meta.json: `logits(images)`."""

  def __init__(self, path: str):
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), 'meta.json')
    if not os.path.isfile(meta):
      raise FileNotFoundError(f'{meta} is missing; export writes it beside {path}.')
    with open(meta) as f:
      self.meta = json.load(f)
    self.path = path
    if path.endswith('.jax'):
      import jax  # pylint: disable=g-import-not-at-top
      with open(path, 'rb') as f:
        self.exported = jax.export.deserialize(bytearray(f.read()))
      self.batch = None
    else:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self.interpreter = tf.lite.Interpreter(model_path=path)
      self.interpreter.allocate_tensors()
      self.batch = self.interpreter.get_input_details()[0]['shape'][0]

  def logits(self, images: np.ndarray) -> np.ndarray:
    if self.batch is None:
      return np.asarray(self.exported.call(images))
    out = []
    for start in range(0, len(images), self.batch):
      chunk = images[start:start + self.batch]
      padded = np.concatenate([chunk, np.zeros((self.batch - len(chunk),) + chunk.shape[1:],
                                                chunk.dtype)])
      self.interpreter.set_tensor(self.interpreter.get_input_details()[0]['index'], padded)
      self.interpreter.invoke()
      result = self.interpreter.get_tensor(self.interpreter.get_output_details()[0]['index'])
      out.append(result[:len(chunk)])
    return np.concatenate(out)


def classifier(model_path: str):
  """`(logits_fn, image_size, resize_shorter, class_names)` of a model path."""
  if model_path.endswith(('.jax', '.tflite')) and os.path.isfile(model_path):
    artifact = _Artifact(model_path)
    meta = artifact.meta
    return artifact.logits, meta['image_size'], meta.get('resize_shorter'), meta['class_names']
  items = artifacts.load(model_path, forms=('condensed',))
  if not items or items[0].form != 'condensed':
    raise ValueError(f'{model_path} holds no condensed model yet (a run writes condensed/ when '
                     'training ends).')
  from condensenet_jax import checkpoint  # pylint: disable=g-import-not-at-top
  item = items[0]
  model = checkpoint.Classifier(item.model, item.variables, item.preprocessing)
  pre = item.preprocessing
  return (lambda x: np.asarray(model(x))), pre['image_size'], pre.get('resize_shorter'), \
      pre['class_names']


def run(args) -> list[dict]:
  files = image_files(args.images)
  logits_fn, size, resize, names = classifier(args.model)
  images = np.stack([load_image(f, size, resize) for f in files])
  logits = logits_fn(images)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
  k = max(1, min(args.top_k, len(names)))
  results = []
  for path, p in zip(files, probabilities):
    top = np.argsort(-p, kind='stable')[:k]
    results.append({'image': path, 'top': [{'label': int(i), 'class': names[i],
                                            'probability': float(p[i])} for i in top]})
    shown = ', '.join(f'{names[i]} {p[i]:.4f}' for i in top)
    print(f'{path}: {shown}')
  return results
