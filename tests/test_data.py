"""Tests for condensenet_jax.data: datasets, the order of examples, augmentation, eval
batches and the ImageNet tf.data pipeline (on a tiny locally generated dataset)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensenet_jax import data


def test_digits_split_is_fixed_and_upsampled():
  dataset = data.digits()
  assert dataset.train_images.shape == (1438, 32, 32, 3)
  assert dataset.test_images.shape == (359, 32, 32, 3)
  assert dataset.train_images.dtype == np.uint8 and dataset.num_classes == 10
  # 4x nearest upsampling of 8x8 digits; grey replicated to RGB.
  image = dataset.train_images[0]
  np.testing.assert_array_equal(image[::4, ::4, 0], image[1::4, 2::4, 0])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  again = data.digits()
  np.testing.assert_array_equal(again.test_labels, dataset.test_labels)
  assert len(set(map(bytes, dataset.test_images[:50])) & set(
      map(bytes, dataset.train_images))) < 50  # the splits are different images


def test_train_indices_are_a_pure_function_of_seed_and_step():
  n, batch = 100, 32
  per_epoch = data.steps_per_epoch(n, batch)
  assert per_epoch == 4
  epoch0 = np.concatenate([data.train_indices(7, s, n, batch) for s in range(per_epoch)])
  assert set(epoch0) == set(range(n))  # every example in every epoch
  assert len(epoch0) == 128  # the last batch wraps around to the epoch's first examples
  np.testing.assert_array_equal(epoch0[100:], epoch0[:28])
  np.testing.assert_array_equal(data.train_indices(7, 2, n, batch), epoch0[64:96])
  assert not np.array_equal(data.train_indices(7, 4, n, batch), epoch0[:32])  # next epoch
  assert not np.array_equal(data.train_indices(8, 0, n, batch), epoch0[:32])  # other seed


def test_augment_crops_with_zero_padding_and_flips():
  image = jnp.arange(4 * 4, dtype=jnp.uint8).reshape(1, 4, 4, 1) + 1
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  images = jnp.repeat(image, 200, axis=0)
  out = np.asarray(data.augment(images, keys, padding=1, flip=True))
  seen = {out[i].tobytes() for i in range(200)}
  # 3x3 offsets x 2 flips = 18 distinct results; every one holds a shifted window.
  assert len(seen) == 18
  for o in out:
    assert (o == 0).sum() in (0, 3, 4, 5, 7)  # zero border rows/columns from the padding
  np.testing.assert_array_equal(data.augment(images[:3], keys[:3], padding=0, flip=False),
                                images[:3])


def test_normalize():
  x = np.full((1, 2, 2, 3), 255, np.uint8)
  out = np.asarray(data.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)))
  np.testing.assert_allclose(out[0, 0, 0], [2.0, 1.0, 0.5])


def test_eval_batches_cover_the_set_once_with_padding():
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) + 1
  labels = np.arange(10, dtype=np.int32)
  batches = list(data.eval_batches(images, labels, 4))
  assert [b[0].shape[0] for b in batches] == [4, 4, 4]
  valid = np.concatenate([b[2] for b in batches])
  np.testing.assert_array_equal(valid, [1] * 10 + [0] * 2)
  seen = np.concatenate([b[1] for b in batches])[valid > 0]
  np.testing.assert_array_equal(seen, labels)
  assert not batches[-1][0][2:].any()  # padding is zeros


@pytest.mark.parametrize('name,classes', [('cifar10', 10), ('cifar100', 100)])
def test_cifar_through_mocked_tfds(name, classes):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=20):
    dataset = data.load(name)
  assert dataset.train_images.shape == (20, 32, 32, 3)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.num_classes == classes
  assert dataset.mean == data.CIFAR_STATS[name][0]


def test_unknown_dataset():
  with pytest.raises(ValueError, match="dataset='mnist' is unknown"):
    data.load('mnist')


@pytest.fixture(scope='module')
def tiny_images(tmp_path_factory):
  from tiny_images import tiny_images  # registers the 'tiny_images' builder
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tiny_images.TinyImages(data_dir=data_dir).download_and_prepare()
  return data_dir, tiny_images


@pytest.mark.slow
def test_imagenet_train_pipeline_is_deterministic_and_resumable(tiny_images):
  data_dir, module = tiny_images
  kwargs = dict(global_batch=8, image_size=24, data_dir=data_dir, name='tiny_images')
  stream = data.imagenet_train(3, 0, **kwargs)
  first = [next(stream) for _ in range(7)]  # 5 steps per epoch: crosses into epoch 2
  assert first[0]['image'].shape == (8, 24, 24, 3) and first[0]['image'].dtype == np.uint8
  assert first[0]['label'].dtype == np.int32
  epoch = np.concatenate([b['image'][:, 0, 0, 0] for b in first[:5]])
  assert sorted(epoch) == list(range(module.NUM_TRAIN))  # each example once per epoch
  again = data.imagenet_train(3, 0, **kwargs)
  for a in first:
    np.testing.assert_array_equal(next(again)['image'], a['image'])
  resumed = data.imagenet_train(3, 4, **kwargs)  # resume at step 4
  for a in first[4:]:
    np.testing.assert_array_equal(next(resumed)['image'], a['image'])
  other = next(data.imagenet_train(4, 0, **kwargs))
  assert not np.array_equal(other['image'], first[0]['image'])


def test_imagenet_eval_pipeline_covers_the_validation_set(tiny_images):
  data_dir, module = tiny_images
  batches = list(data.imagenet_eval(5, image_size=24, data_dir=data_dir, name='tiny_images'))
  assert all(b[0].shape == (5, 24, 24, 3) for b in batches)
  valid = np.concatenate([b[2] for b in batches])
  assert valid.sum() == module.NUM_VALIDATION and len(valid) == 15
  pixels = np.concatenate([b[0][:, 12, 12, 0] for b in batches])[valid > 0]
  assert sorted(pixels) == list(range(module.NUM_VALIDATION))


@pytest.mark.slow
def test_a_streamed_dataset_trains_condenses_and_exports(tiny_images, tmp_path):
  """The streaming path of a run (host-side crops, tf.data evaluation, the class names of the
  tfds builder), end to end on a tiny tfds dataset instead of ImageNet."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from configs import digits as digits_config  # pylint: disable=g-import-not-at-top
  from condensenet_jax import condense, train  # pylint: disable=g-import-not-at-top
  data_dir, module = tiny_images
  source = data.StreamingDataset('tiny_images', data_dir, image_size=32)
  assert source.num_train == module.NUM_TRAIN and source.num_classes == 5
  config = digits_config.get_config()
  config.num_epochs, config.batch_size, config.eval_batch_size = 2, 8, 8
  config.model.stages, config.model.growth = (1, 1, 1), (4, 8, 8)
  config.eval_every_epochs = 0
  run = train.setup(config, str(tmp_path), devices=jax.devices()[:1], dataset=source)
  assert run.total_steps == 10
  batch = next(train.train_batches(run, 0))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  state = train.initial_state(run)
  batches = train.train_batches(run, 0)
  for _ in range(run.total_steps):
    state, _ = run.train_step(state, train.global_batch(run, next(batches)))
  result = train.evaluate(run, run.model, state.variables())
  assert result['examples'] == module.NUM_VALIDATION and 0 <= result['accuracy'] <= 1
  small, small_vars = condense.export(run.model, jax.device_get(state.variables()))
  condensed = train.evaluate(run, small, train.replicate(
      small_vars, jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())))
  assert condensed['examples'] == module.NUM_VALIDATION
  preprocessing = source.preprocessing()
  assert preprocessing['class_names'] == ['0', '1', '2', '3', '4']
  assert (preprocessing['image_size'], preprocessing['resize_shorter']) == (32, 37)


def test_random_erase_fills_one_rectangle_with_noise_at_the_given_rate():
  n, h, w = 400, 16, 12
  x = jnp.full((n, h, w, 3), 7.0)
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  out = np.asarray(data.random_erase(x, keys, 0.5))
  erased = out != 7.0  # the noise never equals 7 in practice
  touched = erased.any(axis=(1, 2, 3))
  assert 0.4 < touched.mean() < 0.6  # probability 0.5 (a draw that never fits is rare here)
  for image, mask in zip(out[touched], erased[touched]):
    rows, cols = np.flatnonzero(mask.any(axis=(1, 2))), np.flatnonzero(mask.any(axis=(0, 2)))
    # One rectangle, strictly smaller than the image, every channel of it erased.
    assert rows.size < h and cols.size < w
    assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert mask.sum() == rows.size * cols.size * 3
    area = rows.size * cols.size / (h * w)
    assert 0.01 <= area <= 0.45, area  # U(0.02, 1/3) of the area, rounded sides
  noise = out[erased]
  assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # N(0, 1) per pixel
  np.testing.assert_array_equal(data.random_erase(x, keys, 0.0), x)
