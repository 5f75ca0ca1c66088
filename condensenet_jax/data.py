"""Datasets and input pipelines, behind one interface (`DataSource`, from `load`).

CIFAR-10/100 (tfds) and the offline digits set (scikit-learn's 8x8 digits, upsampled to 32x32)
are held as uint8 arrays on the host; the training batch of step `t` is a pure function of
(seed, t) (`train_indices`), and random crop + flip run on the device inside the step
(`augment`), keyed by the example's position in the global batch, so a run resumes exactly at
any step and does not depend on the number of devices. The test set is evaluated completely:
the last batch is padded and masked (`eval_batches`).

ImageNet streams through tfds + tf.data, split per process (`StreamingDataset`:
`imagenet_train`, `imagenet_eval`).
"""

import dataclasses
import functools
import itertools
import os
import socket
from typing import Any, ClassVar, Iterator, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

CIFAR_STATS = {
    'cifar10': ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet2012')
# dataset -> (image side, number of classes)
SHAPES = {'digits': (32, 10), 'cifar10': (32, 10), 'cifar100': (32, 100),
          'imagenet2012': (224, 1000)}


class DatasetUnavailableError(RuntimeError):
  """The dataset is not on disk and cannot be downloaded; the message says how to provide it."""


class DataSource(Protocol):
  """What a training run reads its data through; `InMemoryDataset` and `StreamingDataset`
  implement it.

  Images are uint8 RGB `[n, image_size, image_size, 3]`, labels int32 `[n]`; batches are this
  process's share of each global batch (`process_slice`).
  """
  name: str
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # True: training batches come as stored and the step crops and flips them on the device;
  # False: they come augmented (decoding and resizing happen on the host anyway).
  augment_on_device: bool

  @property
  def image_size(self) -> int: ...
  @property
  def num_train(self) -> int: ...
  @property
  def num_test(self) -> int: ...
  def train_batches(self, seed: int, start_step: int, global_batch: int
                    ) -> Iterator[dict[str, np.ndarray]]: ...
  def eval_batches(self, global_batch: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...
  def preprocessing(self) -> dict[str, Any]: ...


@dataclasses.dataclass
class InMemoryDataset:
  """A dataset held on the host as uint8 NHWC arrays (a `DataSource`). The batch of a step
  is a pure function of (seed, step) (`train_indices`); crops and flips run on the device."""
  name: str
  train_images: np.ndarray  # [n_train, h, w, 3] uint8
  train_labels: np.ndarray  # [n_train] int32
  test_images: np.ndarray   # [n_test, h, w, 3] uint8
  test_labels: np.ndarray   # [n_test] int32
  num_classes: int
  mean: tuple[float, ...]   # per channel, on the [0, 1] scale
  std: tuple[float, ...]
  class_names: Optional[tuple[str, ...]] = None  # one per class; None: '0', '1', ...

  augment_on_device: ClassVar[bool] = True

  @property
  def image_size(self) -> int:
    """Side of the (square) images, in pixels."""
    return self.train_images.shape[1]

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  @property
  def num_test(self) -> int:
    return len(self.test_labels)

  def train_batches(self, seed: int, start_step: int, global_batch: int
                    ) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the global batch of every step from `start_step` on."""
    share = process_slice(global_batch)
    for step in itertools.count(start_step):
      idx = train_indices(seed, step, self.num_train, global_batch)[share]
      yield {'image': self.train_images[idx], 'label': self.train_labels[idx]}

  def eval_batches(self, global_batch: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The test set once, as `eval_batches` gives it."""
    return eval_batches(self.test_images, self.test_labels, global_batch)

  def preprocessing(self) -> dict[str, Any]:
    """What a model trained on this dataset expects (`preprocessing`)."""
    return preprocessing(self.name, self.image_size, self.mean, self.std, self.num_classes,
                         self.class_names)


def preprocessing(dataset: str, image_size: int, mean, std, num_classes: int,
                  class_names=None, resize_shorter: Optional[int] = None) -> dict[str, Any]:
  """The evaluation preprocessing of a dataset, as saved beside a condensed model.

  Keys: `dataset`; `image_size` (the model takes uint8 [n, image_size, image_size, 3] RGB);
  `mean`, `std` (per channel on the [0, 1] scale: the model's input is (x / 255 - mean) / std);
  `class_names` (`num_classes` strings, label i -> class_names[i]); `resize_shorter` (the
  evaluation images were resized to this shorter side and center-cropped to `image_size`; None:
  taken as they are).

  Raises:
    ValueError: `class_names` does not hold `num_classes` names.
  """
  names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} class names for {num_classes} classes.')
  return {'dataset': dataset, 'image_size': int(image_size),
          'mean': [float(m) for m in mean], 'std': [float(s) for s in std],
          'class_names': names, 'resize_shorter': resize_shorter}


def digits(test_fraction: float = 0.2) -> InMemoryDataset:
  """scikit-learn's bundled 8x8 digits (1,797 images), upsampled 4x to 32x32 RGB.

  The train/test split is fixed (it does not depend on the run's seed).
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [n, 8, 8] in 0..255
  images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)      # [n, 32, 32]
  images = np.repeat(images[..., None], 3, axis=-1)                # [n, 32, 32, 3]
  labels = bunch.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  n_test = int(round(len(labels) * test_fraction))
  test, train = order[:n_test], order[n_test:]
  scaled = images[train].astype(np.float64) / 255.0
  mean = tuple(float(m) for m in scaled.mean(axis=(0, 1, 2)))
  std = tuple(float(s) for s in scaled.std(axis=(0, 1, 2)))
  return InMemoryDataset('digits', images[train], labels[train], images[test], labels[test], 10,
                         mean, std)  # class names '0' .. '9': the default


def synthetic(name: str, num_train: int, num_test: int = 0, seed: int = 0) -> InMemoryDataset:
  """Random uint8 images and labels with the shapes and class count of dataset `name`, for
  timing and tests without the data (`benchmarks.bench`). Deterministic in `seed`.

  Raises:
    ValueError: `name` is not one of `DATASETS`.
  """
  if name not in SHAPES:
    raise ValueError(f'dataset={name!r} is unknown; use one of {DATASETS}.')
  size, classes = SHAPES[name]
  rng = np.random.default_rng(seed)
  images = lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = lambda n: rng.integers(0, classes, (n,), dtype=np.int32)
  mean, std = CIFAR_STATS.get(name, IMAGENET_STATS)
  return InMemoryDataset(f'synthetic-{name}', images(num_train), labels(num_train),
                         images(num_test), labels(num_test), classes, mean, std)


_DOWNLOAD_HOSTS = {'cifar10': 'www.cs.toronto.edu', 'cifar100': 'www.cs.toronto.edu'}


def _reachable(host: str, timeout: float = 5.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _unavailable(name: str, data_dir: Optional[str], reason: str) -> DatasetUnavailableError:
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return DatasetUnavailableError(
      f'dataset {name!r} is not prepared in {where} and {reason}. To provide it: run once on a '
      f'machine with internet access (tfds downloads it), then copy {where}/{name} here; or '
      f'set TFDS_DATA_DIR (or config.data_dir) to a directory that holds a prepared copy. The '
      f"offline quick start needs no download: --config configs/digits.py.")


def _read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All of `split` as (uint8 images, int32 labels)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = builder.as_data_source(split=split)  # random access, no tf.data
  except Exception:  # prepared earlier in TFRecord format: read it through tf.data
    images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                                      as_supervised=True))
    return np.asarray(images, np.uint8), np.asarray(labels, np.int32)
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(e['image'], np.uint8) for e in examples])
  return images, np.asarray([int(e['label']) for e in examples], np.int32)


def cifar(name: str, data_dir: Optional[str] = None) -> InMemoryDataset:
  """CIFAR-10/100 through tfds (downloaded and prepared once), as uint8 host arrays.

  Raises:
    DatasetUnavailableError: the data is not prepared and cannot be downloaded.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')

  def read():
    return {split: _read_split(builder, split) for split in ('train', 'test')}

  if builder.is_prepared():
    splits = read()
  else:
    try:
      splits = read()  # a mocked tfds (tests) serves data without preparing
    except Exception:  # not prepared: download once
      host = _DOWNLOAD_HOSTS[name]
      if not _reachable(host):  # tfds would retry for minutes before failing
        raise _unavailable(name, data_dir, f'{host} cannot be reached to download it') from None
      try:
        builder.download_and_prepare()
      except Exception as e:  # network or disk problems surface in many types
        raise _unavailable(name, data_dir,
                           f'downloading it failed ({type(e).__name__}: {e})') from e
      splits = read()
  mean, std = CIFAR_STATS[name]
  label = builder.info.features['label']
  return InMemoryDataset(name, *splits['train'], *splits['test'], label.num_classes, mean, std,
                         tuple(label.names))


def load(name: str, data_dir: Optional[str] = None) -> DataSource:
  """The dataset `name`: 'digits', 'cifar10' or 'cifar100' in memory, 'imagenet2012'
  streamed (`StreamingDataset`).

  Raises:
    ValueError: an unknown `name`.
    DatasetUnavailableError: the data is not on disk and cannot be downloaded.
  """
  if name == 'digits':
    return digits()
  if name in CIFAR_STATS:
    return cifar(name, data_dir)
  if name == 'imagenet2012':
    return StreamingDataset(name, data_dir)
  raise ValueError(f'dataset={name!r} is unknown; use one of {DATASETS}.')


# --- the order of training examples -------------------------------------------------------

def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """Steps per epoch: every example is seen once an epoch; the last batch wraps around."""
  return -(-num_examples // global_batch)


def train_indices(seed: int, step: int, num_examples: int, global_batch: int) -> np.ndarray:
  """Example indices of the global batch of `step`: a pure function of (seed, step).

  Each epoch is a fresh permutation (seeded by (seed, epoch)); the last batch of an epoch is
  filled up with the first examples of the same permutation.
  """
  per_epoch = steps_per_epoch(num_examples, global_batch)
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[(position * global_batch + np.arange(global_batch)) % num_examples]


def process_slice(global_batch: int) -> slice:
  """This process's share of a global batch (processes hold equal, contiguous shares)."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


# --- on-device augmentation ---------------------------------------------------------------

def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
  """uint8 [n, h, w, 3] -> float, (x / 255 - mean) / std."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def augment(images: jax.Array, keys: jax.Array, padding: int, flip: bool) -> jax.Array:
  """Random crop (zero padding of `padding` pixels, as torchvision's RandomCrop) and random
  horizontal flip, one key per example. uint8 [n, h, w, c] -> uint8 [n, h, w, c]."""
  n, h, w, c = images.shape

  def one(image, key):
    k_crop, k_flip = jax.random.split(key)
    if padding:
      padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
      dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * padding + 1)
      image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
    if flip:
      image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1], image)
    return image

  return jax.vmap(one)(images, keys)


# Random erasing as timm's `RandomErasing` (CondenseNetV2's recipe): the erased area is a
# fraction of the image drawn from U(0.02, 1/3), its log aspect ratio from U(log 0.3, log 1/0.3),
# with up to ten draws until the rectangle fits.
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (float(np.log(0.3)), float(np.log(1 / 0.3)))
ERASE_ATTEMPTS = 10


def random_erase(x: jax.Array, keys: jax.Array, probability: float) -> jax.Array:
  """Random erasing in 'pixel' mode on normalized images, one key per example: with
  `probability`, one rectangle (area and aspect as `ERASE_AREA`, `ERASE_LOG_ASPECT`; the first
  of `ERASE_ATTEMPTS` draws that fits strictly inside the image, none if none does) is filled
  with N(0, 1) values, independently per pixel and channel. float [n, h, w, c] -> the same."""
  n, h, w, c = x.shape

  def one(image, key):
    k_apply, k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(key, 6)
    area = jax.random.uniform(k_area, (ERASE_ATTEMPTS,), minval=ERASE_AREA[0],
                              maxval=ERASE_AREA[1]) * (h * w)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (ERASE_ATTEMPTS,),
                                        minval=ERASE_LOG_ASPECT[0], maxval=ERASE_LOG_ASPECT[1]))
    eh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ew = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (eh < h) & (ew < w)
    first = jnp.argmax(fits)  # the first draw that fits (0 if none: then nothing is erased)
    eh, ew = eh[first], ew[first]
    top = jax.random.randint(k_top, (), 0, h - eh + 1)
    left = jax.random.randint(k_left, (), 0, w - ew + 1)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    erase = inside & fits.any() & jax.random.bernoulli(k_apply, probability)
    noise = jax.random.normal(k_fill, image.shape, jnp.float32).astype(image.dtype)
    return jnp.where(erase[:, :, None], noise, image)

  return jax.vmap(one)(x, keys)


# --- evaluation batches -------------------------------------------------------------------

def eval_batches(images: np.ndarray, labels: np.ndarray, global_batch: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (images, labels, valid) of this process, covering the whole set once; the last
  batch is padded with zeros and `valid` = 0 marks the padding.

  Each batch: images uint8 `[b, h, w, c]`, labels `[b]`, valid float32 `[b]`, with `b` this
  process's share of `global_batch` (`process_slice`).
  """
  n = len(labels)
  share = process_slice(global_batch)
  for start in range(0, n, global_batch):
    idx = np.arange(start, start + global_batch)[share]
    valid = idx < n
    idx = np.where(valid, idx, 0)
    yield images[idx] * valid[:, None, None, None].astype(np.uint8), labels[idx] * valid, \
        valid.astype(np.float32)


# --- ImageNet (tfds + tf.data) ------------------------------------------------------------

def tensorflow():
  """The `tensorflow` module, kept off the accelerators (tf.data and image decoding only).

  Raises:
    ImportError: TensorFlow is not installed; the line says how to install it.
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('the ImageNet pipeline and image files need TensorFlow (tf.data, '
                      'tf.io): pip install tensorflow-cpu') from None
  tf.config.set_visible_devices([], 'GPU')  # keep TensorFlow off the accelerators
  return tf


def _imagenet_builder(data_dir, name='imagenet2012'):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetUnavailableError(f'{name!r} is not a tfds dataset; name an image '
                                  'classification dataset of tfds.') from None
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except Exception as e:  # the manual download is missing
      if name != 'imagenet2012':
        raise DatasetUnavailableError(
            f'{name} is not prepared in {data_dir or "the tfds data directory"} and could not '
            f'be downloaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); prepare it '
            'with tfds or give --data-dir.') from e
      raise DatasetUnavailableError(
          'ImageNet (imagenet2012) is not prepared and cannot be downloaded automatically: put '
          'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
          '<TFDS_DATA_DIR>/downloads/manual and run again, or point TFDS_DATA_DIR (or '
          f'config.data_dir) at a prepared copy. ({type(e).__name__}: {e})') from e
  return builder


def imagenet_train(seed: int, start_step: int, global_batch: int, image_size: int = 224,
                   data_dir: Optional[str] = None, name: str = 'imagenet2012'
                   ) -> Iterator[dict[str, np.ndarray]]:
  """This process's training batches of ImageNet from `start_step` on: uint8 random-resized
  crops with random flips (augmentation on the host: JPEG decoding has to happen there).

  The order is deterministic in (seed, epoch) and resumes at `start_step` by skipping. Each
  batch: `{'image': uint8 [b, image_size, image_size, 3], 'label': int32 [b]}`, `b` this
  process's share of `global_batch`. Endless (epoch after epoch).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = tensorflow()
  builder = _imagenet_builder(data_dir, name)
  per_process = global_batch // jax.process_count()
  split = tfds.split_for_jax_process('train', drop_remainder=True)
  n = builder.info.splits[split].num_examples
  per_epoch = n // per_process
  epoch, position = divmod(start_step, per_epoch)

  def crop(example, index):
    seed_pair = tf.stack([tf.cast(seed, tf.int64), index])
    image = example['image']
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([1, 0, 4]), seed=seed_pair, area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = tf.image.resize(image, (image_size, image_size), 'bilinear')
    flip = tf.random.stateless_uniform([], seed=seed_pair[::-1]) < 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    return {'image': tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8),
            'label': tf.cast(example['label'], tf.int32)}

  while True:
    ds = builder.as_dataset(split=split, shuffle_files=True, read_config=tfds.ReadConfig(
        shuffle_seed=seed + epoch, interleave_cycle_length=16))
    ds = ds.shuffle(16 * per_process, seed=seed + epoch)
    ds = ds.enumerate(start=epoch * n).map(lambda i, ex: crop(ex, i),
                                           num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_process, drop_remainder=True).skip(position)
    ds = ds.with_options(_deterministic_options(tf)).prefetch(tf.data.AUTOTUNE)
    for batch in tfds.as_numpy(ds):
      yield batch
    epoch, position = epoch + 1, 0


def _deterministic_options(tf):
  options = tf.data.Options()
  options.deterministic = True
  return options


def eval_resize(image_size: int) -> int:
  """The shorter side evaluation images are resized to before the center crop of
  `image_size` (256 for 224, the standard ImageNet ratio)."""
  return int(round(image_size * 256 / 224))


def center_crop(image, resize: int, image_size: int):
  """The evaluation preprocessing of one image (a TensorFlow uint8 tensor `[h, w, 3]`, any
  size): bilinear resize of the shorter side to `resize`, then the central `image_size` square,
  rounded back to uint8."""
  tf = tensorflow()
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new, 'bilinear')
  top = (new[0] - image_size) // 2
  left = (new[1] - image_size) // 2
  image = image[top:top + image_size, left:left + image_size]
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def imagenet_eval(global_batch: int, image_size: int = 224, data_dir: Optional[str] = None,
                  name: str = 'imagenet2012'
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """This process's share of the validation set: resize 256 (shorter side), center crop 224;
  the last batch padded, `valid` marking real examples (as `eval_batches`)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = tensorflow()
  builder = _imagenet_builder(data_dir, name)
  per_process = global_batch // jax.process_count()
  split = tfds.split_for_jax_process('validation', drop_remainder=False)
  resize = eval_resize(image_size)

  def center(example):
    return {'image': center_crop(example['image'], resize, image_size),
            'label': tf.cast(example['label'], tf.int32), 'valid': tf.constant(1.0)}

  ds = builder.as_dataset(split=split, shuffle_files=False).map(
      center, num_parallel_calls=tf.data.AUTOTUNE)
  n = builder.info.splits[split].num_examples
  # Every process runs the same number of batches (collectives need all of them).
  total = builder.info.splits['validation'].num_examples
  batches = -(-total // global_batch)
  padding = batches * per_process - n
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros((image_size, image_size, 3), tf.uint8),
      'label': tf.constant(0, tf.int32), 'valid': tf.constant(0.0)}).repeat(padding)
  ds = ds.concatenate(pad).batch(per_process).prefetch(tf.data.AUTOTUNE)
  for batch in tfds.as_numpy(ds):
    yield batch['image'], batch['label'], batch['valid']


@dataclasses.dataclass(frozen=True)
class StreamingDataset:
  """A tfds image-classification dataset streamed through tf.data (a `DataSource`): ImageNet
  by default. Training batches are random-resized crops with flips, decoded and augmented on
  the host (`imagenet_train`); evaluation resizes the shorter side and center-crops
  (`imagenet_eval`). The tfds builder needs `train` and `validation` splits.

  Raises DatasetUnavailableError (on first use) when the data is not prepared.
  """
  name: str = 'imagenet2012'
  data_dir: Optional[str] = None
  image_size: int = 224
  mean: tuple[float, ...] = IMAGENET_STATS[0]
  std: tuple[float, ...] = IMAGENET_STATS[1]

  augment_on_device: ClassVar[bool] = False

  @functools.cached_property
  def _builder(self):
    return _imagenet_builder(self.data_dir, self.name)

  @property
  def num_train(self) -> int:
    return self._builder.info.splits['train'].num_examples

  @property
  def num_test(self) -> int:
    return self._builder.info.splits['validation'].num_examples

  @property
  def num_classes(self) -> int:
    return self._builder.info.features['label'].num_classes

  def train_batches(self, seed: int, start_step: int, global_batch: int
                    ) -> Iterator[dict[str, np.ndarray]]:
    return imagenet_train(seed, start_step, global_batch, self.image_size, self.data_dir,
                          self.name)

  def eval_batches(self, global_batch: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return imagenet_eval(global_batch, self.image_size, self.data_dir, self.name)

  def preprocessing(self) -> dict[str, Any]:
    return preprocessing(self.name, self.image_size, self.mean, self.std, self.num_classes,
                         self._builder.info.features['label'].names,
                         resize_shorter=eval_resize(self.image_size))
