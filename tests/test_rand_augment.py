"""RandAugment (timm's policy on the device): each operation against PIL, the policy's random
choices, the config string, and determinism."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from condensenet_jax import rand_augment as ra

FILL = (124, 116, 104)  # fill_color of the ImageNet mean


def natural_image(size, seed=0):
  """Smooth colour regions with noise, as photographs have (flat noise would hide rounding)."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (size // 4, size // 4, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.int64)
  return np.clip(image + rng.integers(-10, 11, image.shape), 20, 230).astype(np.uint8)


def pil_op(image, name, level, sign):
  """timm's operation `name` at `level` and direction `sign`, with PIL, bilinear."""
  im = Image.fromarray(image)
  amount = level / 10 * sign
  factor = level / 10 * 1.8 + 0.1
  affine = dict(resample=Image.BILINEAR, fillcolor=FILL)
  w, h = im.size
  transforms = {'ShearX': (1, amount * 0.3, 0, 0, 1, 0), 'ShearY': (1, 0, 0, amount * 0.3, 1, 0),
                'TranslateXRel': (1, 0, amount * 0.45 * w, 0, 1, 0),
                'TranslateYRel': (1, 0, 0, 0, 1, amount * 0.45 * h)}
  if name in transforms:
    return np.asarray(im.transform(im.size, Image.AFFINE, transforms[name], **affine))
  add = int(level / 10 * 110)
  ops = {
      'AutoContrast': lambda: ImageOps.autocontrast(im),
      'Equalize': lambda: ImageOps.equalize(im),
      'Invert': lambda: ImageOps.invert(im),
      'Rotate': lambda: im.rotate(amount * 30, **affine),
      'Posterize': lambda: ImageOps.posterize(im, int(level / 10 * 4)),
      'Solarize': lambda: ImageOps.solarize(im, int(level / 10 * 256)),
      'SolarizeAdd': lambda: im.point([min(255, i + add) if i < 128 else i
                                       for i in range(256)] * 3),
      'Color': lambda: ImageEnhance.Color(im).enhance(factor),
      'Contrast': lambda: ImageEnhance.Contrast(im).enhance(factor),
      'Brightness': lambda: ImageEnhance.Brightness(im).enhance(factor),
      'Sharpness': lambda: ImageEnhance.Sharpness(im).enhance(factor),
  }
  return np.asarray(ops[name]())


_apply_op = jax.jit(lambda x, op, level, sign: ra.apply_op(x, op, level, sign, FILL))


@pytest.mark.parametrize('name', ra.OPS)
def test_each_operation_is_pils(name):
  image = natural_image(32)
  ours = _apply_op
  for level in (2.5, 9.0, 10.0):
    for sign in (1.0, -1.0):
      expected = pil_op(image, name, level, sign).astype(np.int64)
      got = np.asarray(ours(jnp.asarray(image, jnp.float32), ra.OPS.index(name), level, sign))
      assert np.array_equal(got, np.round(got)), name  # integer values
      difference = np.abs(got.astype(np.int64) - expected)
      # PIL computes in double precision: a value that lands on an integer may round the other
      # way in float32, by one level, for a few per cent of the pixels at most.
      assert difference.max() <= 1, (name, level, sign)
      assert (difference > 0).mean() <= 0.05, (name, level, sign)


def test_the_identity_warp_returns_the_image_exactly():
  image = jnp.asarray(natural_image(32), jnp.float32)
  matrix = ra.affine_matrix(jnp.int32(ra.OPS.index('Invert')), 9.0, 1.0, 32, 32)
  np.testing.assert_array_equal(ra.warp(image, matrix, FILL), image)


def test_the_policys_random_choices():
  policy = ra.Policy(magnitude=9, layers=2, magnitude_std=0.5)
  choices = jax.vmap(lambda k: ra.draw(k, policy))(jax.random.split(jax.random.PRNGKey(0), 6000))
  ops = np.asarray(choices['op']).ravel()
  counts = np.bincount(ops, minlength=len(ra.OPS))
  assert counts.size == 15 and np.all(np.abs(counts / ops.size - 1 / 15) < 0.01)
  assert abs(np.mean(choices['applied']) - 0.5) < 0.02
  assert abs(np.mean(choices['sign'] == -1) - 0.5) < 0.02
  levels = np.asarray(choices['level'])
  assert abs(levels.mean() - 9) < 0.02 and abs(levels.std() - 0.5) < 0.02
  assert levels.max() <= 10 and levels.min() >= 0
  assert np.all(ra.draw(jax.random.PRNGKey(1), ra.Policy(magnitude=10, layers=3,
                                                            magnitude_std=5.0))['level'] <= 10)


def test_policy_strings():
  assert ra.Policy.parse('rand-m9-mstd0.5') == ra.Policy(9.0, 2, 0.5)
  assert ra.Policy.parse('rand-m7-n3') == ra.Policy(7.0, 3, 0.0)
  for bad, message in (('auto-m9', "use a timm RandAugment string such as 'rand-m9-mstd0.5'"),
                       ('rand-m9-inc1', "section 'inc1' is not one of"),
                       ('rand-m12', 'the magnitude must be in [0, 10]'),
                       ('rand-n0', 'the number of layers at least 1')):
    with pytest.raises(ValueError, match=re.escape(f'config.rand_augment={bad!r}: ') + '.*' +
                       re.escape(message)):
      ra.Policy.parse(bad)
  assert ra.fill_color((0.485, 0.456, 0.406)) == FILL


def test_images_keep_dtype_and_shape_and_depend_only_on_their_keys():
  images = jnp.asarray(np.stack([natural_image(32, seed) for seed in range(8)]))
  keys = jax.random.split(jax.random.PRNGKey(3), 8)
  policy = ra.Policy.parse('rand-m9-mstd0.5')
  augment = jax.jit(lambda x, k: ra.rand_augment(x, k, policy, FILL))
  out = augment(images, keys)
  assert out.dtype == jnp.uint8 and out.shape == images.shape
  # Each image's result depends on its own key only: the same key alone gives it again.
  alone = augment(images[5:6], keys[5:6])
  np.testing.assert_array_equal(alone[0], out[5])
  assert not np.array_equal(out, images)
