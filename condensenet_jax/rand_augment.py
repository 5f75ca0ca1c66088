"""RandAugment as timm's `rand-m<M>-n<N>-mstd<S>` policy, on the device, one key per example.

The official CondenseNetV2 training draws `rand-m9-mstd0.5` on the host with PIL. Here every
image of the global batch gets its own key (from the step's key and the example's position,
as the crops and flips), so that a run stays deterministic and resumes exactly, and the work
runs on the accelerator rather than in the input pipeline.

Policy (timm's `rand_augment_transform` with `_RAND_TRANSFORMS`): `N` layers (2 by default);
each picks one of the 15 operations of `OPS` uniformly (with replacement), applies it with
probability 1/2 at a magnitude drawn from N(M, S^2) clipped to [0, 10], and, for the
operations with a direction, negates its argument with probability 1/2. Operations act on
uint8 RGB values as PIL's do (`ImageOps`, `ImageEnhance`, `Image.transform`): the geometric
ones fill with the dataset mean (rounded to uint8) and sample bilinearly (timm picks bilinear
or bicubic at random per operation; this module always uses bilinear).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

# timm's `_RAND_TRANSFORMS`, in its order.
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
       'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
       'TranslateYRel')
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
MAX_LEVEL = 10.0
APPLY_PROBABILITY = 0.5


@dataclasses.dataclass(frozen=True)
class Policy:
  """`layers` operations per image at `magnitude` (0-10) with noise `magnitude_std`."""
  magnitude: float = 9.0
  layers: int = 2
  magnitude_std: float = 0.0

  @classmethod
  def parse(cls, spec: str) -> 'Policy':
    """The policy of a timm string such as 'rand-m9-mstd0.5' or 'rand-m7-n3'.

    Raises:
      ValueError: not 'rand-...', or a section other than m, n and mstd (timm's 'inc' and 'w'
        variants are not implemented).
    """
    parts = spec.split('-')
    if parts[0] != 'rand':
      raise ValueError(f"config.rand_augment={spec!r}: use a timm RandAugment string such as "
                       "'rand-m9-mstd0.5' (or '' for none).")
    fields = {'m': 'magnitude', 'n': 'layers', 'mstd': 'magnitude_std'}
    values = {}
    for part in parts[1:]:
      match = re.fullmatch(r'([a-z]+)(\d+(?:\.\d+)?)', part)
      if not match or match.group(1) not in fields:
        raise ValueError(f'config.rand_augment={spec!r}: section {part!r} is not one of '
                         "m<magnitude>, n<layers>, mstd<std> (e.g. 'rand-m9-n2-mstd0.5').")
      values[fields[match.group(1)]] = float(match.group(2))
    policy = cls(**{**values, 'layers': int(values.get('layers', 2))})
    if not 0 <= policy.magnitude <= MAX_LEVEL or policy.layers < 1:
      raise ValueError(f'config.rand_augment={spec!r}: the magnitude must be in [0, 10] and '
                       'the number of layers at least 1.')
    return policy


def fill_color(mean) -> tuple[int, ...]:
  """The fill of the geometric operations: the normalization mean as uint8 values (timm's
  `img_mean`), e.g. (124, 116, 104) for ImageNet."""
  return tuple(min(255, int(np.round(255 * m))) for m in mean)


# --- the operations, on float32 [h, w, 3] holding integer values 0..255 ---------------------

def _gray(image):
  """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  rgb = image.astype(jnp.int32)
  return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) >> 16
          ).astype(jnp.float32)


def _blend(degenerate, image, factor):
  """PIL's `Image.blend(degenerate, image, factor)` for uint8 values (truncated, clipped)."""
  return jnp.clip(jnp.trunc(degenerate + factor * (image - degenerate)), 0, 255)


def _auto_contrast(image, _):
  lo = image.min(axis=(0, 1))
  hi = image.max(axis=(0, 1))
  scale = 255 / jnp.maximum(hi - lo, 1)
  stretched = jnp.clip(jnp.trunc(image * scale - lo * scale), 0, 255)
  return jnp.where(hi > lo, stretched, image)


def _equalize(image, _):
  def channel(values):
    v = values.astype(jnp.int32)
    hist = jnp.zeros(256, jnp.int32).at[v.ravel()].add(1)
    total = v.size
    last = hist[v.max()]  # the count of the highest value present
    step = (total - last) // 255
    before = jnp.cumsum(hist) - hist
    lut = jnp.minimum((step // 2 + before) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[v], v).astype(jnp.float32)
  return jnp.stack([channel(image[..., c]) for c in range(image.shape[-1])], -1)


def _posterize(image, level):
  shift = 8 - jnp.floor(level / MAX_LEVEL * 4)
  unit = 2.0 ** shift
  return jnp.floor(image / unit) * unit


def _solarize(image, level):
  threshold = jnp.floor(level / MAX_LEVEL * 256)
  return jnp.where(image < threshold, image, 255 - image)


def _solarize_add(image, level):
  add = jnp.floor(level / MAX_LEVEL * 110)
  return jnp.where(image < 128, jnp.minimum(image + add, 255), image)


def _enhance_factor(level):
  # level / 10 * 1.8 + 0.1 with one rounding (PIL blends with the float32 nearest that value)
  return (level * 18 + 10) / 100


def _color(image, level):
  return _blend(_gray(image)[..., None], image, _enhance_factor(level))


def _contrast(image, level):
  mean = jnp.floor(_gray(image).mean() + 0.5)
  return _blend(mean, image, _enhance_factor(level))


def _brightness(image, level):
  return _blend(0.0, image, _enhance_factor(level))


def _sharpness(image, level):
  # PIL's SMOOTH filter (3x3, centre 5, others 1, over 13), rounded; the border is copied.
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
  h, w = image.shape[:2]
  total = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
  smooth = jnp.floor((total + 4 * image) / 13 + 0.5)
  rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
  return _blend(jnp.where(border, image, smooth), image, _enhance_factor(level))


_PIXEL_OPS = {
    'AutoContrast': _auto_contrast, 'Equalize': _equalize,
    'Invert': lambda image, _: 255 - image, 'Posterize': _posterize, 'Solarize': _solarize,
    'SolarizeAdd': _solarize_add, 'Color': _color, 'Contrast': _contrast,
    'Brightness': _brightness, 'Sharpness': _sharpness,
}


def affine_matrix(op: int, level, sign, height: int, width: int):
  """PIL's affine coefficients (a, b, c, d, e, f) of operation `OPS[op]` (input point =
  (a x + b y + c, d x + e y + f) for output point (x, y)); the identity for the others."""
  amount = level / MAX_LEVEL * sign
  radians = -amount * 30 * np.pi / 180  # Rotate: counter-clockwise by `amount` * 30 degrees
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  cx, cy = width / 2, height / 2
  shear = amount * 0.3
  candidates = {
      'Rotate': (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy),
      'ShearX': (1.0, shear, 0.0, 0.0, 1.0, 0.0),
      'ShearY': (1.0, 0.0, 0.0, shear, 1.0, 0.0),
      'TranslateXRel': (1.0, 0.0, amount * 0.45 * width, 0.0, 1.0, 0.0),
      'TranslateYRel': (1.0, 0.0, 0.0, 0.0, 1.0, amount * 0.45 * height),
  }
  identity = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
  matrix = identity
  for name, coefficients in candidates.items():
    matrix = jnp.where(op == OPS.index(name), jnp.stack(
        [jnp.asarray(c, jnp.float32) for c in coefficients]), matrix)
  return matrix


def warp(image, matrix, fill):
  """PIL's `Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=fill)`: each output pixel
  centre maps to an input point; points outside the image take `fill`, the others are sampled
  bilinearly between pixel centres (clamped at the border), truncated. The identity matrix
  returns `image` exactly."""
  h, w, _ = image.shape
  y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                      jnp.arange(w, dtype=jnp.float32) + 0.5, indexing='ij')
  a, b, c, d, e, f = (matrix[i] for i in range(6))
  xin, yin = a * x + b * y + c, d * x + e * y + f
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  xs, ys = xin - 0.5, yin - 0.5
  x0, y0 = jnp.floor(xs), jnp.floor(ys)
  dx, dy = (xs - x0)[..., None], (ys - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

  def at(yy, xx):
    return image[jnp.clip(yy, 0, h - 1), jnp.clip(xx, 0, w - 1)]

  lerp = lambda p, q, t: p + (q - p) * t  # exact where p == q, as PIL's
  top = lerp(at(y0, x0), at(y0, x0 + 1), dx)
  bottom = lerp(at(y0 + 1, x0), at(y0 + 1, x0 + 1), dx)
  sampled = jnp.clip(jnp.floor(lerp(top, bottom, dy)), 0, 255)
  return jnp.where(inside[..., None], sampled, jnp.asarray(fill, jnp.float32))


def apply_op(image, op, level, sign, fill):
  """Operation `OPS[op]` (a traced int) at `level` (0-10) with direction `sign` (+-1) on one
  image, float32 [h, w, 3] of integer values -> the same."""
  h, w, _ = image.shape
  image = warp(image, affine_matrix(op, level, sign, h, w), fill)
  branches = [lambda x, _: x] + [_PIXEL_OPS[name] for name in OPS if name in _PIXEL_OPS]
  pixel_index = jnp.zeros((), jnp.int32)
  for i, name in enumerate(n for n in OPS if n in _PIXEL_OPS):
    pixel_index = jnp.where(op == OPS.index(name), i + 1, pixel_index)
  return jax.lax.switch(pixel_index, branches, image, level)


def draw(key: jax.Array, policy: Policy) -> dict[str, jax.Array]:
  """The random choices for one image, one entry per layer: `op` (int32, index into `OPS`,
  uniform), `applied` (bool, probability `APPLY_PROBABILITY`), `level` (float32, N(magnitude,
  magnitude_std^2) clipped to [0, 10]) and `sign` (float32 +-1, equally likely)."""
  keys = jax.random.split(key, 4)
  return {
      'op': jax.random.randint(keys[0], (policy.layers,), 0, len(OPS)),
      'applied': jax.random.bernoulli(keys[1], APPLY_PROBABILITY, (policy.layers,)),
      'level': jnp.clip(policy.magnitude + policy.magnitude_std *
                        jax.random.normal(keys[2], (policy.layers,)), 0, MAX_LEVEL),
      'sign': jnp.where(jax.random.bernoulli(keys[3], 0.5, (policy.layers,)), -1.0, 1.0),
  }


def rand_augment(images: jax.Array, keys: jax.Array, policy: Policy, fill) -> jax.Array:
  """RandAugment of uint8 images [n, h, w, 3] with one key per example (`draw`) -> uint8, the
  same shape. `fill`: the geometric operations' fill (`fill_color`)."""

  def one(image, key):
    x = image.astype(jnp.float32)
    choices = draw(key, policy)
    for i in range(policy.layers):
      changed = apply_op(x, choices['op'][i], choices['level'][i], choices['sign'][i], fill)
      x = jnp.where(choices['applied'][i], changed, x)
    return x.astype(jnp.uint8)

  return jax.vmap(one)(images, keys)
