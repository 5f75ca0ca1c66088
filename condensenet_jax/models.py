"""CondenseNet in Flax: the training form (learned group convolutions with masks), the
condensed inference form (index gathers + grouped convolutions), and the DenseNet-BC baseline,
built as the official PyTorch code builds them (NHWC here).

Parameter paths follow the official module names without the `features.` prefix, e.g.
`denseblock_1/denselayer_3/conv_1/kernel`, so the importer and the exporter can map one onto
the other by name.
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from condensenet_jax import execution, layers

# stem -> (stride of the first convolution, window of the final average pooling)
STEMS = {'cifar': (1, 8), 'imagenet': (2, 7)}


def stem_geometry(stem: str) -> tuple[int, int]:
  """`(stride of the first convolution, window of the final average pooling)` of `stem`.

  Raises:
    ValueError: `stem` is not one of `STEMS`.
  """
  if stem not in STEMS:
    raise ValueError(f'stem={stem!r} is unknown; use one of {sorted(STEMS)} '
                     "('cifar': stride 1 and 8x8 final pooling, 'imagenet': stride 2 and 7x7).")
  return STEMS[stem]


def dense_layer_inputs(stages: Sequence[int], growth: Sequence[int]):
  """Yields `(block, layer, in_channels, growth)` for every dense layer (1-based indices) of a
  CondenseNet, whose transitions keep the channel count."""
  channels = 2 * growth[0]
  for b, (n, k) in enumerate(zip(stages, growth), start=1):
    for l in range(1, n + 1):
      yield b, l, channels, k
      channels += k


def final_channels(stages: Sequence[int], growth: Sequence[int]) -> int:
  """Channels after the last dense block of a CondenseNet (transitions keep the count)."""
  return 2 * growth[0] + sum(n * k for n, k in zip(stages, growth))


def _check_divisible(value, divisor, what, field, fix):
  if divisor <= 0 or value % divisor:
    raise ValueError(f'{what} = {value} is not divisible by {field} = {divisor}; {fix}')


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What every dense layer of one network shares (one hashable Flax field)."""
  kind: str  # 'learned' (LGC), 'condensed' (gather + group conv) or 'plain' (DenseNet)
  bottleneck: int
  group_1x1: int
  group_3x3: int
  condense_factor: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv_lowering: str = 'auto'
  bn_axis_name: Optional[str] = None
  dense_blocks: str = 'auto'
  gathers: str = 'auto'

  def conv(self, features: int, kernel_size: int, groups: int, name: str, padding: int = 0):
    """A BN-ReLU-conv block (`layers.Conv`) with this spec's dtype, lowering and BN axis."""
    return layers.Conv(features, kernel_size, groups, padding=padding, dtype=self.dtype,
                       conv_lowering=self.conv_lowering, bn_axis_name=self.bn_axis_name,
                       name=name)


class DenseLayer(nn.Module):
  """conv_1 (1x1, bottleneck * growth) -> conv_2 (3x3 group conv, growth): the layer's new
  features, which `DenseBlock` appends to its input."""
  growth: int
  spec: LayerSpec

  @nn.compact
  def __call__(self, x, train: bool = False, stats=None):
    s = self.spec
    width = s.bottleneck * self.growth
    if s.kind == 'learned':
      y = layers.LearnedGroupConv(width, s.group_1x1, s.condense_factor, s.dropout_rate,
                                  s.dtype, s.bn_axis_name, name='conv_1')(x, train, stats)
    elif s.kind == 'condensed':
      y = layers.CondensedConv(width, s.group_1x1, s.condense_factor, s.dtype,
                               s.conv_lowering, s.bn_axis_name, s.gathers,
                               name='conv_1')(x, train)
    else:
      y = s.conv(width, 1, s.group_1x1, name='conv_1')(x, train, stats)
    return s.conv(self.growth, 3, s.group_3x3, name='conv_2', padding=1)(y, train)


class DenseBlock(nn.Module):
  """`num_layers` dense layers, each reading all the features before it.

  Call: `x` `[n, h, w, c]` -> `[n, h, w, c + num_layers * growth]`: `x` followed by each
  layer's `growth` new channels, in layer order.
  """
  num_layers: int
  growth: int
  spec: LayerSpec

  @nn.compact
  def __call__(self, x, train: bool = False):
    layer = lambda l: DenseLayer(self.growth, self.spec, name=f'denselayer_{l}')
    # In training, every layer's first BN normalizes all the features before it with their
    # batch statistics; a channel's statistics are the same for every layer that reads it, so
    # they are computed once, when the channel is made, instead of over the whole block input
    # at every layer (quadratic in the number of layers). The condensed form reads gathered
    # channels and computes its own.
    shared = train and self.spec.kind != 'condensed'
    stats = layers.batch_stats(x, self.spec.bn_axis_name) if shared else None

    def grow(stats, y):
      if not shared:
        return None
      new = layers.batch_stats(y, self.spec.bn_axis_name)
      return tuple(jnp.concatenate([a, b]) for a, b in zip(stats, new))

    if execution.resolve_dense_blocks(self.spec.dense_blocks, train) == 'concatenate':
      for l in range(1, self.num_layers + 1):
        y = layer(l)(x, train, stats)
        x = jnp.concatenate([x, y], axis=-1)  # [n, h, w, in + growth]
        stats = grow(stats, y)
      return x
    channels = x.shape[-1]
    features = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.num_layers * self.growth)])
    for l in range(1, self.num_layers + 1):
      y = layer(l)(features[..., :channels], train, stats)
      features = jax.lax.dynamic_update_slice_in_dim(features, y.astype(features.dtype),
                                                     channels, axis=-1)
      channels += self.growth
      stats = grow(stats, y)
    return features


def _stem_conv(features: int, stem: str, dtype: Any) -> nn.Conv:
  """The first convolution: 3x3, `features` outputs, the stem's stride, no bias."""
  stride, _ = stem_geometry(stem)
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=layers.conv_init, dtype=dtype, name='init_conv')


def _global_pool(x, stem: str, num_blocks: int):
  """Average pooling over the whole final map: `[n, pool, pool, c]` -> `[n, c]` (float32);
  ValueError naming the image size the architecture needs for a map of another size."""
  _, pool = stem_geometry(stem)
  if x.shape[1:3] != (pool, pool):
    raise ValueError(
        f'the feature map before the final {pool}x{pool} pooling is {x.shape[1]}x{x.shape[2]}; '
        f"stem={stem!r} with {num_blocks - 1} transitions needs input images of "
        f'{image_size_for(stem, num_blocks)} pixels a side.')
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _as_tuple(module, *names):
  for name in names:
    value = getattr(module, name)
    if not isinstance(value, tuple):
      object.__setattr__(module, name, tuple(value))


class CondenseNet(nn.Module):
  """CondenseNet, training form: every dense layer's 1x1 convolution is a learned group conv.

  `model.init(rng, x, train=False)` returns `{'params', 'batch_stats', 'masks'}`; `apply`
  needs all three and writes none of the masks. Images must be `default_image_size(model)`
  pixels a side. Raises ValueError (`check`, and for images of another size) naming the field
  and the fix.
  """
  stages: Sequence[int] = (14, 14, 14)
  growth: Sequence[int] = (8, 16, 32)
  bottleneck: int = 4
  group_1x1: int = 4
  group_3x3: int = 4
  condense_factor: int = 4
  num_classes: int = 10
  stem: str = 'cifar'
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  conv_lowering: str = 'auto'
  bn_axis_name: Optional[str] = None
  dense_blocks: str = 'auto'  # see `resolve_dense_blocks`
  gathers: str = 'auto'  # the condensed form's channel gathers: see `execution.skips_gathers`

  layer_kind = 'learned'

  def __post_init__(self):
    _as_tuple(self, 'stages', 'growth')
    super().__post_init__()

  def check(self):
    """Raises ValueError naming the field and the fix when the architecture cannot be built."""
    if len(self.stages) != len(self.growth) or not self.stages:
      raise ValueError(f'stages={self.stages} and growth={self.growth} must be non-empty and of '
                       'equal length (one growth rate per dense block).')
    stem_geometry(self.stem)
    execution.resolve_dense_blocks(self.dense_blocks, train=False)
    execution.skips_gathers(self.gathers, 0, train=False)
    for b, l, in_channels, k in dense_layer_inputs(self.stages, self.growth):
      where = f'denseblock_{b}/denselayer_{l}'
      width = self.bottleneck * k
      _check_divisible(in_channels, self.group_1x1, f'{where} input channels', 'group_1x1',
                       'choose growth rates and group_1x1 so that every layer input divides.')
      _check_divisible(in_channels, self.condense_factor, f'{where} input channels',
                       'condense_factor', 'choose a condense_factor that divides every '
                       'layer input (2*growth[0] and each growth rate).')
      _check_divisible(width, self.group_1x1, f'{where} bottleneck width (bottleneck*growth)',
                       'group_1x1', 'change bottleneck, growth or group_1x1.')
      _check_divisible(width, self.group_3x3, f'{where} bottleneck width (bottleneck*growth)',
                       'group_3x3', 'change bottleneck, growth or group_3x3.')
      _check_divisible(k, self.group_3x3, f'growth of denseblock_{b}', 'group_3x3',
                       'use a growth rate that group_3x3 divides.')

  @property
  def num_features(self) -> int:
    """Channels entering the classifier."""
    return final_channels(self.stages, self.growth)

  def layer_spec(self) -> LayerSpec:
    """The `LayerSpec` every dense layer of this network shares."""
    return LayerSpec(self.layer_kind, self.bottleneck, self.group_1x1, self.group_3x3,
                     self.condense_factor, self.dropout_rate, self.dtype, self.conv_lowering,
                     self.bn_axis_name, self.dense_blocks, self.gathers)

  def classifier(self, x):
    """Pooled features `[n, num_features]` -> logits `[n, num_classes]` in `dtype`."""
    return nn.Dense(self.num_classes, kernel_init=layers.linear_init, dtype=self.dtype,
                    name='classifier')(x)

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: `[batch, h, w, 3]` -> logits `[batch, num_classes]` (float32)."""
    self.check()
    spec = self.layer_spec()
    x = _stem_conv(2 * self.growth[0], self.stem, self.dtype)(x.astype(self.dtype))
    for b, (n, k) in enumerate(zip(self.stages, self.growth), start=1):
      x = DenseBlock(n, k, spec, name=f'denseblock_{b}')(x, train)
      if b < len(self.stages):  # transition: 2x2 average pooling only
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = layers.batch_norm_relu(train, self.dtype, self.bn_axis_name, name='norm_last')(x)
    x = _global_pool(x, self.stem, len(self.stages))  # [n, num_features]
    return self.classifier(x).astype(jnp.float32)


class CondensedNet(CondenseNet):
  """CondenseNet, inference form (what `condense.export` returns): each LGC is an index gather,
  BN, ReLU, a 1x1 convolution with `group_1x1` groups and a channel shuffle; the classifier
  reads `int(num_features * classifier_keep)` gathered features. Variables:
  `{'params', 'batch_stats', 'indices'}`; no masks.
  """
  classifier_keep: float = 0.5

  layer_kind = 'condensed'

  @property
  def classifier_inputs(self) -> int:
    """Features the condensed classifier keeps: `int(num_features * classifier_keep)`."""
    return int(self.num_features * self.classifier_keep)

  def classifier(self, x):
    """Pooled features `[n, num_features]` -> logits `[n, num_classes]`, reading only the
    `classifier_inputs` gathered features."""
    return layers.CondensedLinear(self.num_classes, self.classifier_inputs, self.dtype,
                                  name='classifier')(x)

  @classmethod
  def from_model(cls, model: CondenseNet, classifier_keep: float = 0.5) -> 'CondensedNet':
    """The condensed form of a training-form `model`: its architecture and execution fields,
    with `classifier_keep`."""
    fields = {**architecture(model), **{f: getattr(model, f) for f in EXECUTION_FIELDS}}
    fields.pop('classifier_keep', None)
    return cls(**fields, classifier_keep=classifier_keep)


class Transition(nn.Module):
  """DenseNet transition: BN -> ReLU -> 1x1 conv (compression) -> 2x2 average pooling."""
  features: int
  spec: LayerSpec

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.spec.conv(self.features, 1, self.spec.group_1x1, name='conv')(x, train)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def densenet_transition_channels(channels: int, reduction: float, group_1x1: int) -> int:
  """Output channels of a DenseNet transition: ceil(c * reduction), rounded up to group_1x1."""
  out = math.ceil(channels * reduction)
  return -(-out // group_1x1) * group_1x1


class DenseNet(nn.Module):
  """DenseNet-BC (the official repository's baseline): bottleneck dense layers, transitions
  with a 1x1 convolution that keeps `reduction` of the channels, then 2x2 average pooling.

  Call: `x` `[n, h, w, 3]` -> logits `[n, num_classes]` (float32). Raises ValueError when
  `stages` and `growth` are empty or of different lengths, or the images are of another size
  than `default_image_size(model)`.
  """
  stages: Sequence[int] = (16, 16, 16)
  growth: Sequence[int] = (12, 12, 12)
  bottleneck: int = 4
  group_1x1: int = 1
  group_3x3: int = 1
  reduction: float = 0.5
  num_classes: int = 10
  stem: str = 'cifar'
  dtype: Any = jnp.float32
  conv_lowering: str = 'auto'
  bn_axis_name: Optional[str] = None
  dense_blocks: str = 'auto'  # see `resolve_dense_blocks`

  def __post_init__(self):
    _as_tuple(self, 'stages', 'growth')
    super().__post_init__()

  def layer_spec(self) -> LayerSpec:
    """The `LayerSpec` every dense layer and transition of this network shares."""
    return LayerSpec('plain', self.bottleneck, self.group_1x1, self.group_3x3, 1, 0.0,
                     self.dtype, self.conv_lowering, self.bn_axis_name, self.dense_blocks)

  def block_channels(self):
    """Yields `(block, in_channels, out_channels_after_transition_or_None)` per dense block."""
    channels = 2 * self.growth[0]
    for b, (n, k) in enumerate(zip(self.stages, self.growth), start=1):
      end = channels + n * k
      last = b == len(self.stages)
      out = None if last else densenet_transition_channels(end, self.reduction, self.group_1x1)
      yield b, channels, end, out
      channels = out

  @property
  def num_features(self) -> int:
    """Channels entering the classifier."""
    return list(self.block_channels())[-1][2]

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.stages) != len(self.growth) or not self.stages:
      raise ValueError(f'stages={self.stages} and growth={self.growth} must be non-empty and of '
                       'equal length.')
    spec = self.layer_spec()
    x = _stem_conv(2 * self.growth[0], self.stem, self.dtype)(x.astype(self.dtype))
    for b, _, _, out in self.block_channels():
      x = DenseBlock(self.stages[b - 1], self.growth[b - 1], spec, name=f'denseblock_{b}')(
          x, train)
      if out is not None:
        x = Transition(out, spec, name=f'transition_{b}')(x, train)
    x = layers.batch_norm_relu(train, self.dtype, self.bn_axis_name, name='norm_last')(x)
    x = _global_pool(x, self.stem, len(self.stages))  # [n, num_features]
    return nn.Dense(self.num_classes, kernel_init=layers.linear_init, dtype=self.dtype,
                    name='classifier')(x).astype(jnp.float32)


# Named variants (CIFAR rows: 10 classes; set num_classes=100 for CIFAR-100).
_cifar = functools.partial(CondenseNet, growth=(8, 16, 32), group_1x1=4, group_3x3=4,
                           condense_factor=4, stem='cifar')
CondenseNet50 = functools.partial(_cifar, stages=(8, 8, 8))
CondenseNet74 = functools.partial(_cifar, stages=(12, 12, 12))
CondenseNet86 = functools.partial(_cifar, stages=(14, 14, 14))
CondenseNet98 = functools.partial(_cifar, stages=(16, 16, 16))
CondenseNet110 = functools.partial(_cifar, stages=(18, 18, 18))
CondenseNet122 = functools.partial(_cifar, stages=(20, 20, 20))
CondenseNet182 = functools.partial(_cifar, stages=(30, 30, 30), growth=(12, 24, 48))
_imagenet = functools.partial(CondenseNet, stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128),
                              num_classes=1000, stem='imagenet')
CondenseNet74_C4 = functools.partial(_imagenet, group_1x1=4, group_3x3=4, condense_factor=4)
CondenseNet74_C8 = functools.partial(_imagenet, group_1x1=8, group_3x3=8, condense_factor=8)
DenseNetBC100 = functools.partial(DenseNet, stages=(16, 16, 16), growth=(12, 12, 12),
                                  reduction=0.5, stem='cifar')
# A test-sized CondenseNet: two layers per block, 1.2 MFLOPs.
CondenseNetTiny = functools.partial(_cifar, stages=(2, 2, 2), growth=(4, 8, 8))


# Fields of the model classes that say how the network is executed, not which function it
# computes: a run may change them and still resume, and they are not saved with a model.
EXECUTION_FIELDS = ('dtype', 'conv_lowering', 'bn_axis_name', 'dense_blocks', 'gathers')


def architecture(model) -> dict[str, Any]:
  """The fields that define `model`'s network, JSON-ready (sequences as lists): every field of
  its class but `EXECUTION_FIELDS`. The one definition that saved models
  (`checkpoint.save_condensed`), the resume identity of a run, `CondensedNet.from_model` and
  messages derive from."""
  fields = {}
  for f in dataclasses.fields(model):
    if f.init and f.name not in ('parent', 'name') + EXECUTION_FIELDS:
      value = getattr(model, f.name)
      fields[f.name] = list(value) if isinstance(value, tuple) else value
  return fields


def describe(model) -> str:
  """`Class(field=value, ...)` of `model`'s architecture, for messages."""
  fields = ', '.join(f'{k}={v!r}' for k, v in architecture(model).items())
  return f'{type(model).__name__}({fields})'


def image_size_for(stem: str, num_blocks: int) -> int:
  """The input size a network with `stem` and `num_blocks` dense blocks takes: the final map
  is the stem's pooling window after the stem's stride and a 2x2 pooling per transition."""
  stride, pool = stem_geometry(stem)
  return pool * stride * 2 ** (num_blocks - 1)


def default_image_size(model) -> int:
  """The input size the architecture expects (32 for CIFAR stems, 224 for ImageNet)."""
  return image_size_for(model.stem, len(model.stages))


def variable_shapes(model, image_size: Optional[int] = None):
  """`jax.ShapeDtypeStruct` tree of `model.init`'s variables, without computing anything."""
  size = image_size or default_image_size(model)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


def _initial_value(key: tuple[str, ...], shape, dtype, rng: np.random.Generator):
  collection, *_, leaf = key
  if collection == 'masks' or leaf in ('scale', 'var'):
    return np.ones(shape, dtype)
  if collection == 'indices' or leaf in ('bias', 'mean'):
    return np.zeros(shape, dtype)
  if leaf == 'kernel' and len(shape) == 4:  # conv: He normal, fan = kh * kw * out
    return rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape).astype(dtype)
  if leaf == 'kernel' and len(shape) == 2:  # Linear: PyTorch's U(-1/sqrt(in), 1/sqrt(in))
    bound = 1.0 / np.sqrt(shape[0])
    return rng.uniform(-bound, bound, shape).astype(dtype)
  raise ValueError(f"no initializer for {'/'.join(key)} of shape {shape}")


def init_variables(model, seed: int = 0, image_size: Optional[int] = None):
  """Initial variables of `model` drawn on the host with numpy, without compiling anything.

  Same structure and the same distributions as `model.init` (He-normal convolutions with
  fan = kh*kw*out, PyTorch's uniform Linear weights, BN scale 1 / bias 0, masks 1), but not the
  same numbers: `model.init` compiles a random-number program, which is slow on CPU
  (docs/performance.md#initialization). Deterministic in `seed`. The arrays are numpy arrays on
  the host: `apply` takes them as they are, and a training run places them on its devices
  once. Raises ValueError for a variable it has no initializer for.
  """
  flat = traverse_util.flatten_dict(dict(variable_shapes(model, image_size)))
  rng = np.random.default_rng(seed)
  values = {k: _initial_value(k, flat[k].shape, flat[k].dtype, rng) for k in sorted(flat)}
  return traverse_util.unflatten_dict(values)
