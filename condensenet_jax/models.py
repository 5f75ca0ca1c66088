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
from condensenet_jax.execution import Execution

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


def num_final_channels(stages: Sequence[int], growth: Sequence[int]) -> int:
  """Channels after the last dense block of a CondenseNet (transitions keep the count)."""
  return 2 * growth[0] + sum(n * k for n, k in zip(stages, growth))


def _check_divisible(value, divisor, what, field, fix):
  if divisor <= 0 or value % divisor:
    raise ValueError(f'{what} = {value} is not divisible by {field} = {divisor}; {fix}')


def condenses(model) -> bool:
  """Whether `model` has learned layers with condensing events: a `CondenseNet` or a
  `CondenseNetV2` (either form), not a `DenseNet`."""
  return isinstance(model, (CondenseNet, CondenseNetV2))


def is_condensed(model) -> bool:
  """Whether `model` is a condensed inference form (`CONDENSED_CLASSES`)."""
  return isinstance(model, CONDENSED_CLASSES)


def _check_dense_layers(model) -> None:
  """The checks every CondenseNet generation shares: stages and growth, the stem, and the
  divisibility of each dense layer's widths by its groups and condense factor."""
  if len(model.stages) != len(model.growth) or not model.stages:
    raise ValueError(f'stages={model.stages} and growth={model.growth} must be non-empty and of '
                     'equal length (one growth rate per dense block).')
  stem_geometry(model.stem)
  for b, l, in_channels, k in dense_layer_inputs(model.stages, model.growth):
    where = f'denseblock_{b}/denselayer_{l}'
    width = model.bottleneck * k
    _check_divisible(in_channels, model.group_1x1, f'{where} input channels', 'group_1x1',
                     'choose growth rates and group_1x1 so that every layer input divides.')
    _check_divisible(in_channels, model.condense_factor, f'{where} input channels',
                     'condense_factor', 'choose a condense_factor that divides every '
                     'layer input (2*growth[0] and each growth rate).')
    _check_divisible(width, model.group_1x1, f'{where} bottleneck width (bottleneck*growth)',
                     'group_1x1', 'change bottleneck, growth or group_1x1.')
    _check_divisible(width, model.group_3x3, f'{where} bottleneck width (bottleneck*growth)',
                     'group_3x3', 'change bottleneck, growth or group_3x3.')
    _check_divisible(k, model.group_3x3, f'growth of denseblock_{b}', 'group_3x3',
                     'use a growth rate that group_3x3 divides.')


ModuleDef = Any  # a module class or a functools.partial of one


class DenseLayer(nn.Module):
  """conv_1 (1x1, `bottleneck * growth` outputs) -> conv_2 (3x3, `growth` outputs): the layer's
  new features, which `DenseBlock` appends to its input.

  `conv_1` and `conv_2` are module factories (`functools.partial` of a layer class), called as
  `conv_1(features, name=...)(x, train, stats)` and `conv_2(features, name=...)(x, train)`.
  """
  growth: int
  bottleneck: int
  conv_1: ModuleDef
  conv_2: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False, stats=None):
    y = self.conv_1(self.bottleneck * self.growth, name='conv_1')(x, train, stats)
    return self.conv_2(self.growth, name='conv_2')(y, train)


class DenseBlock(nn.Module):
  """`num_layers` dense layers (`DenseLayer` with `conv_1`, `conv_2`), each reading all the
  features before it.

  Call: `x` `[n, h, w, c]` -> `[n, h, w, c + num_layers * growth]`: `x` followed by each
  layer's `growth` new channels, in layer order. `form` (one of
  `execution.DENSE_BLOCK_FORMS`, see `Execution.dense_blocks`) says how the features are
  collected. With `share_stats` (training) every channel's batch statistics are computed once,
  when the channel is made, and handed to the layers that read it. With
  `layout='channel_major'` (eval mode only; `Execution.condensed_blocks`) `x` is `[c, n, h, w]`,
  and so is the result: the features are one `[c + num_layers * growth, n, h, w]` buffer,
  written in place, and the factories must make layers of that layout; `form` is not used.
  Raises ValueError for an unknown `form` and for 'channel_major' in training.
  """
  num_layers: int
  growth: int
  bottleneck: int
  conv_1: ModuleDef
  conv_2: ModuleDef
  form: str = 'concatenate'
  layout: str = 'channels_last'
  share_stats: bool = False
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    layer = lambda l: DenseLayer(self.growth, self.bottleneck, self.conv_1, self.conv_2,
                                 name=f'denselayer_{l}')
    # In training, every layer's first BN normalizes all the features before it with their
    # batch statistics; a channel's statistics are the same for every layer that reads it, so
    # they are computed once, when the channel is made, instead of over the whole block input
    # at every layer (quadratic in the number of layers).
    stats = layers.batch_stats(x, self.bn_axis_name) if self.share_stats else None

    def grow(stats, y):
      if not self.share_stats:
        return None
      new = layers.batch_stats(y, self.bn_axis_name)
      return tuple(jnp.concatenate([a, b]) for a, b in zip(stats, new))

    def in_place(x, axis, stats):
      """One buffer of the block's final width along `axis`; each layer reads its prefix and
      writes its features after it, in place."""
      channels = x.shape[axis]
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, self.num_layers * self.growth)
      features = jnp.pad(x, widths)
      for l in range(1, self.num_layers + 1):
        y = layer(l)(jax.lax.slice_in_dim(features, 0, channels, axis=axis), train, stats)
        features = jax.lax.dynamic_update_slice_in_dim(features, y.astype(features.dtype),
                                                       channels, axis=axis)
        channels += self.growth
        stats = grow(stats, y)
      return features

    if self.layout == 'channel_major':
      layers.check_channel_major(train, 'DenseBlock')
      return in_place(x, 0, None)
    if self.form == 'concatenate':
      for l in range(1, self.num_layers + 1):
        y = layer(l)(x, train, stats)
        x = jnp.concatenate([x, y], axis=-1)  # [n, h, w, in + growth]
        stats = grow(stats, y)
      return x
    if self.form != 'preallocate':
      raise ValueError(f'form={self.form!r} is not one of {execution.DENSE_BLOCK_FORMS}.')
    return in_place(x, x.ndim - 1, stats)


def _stem_conv(features: int, stem: str, dtype: Any) -> nn.Conv:
  """The first convolution: 3x3, `features` outputs, the stem's stride, no bias."""
  stride, _ = stem_geometry(stem)
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=layers.conv_init, dtype=dtype, name='init_conv')


def _to_layout(x, layout: str):
  """`[n, h, w, c]` -> the dense blocks' `layout` (`[c, n, h, w]` for 'channel_major')."""
  return jnp.transpose(x, (3, 0, 1, 2)) if layout == 'channel_major' else x


def _pixels(x, layout: str) -> int:
  """Pixels per map of `x` in `layout`."""
  h, w = x.shape[2:4] if layout == 'channel_major' else x.shape[1:3]
  return h * w


def _transition_pool(x, layout: str):
  """2x2 average pooling, stride 2, of a map in `layout`."""
  if layout != 'channel_major':
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  # The window's four strided slices, added in window order: one elementwise pass. (Slices of
  # the spatial axes alone: under a symbolic batch, strided indexing would become gathers.)
  h, w = 2 * (x.shape[2] // 2), 2 * (x.shape[3] // 2)  # an odd last row or column is dropped
  window = lambda dy, dx: jax.lax.slice_in_dim(
      jax.lax.slice_in_dim(x, dy, dy + h - 1, 2, axis=2), dx, dx + w - 1, 2, axis=3)
  return sum(window(dy, dx) for dy in (0, 1) for dx in (0, 1)) / 4


def _global_pool(x, stem: str, num_blocks: int, layout: str):
  """Average pooling over the whole final map: `[n, pool, pool, c]` (`[c, n, pool, pool]`
  channel-major) -> `[n, c]` (float32); ValueError naming the image size the architecture
  needs for a map of another size."""
  _, pool = stem_geometry(stem)
  size = x.shape[2:4] if layout == 'channel_major' else x.shape[1:3]
  if size != (pool, pool):
    raise ValueError(
        f'the feature map before the final {pool}x{pool} pooling is {size[0]}x{size[1]}; '
        f"stem={stem!r} with {num_blocks - 1} transitions needs input images of "
        f'{image_size_for(stem, num_blocks)} pixels a side.')
  if layout == 'channel_major':  # a product, not a reduction: docs/backends.md#condensed-layout
    c, n = x.shape[:2]
    average = jnp.full((pool * pool,), 1 / (pool * pool), jnp.float32)
    return (x.astype(jnp.float32).reshape(c * n, pool * pool) @ average).reshape(c, n).T
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _final_features(model, x, layout: str, train: bool):
  """The final BN-ReLU (`norm_last`) and global pooling of `model`'s last dense block's
  output `x` in `layout`: `[n, num_features]` float32."""
  norm = layers.batch_norm_relu(train, model.dtype, model.bn_axis_name, name='norm_last')
  if layout == 'channel_major':
    x = layers.normalize_channel_major(norm, x, layers.eval_norm_terms(norm, x.shape[0],
                                                                       x.dtype))
  else:
    x = norm(x)
  return _global_pool(x, model.stem, len(model.stages), layout)


class CondenseNet(nn.Module):
  """CondenseNet, training form: every dense layer's 1x1 convolution is a learned group conv.

  `model.init(rng, x, train=False)` returns `{'params', 'batch_stats', 'masks'}`; `apply`
  needs all three and writes none of the masks. Images must be `default_image_size(model)`
  pixels a side. Raises ValueError (`check`, and for images of another size) naming the field
  and the fix.

  The fields up to `dropout_rate` define the network (`architecture`); `dtype` (of the
  activations), `bn_axis_name` (BN batch statistics averaged over that mapped axis) and
  `execution` (how it runs: `execution.Execution`) do not change the function it computes.
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
  bn_axis_name: Optional[str] = None
  execution: Execution = Execution()

  # Whether dense blocks hand each channel's batch statistics to the layers that read it (see
  # `DenseBlock`); the condensed form reads gathered channels and computes its own.
  shares_batch_stats = True
  # Whether condensing stops at progress 0.5005 (CondenseNetV2's guard; condense.stage_at).
  condensing_stops_at_half = False

  def check(self):
    """Raises ValueError naming the field and the fix when the architecture cannot be built."""
    _check_dense_layers(self)

  @property
  def num_features(self) -> int:
    """Channels entering the classifier."""
    return num_final_channels(self.stages, self.growth)

  def layout(self, train: bool) -> str:
    """The layout of the dense blocks: always 'channels_last' for the training form."""
    del train
    return 'channels_last'

  def conv_1(self, pixels: int, train: bool) -> ModuleDef:
    """Factory of the dense layers' 1x1 convolutions over maps of `pixels` pixels: the
    learned group convolution."""
    del pixels, train  # one form everywhere
    return functools.partial(layers.LearnedGroupConv, groups=self.group_1x1,
                             condense_factor=self.condense_factor,
                             dropout_rate=self.dropout_rate, dtype=self.dtype,
                             bn_axis_name=self.bn_axis_name)

  def classifier(self, x):
    """Pooled features `[n, num_features]` -> logits `[n, num_classes]` in `dtype`."""
    return nn.Dense(self.num_classes, kernel_init=layers.linear_init, dtype=self.dtype,
                    name='classifier')(x)

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: `[batch, h, w, 3]` -> logits `[batch, num_classes]` (float32)."""
    self.check()
    layout = self.layout(train)
    conv_2 = functools.partial(_conv(self), kernel_size=3, groups=self.group_3x3, padding=1,
                               layout=layout)
    x = _stem_conv(2 * self.growth[0], self.stem, self.dtype)(x.astype(self.dtype))
    x = _to_layout(x, layout)
    for b, (n, k) in enumerate(zip(self.stages, self.growth), start=1):
      conv_1 = self.conv_1(_pixels(x, layout), train)
      x = DenseBlock(n, k, self.bottleneck, conv_1, conv_2,
                     form=self.execution.dense_blocks(train), layout=layout,
                     share_stats=train and self.shares_batch_stats,
                     bn_axis_name=self.bn_axis_name, name=f'denseblock_{b}')(x, train)
      if b < len(self.stages):  # transition: 2x2 average pooling only
        x = _transition_pool(x, layout)
    x = _final_features(self, x, layout, train)  # [n, num_features]
    return self.classifier(x).astype(jnp.float32)


def _conv(model) -> ModuleDef:
  """Factory of `model`'s BN-ReLU-convolutions (`layers.Conv`): its dtype, BN axis and the
  lowering its execution resolves."""
  return functools.partial(layers.Conv, dtype=model.dtype, bn_axis_name=model.bn_axis_name,
                           lowering=model.execution.lowering())


class CondensedCondenseNet(CondenseNet):
  """CondenseNet, condensed inference form (what `condense.export` returns): each LGC is an
  index gather, BN, ReLU, a 1x1 convolution with `group_1x1` groups and a channel shuffle; the
  classifier reads `int(num_features * classifier_keep)` gathered features. Variables:
  `{'params', 'batch_stats', 'indices'}`; no masks.
  """
  classifier_keep: float = 0.5

  shares_batch_stats = False

  @property
  def num_classifier_inputs(self) -> int:
    """Features the condensed classifier keeps: `int(num_features * classifier_keep)`."""
    return int(self.num_features * self.classifier_keep)

  def conv_1(self, pixels: int, train: bool) -> ModuleDef:
    """Factory of the condensed 1x1 convolutions over maps of `pixels` pixels, in the form the
    execution picks for them (`Execution.condensed_conv`)."""
    return functools.partial(layers.CondensedConv, groups=self.group_1x1,
                             condense_factor=self.condense_factor, dtype=self.dtype,
                             form=self.execution.condensed_conv(pixels, train),
                             layout=self.layout(train), bn_axis_name=self.bn_axis_name)

  def layout(self, train: bool) -> str:
    """The layout of the dense blocks, as the execution picks it
    (`Execution.condensed_blocks`)."""
    return self.execution.condensed_blocks(train)

  def classifier(self, x):
    """Pooled features `[n, num_features]` -> logits `[n, num_classes]`, reading only the
    `num_classifier_inputs` gathered features."""
    return layers.CondensedLinear(self.num_classes, self.num_classifier_inputs, self.dtype,
                                  name='classifier')(x)

  @classmethod
  def from_model(cls, model: CondenseNet,
                 classifier_keep: float = 0.5) -> 'CondensedCondenseNet':
    """The condensed form of a training-form `model`: its architecture and how it runs
    (`RUNTIME_FIELDS`), with `classifier_keep`."""
    return _condensed_form(cls, model, classifier_keep=classifier_keep)


# The name before CondensedCondenseNet; model.json files written with it still load.
CondensedNet = CondensedCondenseNet


class Transition(nn.Module):
  """DenseNet transition: BN -> ReLU -> 1x1 conv (compression) -> 2x2 average pooling.
  `conv`: factory of `layers.Conv`, called as `conv(features, kernel_size, groups, name=...)`."""
  features: int
  groups: int
  conv: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = self.conv(self.features, 1, self.groups, name='conv')(x, train)
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
  than `default_image_size(model)`. `dtype`, `bn_axis_name` and `execution` as in
  `CondenseNet`.
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
  bn_axis_name: Optional[str] = None
  execution: Execution = Execution()

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
    conv = _conv(self)
    conv_1 = functools.partial(conv, kernel_size=1, groups=self.group_1x1)
    conv_2 = functools.partial(conv, kernel_size=3, groups=self.group_3x3, padding=1)
    x = _stem_conv(2 * self.growth[0], self.stem, self.dtype)(x.astype(self.dtype))
    for b, _, _, out in self.block_channels():
      x = DenseBlock(self.stages[b - 1], self.growth[b - 1], self.bottleneck, conv_1, conv_2,
                     form=self.execution.dense_blocks(train), share_stats=train,
                     bn_axis_name=self.bn_axis_name, name=f'denseblock_{b}')(x, train)
      if out is not None:
        x = Transition(out, self.group_1x1, conv, name=f'transition_{b}')(x, train)
    x = _final_features(self, x, 'channels_last', train)  # [n, num_features]
    return nn.Dense(self.num_classes, kernel_init=layers.linear_init, dtype=self.dtype,
                    name='classifier')(x).astype(jnp.float32)


class SFRDenseLayer(nn.Module):
  """CondenseNetV2's dense layer: conv_1 (learned group conv) -> conv_2 (3x3 group conv) ->
  optional SE on the new features; `sfr` maps the new features back onto the input width and
  is added to the input.

  Call: `x` `[n, h, w, c]` -> `[n, h, w, c + growth]`: `x + sfr(new)` followed by `new`.
  Factories are called as `conv_1(features, name=...)(x, train)`, `conv_2(features,
  name=...)(x, train)` and `sfr(features, name=...)(new, x, train)` (which returns `x` with
  the reactivation added to its first `features` channels). With `layout='channel_major'`
  (eval mode only) `x` is the block's `[C, n, h, w]` buffer whose first `channels` rows hold
  the features so far; the layer adds the reactivation into them and writes its new features
  after them, in place, and the factories must make layers of that layout.
  """
  growth: int
  bottleneck: int
  conv_1: ModuleDef
  conv_2: ModuleDef
  sfr: ModuleDef
  use_se: bool = False
  dtype: Any = jnp.float32
  layout: str = 'channels_last'

  @nn.compact
  def __call__(self, x, train: bool = False, channels: Optional[int] = None):
    channel_major = self.layout == 'channel_major'
    if channel_major:
      inputs = jax.lax.slice_in_dim(x, 0, channels, axis=0)
    else:
      inputs, channels = x, x.shape[-1]
    new = self.conv_1(self.bottleneck * self.growth, name='conv_1')(inputs, train)
    new = self.conv_2(self.growth, name='conv_2')(new, train)
    if self.use_se:
      new = layers.SELayer(reduction=1, dtype=self.dtype, layout=self.layout, name='se')(new)
    x = self.sfr(channels, name='sfr')(new, x, train)
    if channel_major:
      return jax.lax.dynamic_update_slice_in_dim(x, new.astype(x.dtype), channels, axis=0)
    return jnp.concatenate([x, new.astype(x.dtype)], axis=-1)


class SFRDenseBlock(nn.Module):
  """`num_layers` `SFRDenseLayer`s: `[n, h, w, c]` -> `[n, h, w, c + num_layers * growth]`.

  With `layout='channel_major'` (eval mode only; `Execution.condensed_blocks`) `x` is
  `[c, n, h, w]`, the layers compute on one `[c + num_layers * growth, n, h, w]` buffer, and the
  factories must make layers of that layout. Raises ValueError for 'channel_major' in
  training.
  """
  num_layers: int
  growth: int
  bottleneck: int
  conv_1: ModuleDef
  conv_2: ModuleDef
  sfr: ModuleDef
  use_se: bool = False
  dtype: Any = jnp.float32
  layout: str = 'channels_last'

  @nn.compact
  def __call__(self, x, train: bool = False):
    channel_major = self.layout == 'channel_major'
    channels = x.shape[0 if channel_major else -1]
    if channel_major:
      layers.check_channel_major(train, 'SFRDenseBlock')
      x = jnp.pad(x, [(0, self.num_layers * self.growth)] + [(0, 0)] * 3)
    for l in range(1, self.num_layers + 1):
      x = SFRDenseLayer(self.growth, self.bottleneck, self.conv_1, self.conv_2, self.sfr,
                        self.use_se, self.dtype, self.layout, name=f'denselayer_{l}')(
                            x, train, channels)
      channels += self.growth
    return x


class CondenseNetV2(nn.Module):
  """CondenseNetV2 (Yang et al., CVPR 2021), training form: every dense layer reads its input
  through a learned group convolution (`conv_1`, masks over inputs, as in `CondenseNet`) and
  updates it through a sparse feature reactivation (`sfr`, masks over outputs).

  `model.init(rng, x, train=False)` returns `{'params', 'batch_stats', 'masks'}`. Blocks
  `hs_start_block` and later (0-based, as the official arguments) use hard-swish instead of
  ReLU, blocks `se_start_block` and later an SE layer on each layer's new features. After the
  last block: BN-ReLU, average pooling, an SE layer (`last_se_reduction`), a linear layer of
  `fc_channel` outputs with hard-swish, and the classifier. Transitions are 2x2 average
  pooling. Defaults: CondenseNetV2-A. `dtype`, `bn_axis_name` and `execution` as in
  `CondenseNet`. Raises ValueError (`check`) naming the field and the fix.

  `init_variables` starts every BN scale at 1, the SFRs' included: the official `SFR` zeroes
  its BN scale when built, but the official model's initialization then sets every BN scale
  to 1 (tests/fixtures/README.md).
  """
  stages: Sequence[int] = (1, 1, 4, 6, 8)
  growth: Sequence[int] = (8, 8, 16, 32, 64)
  bottleneck: int = 4
  group_1x1: int = 8
  group_3x3: int = 8
  group_trans: int = 8
  condense_factor: int = 8
  trans_factor: int = 8
  hs_start_block: int = 2
  se_start_block: int = 3
  last_se_reduction: int = 16
  fc_channel: int = 828
  num_classes: int = 1000
  stem: str = 'imagenet'
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  execution: Execution = Execution()

  # The official V2 layers change their stage only while progress < 0.5005 (condense.stage_at).
  condensing_stops_at_half = True

  def check(self):
    """Raises ValueError naming the field and the fix when the architecture cannot be built."""
    _check_dense_layers(self)
    if self.trans_factor != self.condense_factor:
      raise ValueError(f'trans_factor={self.trans_factor} differs from condense_factor='
                       f'{self.condense_factor}: the SFR and LGC condensing events run on one '
                       'schedule here (as in every official variant); set them equal.')
    for b, _, in_channels, k in dense_layer_inputs(self.stages, self.growth):
      _check_divisible(k, self.group_trans, f'growth of denseblock_{b}', 'group_trans',
                       'use a growth rate that group_trans divides.')
      _check_divisible(in_channels, self.trans_factor, f'denseblock_{b} layer input channels',
                       'trans_factor', 'choose a trans_factor that divides every layer input.')
      _check_divisible(in_channels, self.group_trans, f'denseblock_{b} layer input channels',
                       'group_trans', 'choose a group_trans that divides every layer input.')

  @property
  def num_features(self) -> int:
    """Channels after the last dense block."""
    return num_final_channels(self.stages, self.growth)

  def activation(self, block: int) -> str:
    """The activation of dense block `block` (1-based)."""
    return 'hard_swish' if block - 1 >= self.hs_start_block else 'relu'

  layout = CondenseNet.layout  # always 'channels_last'

  def conv_1(self, activation: str, pixels: int, train: bool) -> ModuleDef:
    """Factory of the dense layers' 1x1 convolutions: learned group convolutions."""
    del pixels, train  # one form everywhere
    return functools.partial(layers.LearnedGroupConv, groups=self.group_1x1,
                             condense_factor=self.condense_factor, activation=activation,
                             dtype=self.dtype, bn_axis_name=self.bn_axis_name)

  def sfr(self, activation: str, train: bool) -> ModuleDef:
    """Factory of the sparse feature reactivations (masked)."""
    del train  # one form everywhere
    return functools.partial(layers.SparseFeatureReactivation, groups=self.group_trans,
                             condense_factor=self.trans_factor, activation=activation,
                             dtype=self.dtype, bn_axis_name=self.bn_axis_name)

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: `[batch, h, w, 3]` -> logits `[batch, num_classes]` (float32)."""
    self.check()
    x = _stem_conv(2 * self.growth[0], self.stem, self.dtype)(x.astype(self.dtype))
    layout = self.layout(train)
    x = _to_layout(x, layout)
    for b, (n, k) in enumerate(zip(self.stages, self.growth), start=1):
      act = self.activation(b)
      conv_1 = self.conv_1(act, _pixels(x, layout), train)
      conv_2 = functools.partial(_conv(self), kernel_size=3, groups=self.group_3x3, padding=1,
                                 activation=act, layout=layout)
      x = SFRDenseBlock(n, k, self.bottleneck, conv_1, conv_2, self.sfr(act, train),
                        use_se=b - 1 >= self.se_start_block, dtype=self.dtype, layout=layout,
                        name=f'denseblock_{b}')(x, train)
      if b < len(self.stages):
        x = _transition_pool(x, layout)
    x = _final_features(self, x, layout, train)  # [n, num_features]
    x = layers.SELayer(self.last_se_reduction, dtype=self.dtype, name='se_last')(x)
    x = nn.Dense(self.fc_channel, kernel_init=layers.linear_init, dtype=self.dtype,
                 name='fc')(x)
    x = jax.nn.hard_swish(x)
    return nn.Dense(self.num_classes, kernel_init=layers.linear_init, dtype=self.dtype,
                    name='classifier')(x).astype(jnp.float32)


class CondensedCondenseNetV2(CondenseNetV2):
  """CondenseNetV2, condensed inference form (what `condense.export` returns for a
  `CondenseNetV2`): each LGC an index gather, BN, activation, a 1x1 convolution with
  `group_1x1` groups and a channel shuffle (`layers.CondensedConv`); each SFR a BN,
  activation, channel shuffle, a 1x1 convolution with `group_trans` groups and a scatter-add
  of its outputs into the layer input (`layers.CondensedSFR`). The classifier is not
  condensed. Variables: `{'params', 'batch_stats', 'indices'}`; no masks.
  """

  def conv_1(self, activation: str, pixels: int, train: bool) -> ModuleDef:
    """Factory of the condensed 1x1 convolutions over maps of `pixels` pixels, in the form the
    execution picks for them (`Execution.condensed_conv`)."""
    return functools.partial(layers.CondensedConv, groups=self.group_1x1,
                             condense_factor=self.condense_factor, activation=activation,
                             form=self.execution.condensed_conv(pixels, train),
                             layout=self.layout(train), dtype=self.dtype,
                             bn_axis_name=self.bn_axis_name)

  layout = CondensedCondenseNet.layout  # as the execution picks it

  def sfr(self, activation: str, train: bool) -> ModuleDef:
    """Factory of the condensed sparse feature reactivations."""
    return functools.partial(layers.CondensedSFR, groups=self.group_trans,
                             condense_factor=self.trans_factor, activation=activation,
                             lowering=self.execution.lowering(),
                             placement=self.execution.sfr_placement(),
                             layout=self.layout(train), dtype=self.dtype,
                             bn_axis_name=self.bn_axis_name)

  @classmethod
  def from_model(cls, model: CondenseNetV2) -> 'CondensedCondenseNetV2':
    """The condensed form of a training-form `model`: its architecture and how it runs."""
    return _condensed_form(cls, model)


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
# CondenseNetV2 variants of the official code (ImageNet, 224x224).
CondenseNetV2_A = functools.partial(CondenseNetV2)  # the defaults
CondenseNetV2_B = functools.partial(
    CondenseNetV2, stages=(2, 4, 6, 8, 6), growth=(6, 12, 24, 48, 96), group_1x1=6,
    group_3x3=6, group_trans=6, condense_factor=6, trans_factor=6, fc_channel=1024)
CondenseNetV2_C = functools.partial(
    CondenseNetV2, stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), fc_channel=1024)
# A test-sized CondenseNetV2 at CIFAR shapes: every kind of layer (ReLU and hard-swish blocks,
# SE from the third block).
CondenseNetV2Tiny = functools.partial(
    CondenseNetV2, stages=(1, 2, 2), growth=(4, 8, 8), group_1x1=4, group_3x3=4, group_trans=4,
    condense_factor=4, trans_factor=4, hs_start_block=1, se_start_block=2,
    last_se_reduction=4, fc_channel=32, num_classes=10, stem='cifar')


# The condensed inference forms, one per generation.
CONDENSED_CLASSES = (CondensedCondenseNet, CondensedCondenseNetV2)

# Fields of the model classes that say how the network runs, not which function it computes:
# a run may change them and still resume, and they are not saved with a model.
RUNTIME_FIELDS = ('dtype', 'bn_axis_name', 'execution')


def architecture(model) -> dict[str, Any]:
  """The fields that define `model`'s network, JSON-ready (sequences as lists): every field of
  its class but `RUNTIME_FIELDS`. The one definition that saved models
  (`checkpoint.save_condensed`), the resume identity of a run,
  `CondensedCondenseNet.from_model` and messages derive from."""
  fields = {}
  for f in dataclasses.fields(model):
    if f.init and f.name not in ('parent', 'name') + RUNTIME_FIELDS:
      value = getattr(model, f.name)
      fields[f.name] = list(value) if isinstance(value, (tuple, list)) else value
  return fields


def from_architecture(cls, fields: dict[str, Any], **runtime):
  """`cls` built from `architecture`'s fields (lists back to tuples, so that the module is
  hashable) and the `RUNTIME_FIELDS` in `runtime`."""
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()},
             **runtime)


def _condensed_form(cls, model, **fields):
  """`cls` (a condensed class) with `model`'s architecture, the extra `fields`, and how
  `model` runs (`RUNTIME_FIELDS`)."""
  return from_architecture(cls, {**architecture(model), **fields},
                           **{f: getattr(model, f) for f in RUNTIME_FIELDS})


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
  if leaf in ('kernel', 'squeeze', 'excite') and len(shape) == 2:
    # Linear (and the SE layers' maps): PyTorch's U(-1/sqrt(in), 1/sqrt(in))
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
