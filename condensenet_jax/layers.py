"""Building blocks of CondenseNet: the learned group convolution, its condensed form, grouped
convolutions with a per-backend lowering, and the channel shuffle.

Layouts are Flax's: activations NHWC, convolution kernels `(kh, kw, in_channels / groups, out)`.
A grouped kernel keeps the usual convention that output channels `[g*out/G, (g+1)*out/G)` read
input channels `[g*in/G, (g+1)*in/G)` (contiguous groups), as PyTorch and XLA do.

Learned group convolution (LGC): output channel `o` belongs to group `o % G` (interleaved). Its
mask, in the `'masks'` collection, has shape `(in_channels, G)`: column `g` says which input
channels group `g` still reads. Masks are read here and never written; only
`condense.condense_event` makes new ones.
"""

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from condensenet_jax import execution

# He-normal with fan = kh * kw * out_channels, as the official initialization.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def block_diagonal(kernel: jax.Array, groups: int) -> jax.Array:
  """Grouped kernel `(kh, kw, in/G, out)` -> dense `(kh, kw, in, out)`, zero off the diagonal."""
  kh, kw, in_per_group, out = kernel.shape
  k = kernel.reshape(kh, kw, in_per_group, groups, out // groups)
  eye = jnp.eye(groups, dtype=kernel.dtype)
  dense = jnp.einsum('hwigo,Gg->hwGigo', k, eye)  # [kh, kw, G_in, in/G, G_out, out/G]
  return dense.reshape(kh, kw, groups * in_per_group, out)


def _conv(x, kernel, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, *,
                 strides: Sequence[int] = (1, 1),
                 padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
                 lowering: str = 'grouped') -> jax.Array:
  """Convolution with `groups` contiguous groups, lowered as `lowering` says.

  Args:
    x: `[batch, h, w, in]`.
    kernel: `[kh, kw, in / groups, out]`.
    groups: number of groups (1 = ordinary convolution).
    strides, padding: as `lax.conv_general_dilated` (explicit padding, PyTorch's convention).
    lowering: one of `execution.LOWERINGS`: 'grouped' (XLA's `feature_group_count`),
      'block_diagonal' (one dense convolution whose kernel is zero off the diagonal blocks) or
      'per_group' (per-group matmuls for 1x1, else separate convolutions).
  Returns:
    `[batch, h', w', out]`, the same function for every lowering.
  Raises:
    ValueError: an unknown `lowering`.
  """
  kh, kw, in_per_group, out = kernel.shape
  pointwise = (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and all(
      p == (0, 0) for p in padding)
  if lowering not in execution.LOWERINGS:
    raise ValueError(f'lowering={lowering!r} is not one of {execution.LOWERINGS}.')
  if groups == 1:
    if pointwise:
      return jnp.dot(x, kernel[0, 0])
    return _conv(x, kernel, strides, padding)
  if lowering == 'grouped':
    return _conv(x, kernel, strides, padding, groups)
  if lowering == 'block_diagonal':
    dense = block_diagonal(kernel, groups)
    return jnp.dot(x, dense[0, 0]) if pointwise else _conv(x, dense, strides, padding)
  # per_group
  if pointwise:
    xg = x.reshape(x.shape[:-1] + (groups, in_per_group))  # [n, h, w, G, in/G]
    kg = kernel[0, 0].reshape(in_per_group, groups, out // groups).transpose(1, 0, 2)
    y = jnp.einsum('nhwgi,gio->nhwgo', xg, kg)  # [n, h, w, G, out/G]
    return y.reshape(y.shape[:-2] + (out,))
  xs = jnp.split(x, groups, axis=-1)
  ks = jnp.split(kernel, groups, axis=-1)
  return jnp.concatenate([_conv(a, b, strides, padding) for a, b in zip(xs, ks)], axis=-1)


def channel_major_conv(x: jax.Array, kernel: jax.Array, groups: int,
                       padding: int = 0) -> jax.Array:
  """Stride-1 convolution with `groups` contiguous groups over a channel-major activation:
  one batched matrix product of all kernel taps, then the sum of the taps' shifted maps.

  Args:
    x: `[in, n, h, w]`.
    kernel: `[k, k, in / groups, out]` (the layout of `grouped_conv`).
    groups: number of groups.
    padding: zeros on each side of both spatial axes.
  Returns:
    `[out, n, h + 2 * padding - k + 1, w + 2 * padding - k + 1]`: `grouped_conv` of the
    channels-last `x`, transposed the same way.
  """
  k, _, per_in, out = kernel.shape
  _, n, h, w = x.shape
  per_out = out // groups
  taps = kernel.reshape(k, k, per_in, groups, per_out).transpose(3, 0, 1, 4, 2)
  y = jnp.einsum('gti,gip->gtp', taps.reshape(groups, k * k * per_out, per_in),
                 x.reshape(groups, per_in, n * h * w))
  y = y.reshape(groups, k * k * per_out, n, h, w)  # at most 5-D: TFLite's limit for a pad
  if padding:
    y = jnp.pad(y, [(0, 0)] * 3 + [(padding, padding)] * 2)
  ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
  tap = lambda dy, dx: slice((dy * k + dx) * per_out, (dy * k + dx + 1) * per_out)
  out_map = sum(y[:, tap(dy, dx), :, dy:dy + ho, dx:dx + wo]
                for dy in range(k) for dx in range(k))
  return out_map.reshape(out, n, ho, wo)


def take_channels(x: jax.Array, index: jax.Array) -> jax.Array:
  """`x[..., index]`: the kept channels of an NHWC activation."""
  return jnp.take(x, index, axis=-1)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """Group-major channel order `g * (C/G) + k` -> interleaved order `k * G + g`.

  `x`: `[..., C]` with `C` divisible by `groups`; returns the same shape."""
  c = x.shape[-1]
  y = x.reshape(x.shape[:-1] + (groups, c // groups))
  return jnp.swapaxes(y, -1, -2).reshape(x.shape)


def shuffle_order(channels: int, groups: int) -> np.ndarray:
  """`channel_shuffle(y, groups) == y[..., shuffle_order(channels, groups)]`."""
  return np.arange(channels).reshape(groups, channels // groups).T.reshape(-1)


def expand_mask(mask: jax.Array, out_channels: int) -> jax.Array:
  """LGC mask `(in, G)` -> per-output-channel mask `(in, out)`: column `o` is `mask[:, o % G]`."""
  groups = mask.shape[1]
  return jnp.tile(mask, (1, out_channels // groups))


def _channel_axes(x) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


def batch_stats(x, axis_name=None):
  """Per-channel batch mean and biased variance of `x` in float32, as `BatchNormReLU`
  computes them in training (averaged over `axis_name` if set).

  `x`: `[..., c]`; returns `(mean, var)`, each `[c]` float32."""
  return _batch_stats(x.astype(jnp.float32), axis_name)


def _batch_stats(x32, axis_name):
  """Per-channel mean and biased variance (two passes), averaged over `axis_name` if set."""
  axes = _channel_axes(x32)
  mean = x32.mean(axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.square(x32 - mean).mean(axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _bn_relu_train(x, scale, bias, stats, epsilon, axis_name, dtype):
  return _bn_relu_train_fwd(x, scale, bias, stats, epsilon, axis_name, dtype)[0]


def _bn_relu_train_fwd(x, scale, bias, stats, epsilon, axis_name, dtype):
  x32 = x.astype(jnp.float32)
  mean, var = _batch_stats(x32, axis_name) if stats is None else stats
  inv = jax.lax.rsqrt(var + epsilon)
  out = jax.nn.relu((x32 - mean) * (inv * scale) + bias).astype(dtype)
  return (out, mean, var), (x, out, scale, mean, inv, stats)


def _bn_relu_train_bwd(epsilon, axis_name, dtype, residuals, cotangents):
  """The whole BN + ReLU backward: one pass for the two channel sums, one for the input's
  gradient. Only the output's cotangent is used: the batch mean and variance are returned for
  the running averages, not for a loss. Statistics given by the caller (`stats`) must be the
  batch statistics of `x`: the gradient returned for `x` includes their dependence on `x`,
  and they get none of their own."""
  del epsilon, dtype
  x, out, scale, mean, inv, stats = residuals
  g = jnp.where(out > 0, cotangents[0].astype(jnp.float32), 0.0)
  x_hat = (x.astype(jnp.float32) - mean) * inv
  axes = _channel_axes(x)
  d_bias, d_scale = g.sum(axes), (g * x_hat).sum(axes)
  count = np.prod([x.shape[a] for a in axes])
  mean_g, mean_gx = d_bias / count, d_scale / count
  if axis_name is not None:  # the statistics were global: so are these means
    mean_g, mean_gx = jax.lax.pmean((mean_g, mean_gx), axis_name)
  d_x = (scale * inv) * (g - mean_g - x_hat * mean_gx)
  d_stats = jax.tree.map(jnp.zeros_like, stats)
  return d_x.astype(x.dtype), d_scale, d_bias, d_stats


_bn_relu_train.defvjp(_bn_relu_train_fwd, _bn_relu_train_bwd)


# The activations after a BN: CondenseNet uses ReLU; CondenseNetV2 hard-swish in its later
# blocks (x * relu6(x + 3) / 6, the official `HS`).
ACTIVATIONS = {'relu': jax.nn.relu, 'hard_swish': jax.nn.hard_swish}


def _check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f'activation={activation!r} is not one of {tuple(ACTIVATIONS)}.')


class BatchNormReLU(nn.Module):
  """ReLU(BatchNorm(x)) over the last axis, as PyTorch's BN (eps 1e-5, momentum 0.1) + ReLU;
  with `activation='hard_swish'`, hard-swish instead of ReLU (CondenseNetV2).

  The variables are Flax `nn.BatchNorm`'s (`params`: `scale`, `bias`; `batch_stats`: `mean`,
  `var`). As in PyTorch, the batch is normalized with its biased variance and the running
  variance is updated with the unbiased one (Flax's BN keeps the biased one there).
  Statistics and normalization run in float32, the output in `dtype`. In training the pair
  has one hand-written backward pass (custom VJP): it compiles to fewer kernels than autodiff
  of the two, and it keeps only the input and the output (which the convolution after it
  keeps anyway). With `axis_name` the batch statistics are averaged over that mapped axis
  (synchronized BN).

  Call: `x` `[..., c]` -> `[..., c]` in `dtype`. In training (`use_running_average=False`)
  the running `mean` and `var` are updated unless the module is initializing.

  In training, `stats=(mean, var)` may give the batch statistics of `x` (`batch_stats(x)`),
  computed once by a caller that feeds the same channels to several BNs (a dense block): they
  are used as they are, and the gradient for `x` still includes the statistics' dependence on
  it. Eval mode ignores them. The hand-written backward pass is ReLU's; with hard-swish the
  pair is differentiated by JAX and `stats` must be None (ValueError otherwise).
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x, stats=None):
    channels = x.shape[-1]
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    _check_activation(self.activation)
    if self.use_running_average:
      return self.normalize(x, self.multiplier(var.value, scale), mean.value, bias)
    if self.activation != 'relu':
      if stats is not None:
        raise ValueError(f'stats are taken with the ReLU backward pass only, not with '
                         f'activation={self.activation!r}.')
      batch_mean, batch_var = _batch_stats(x.astype(jnp.float32), self.axis_name)
      out = self.normalize(x, self.multiplier(batch_var, scale), batch_mean, bias)
    else:
      if stats is not None:
        stats = jax.tree.map(jax.lax.stop_gradient, stats)
      out, batch_mean, batch_var = _bn_relu_train(x, scale, bias, stats, self.epsilon,
                                                  self.axis_name, jnp.dtype(self.dtype))
    if not self.is_initializing():
      # The running variance is unbiased, as PyTorch's: the batch's n/(n-1) times its variance,
      # n being the values per channel the statistics were taken over.
      count = np.prod(x.shape[:-1]) * (1 if self.axis_name is None
                                       else jax.lax.psum(1, self.axis_name))
      mean.value = self.momentum * mean.value + (1 - self.momentum) * batch_mean
      var.value = self.momentum * var.value + (1 - self.momentum) * (
          batch_var * (count / jnp.maximum(count - 1, 1)))
    return out

  def multiplier(self, var, scale):
    """`rsqrt(var + epsilon) * scale`, per channel: the eval-mode scale of the normalization."""
    return jax.lax.rsqrt(var + self.epsilon) * scale

  def normalize(self, x, multiplier, mean, bias):
    """Normalization with the given statistics + the activation of `x`, whose channels are
    the ones the statistics describe (or a slice of them, with the matching slices)."""
    activation = ACTIVATIONS[self.activation]
    return activation((x.astype(jnp.float32) - mean) * multiplier + bias).astype(self.dtype)


def eval_norm_terms(norm: BatchNormReLU, channels: int, dtype: Any):
  """The eval-mode BN terms of `norm` over `channels` channels: `(multiplier, mean, bias)`,
  each `[channels]`, for `norm.normalize` on a slice or another layout of its input."""
  norm(jnp.zeros((1, channels), dtype))  # binds (or creates) the BN variables; result unused
  stats, params = norm.variables['batch_stats'], norm.variables['params']
  return norm.multiplier(stats['var'], params['scale']), stats['mean'], params['bias']


def normalize_channel_major(norm: BatchNormReLU, x: jax.Array, terms) -> jax.Array:
  """Eval-mode `norm` (BN + ReLU) of a channel-major `x` `[c, ...]` with `terms` `[c]`."""
  column = (-1,) + (1,) * (x.ndim - 1)
  return norm.normalize(x, *(t.reshape(column) for t in terms))


def check_channel_major(train: bool, what: str) -> None:
  """ValueError naming `what` when a channel-major layer is asked to train."""
  if train:
    raise ValueError(f"{what}: layout='channel_major' runs in eval mode only; training "
                     "computes in layout='channels_last'.")


def batch_norm_relu(train: bool, dtype: Any, axis_name: Optional[str],
                    name: str = 'norm', activation: str = 'relu') -> BatchNormReLU:
  """The BN + activation in front of a convolution: running statistics in eval mode, batch
  statistics (averaged over `axis_name`, if set) in training."""
  return BatchNormReLU(use_running_average=not train, dtype=dtype, axis_name=axis_name,
                       activation=activation, name=name)


class Conv(nn.Module):
  """BN -> ReLU (or `activation`) -> grouped convolution (the official `Conv`), no bias.

  Call: `x` `[n, h, w, in]` -> `[n, h', w', features]`; `in` and `features` must be divisible
  by `groups`. `stats`: optional batch statistics of `x` for the BN (see `BatchNormReLU`).
  `lowering`: see `grouped_conv`. With `layout='channel_major'` (eval mode, stride 1 only;
  `execution.Execution.condensed_blocks`) `x` is `[in, n, h, w]` and the result
  `[features, n, h', w']`, computed by `channel_major_conv`; ValueError in training.
  """
  features: int
  kernel_size: int
  groups: int = 1
  strides: int = 1
  padding: int = 0
  dtype: Any = jnp.float32
  lowering: str = 'grouped'
  layout: str = 'channels_last'
  bn_axis_name: Optional[str] = None
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x, train: bool = False, stats=None):
    channel_major = self.layout == 'channel_major'
    in_channels = x.shape[0 if channel_major else -1]
    norm = batch_norm_relu(train, self.dtype, self.bn_axis_name, activation=self.activation)
    k = self.kernel_size
    kernel = self.param('kernel', conv_init, (k, k, in_channels // self.groups, self.features),
                        jnp.float32)
    if channel_major:
      check_channel_major(train, 'Conv')
      if self.strides != 1:
        raise ValueError(f"Conv: layout='channel_major' computes stride-1 convolutions only; "
                         f"strides={self.strides} needs layout='channels_last'.")
      x = normalize_channel_major(norm, x, eval_norm_terms(norm, in_channels, x.dtype))
      return channel_major_conv(x, kernel.astype(self.dtype), self.groups, self.padding)
    x = norm(x, stats)
    p = self.padding
    return grouped_conv(x, kernel.astype(self.dtype), self.groups,
                        strides=(self.strides, self.strides), padding=((p, p), (p, p)),
                        lowering=self.lowering)


class LearnedGroupConv(nn.Module):
  """BN -> ReLU (or `activation`) -> (dropout) -> 1x1 convolution whose kernel is multiplied
  by a learned mask.

  Output channel `o` belongs to group `o % groups`; the mask (`'masks'` collection, shape
  `(in_channels, groups)`, float 0/1) says which inputs each group reads. The effective kernel
  is `kernel * mask[:, arange(out) % groups]`.

  Call: `x` `[n, h, w, in]` -> `[n, h, w, features]`; `stats` as in `BatchNormReLU`.
  """
  features: int
  groups: int
  condense_factor: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x, train: bool = False, stats=None):
    in_channels = x.shape[-1]
    x = batch_norm_relu(train, self.dtype, self.bn_axis_name, activation=self.activation)(
        x, stats)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    kernel = self.param('kernel', conv_init, (1, 1, in_channels, self.features), jnp.float32)
    mask = self.variable('masks', 'mask', jnp.ones, (in_channels, self.groups), jnp.float32)
    weight = kernel[0, 0] * expand_mask(mask.value, self.features)  # [in, out]
    return jnp.dot(x, weight.astype(self.dtype))


def expand_output_mask(mask: jax.Array, in_channels: int) -> jax.Array:
  """SFR mask `(out, G)` -> per-connection mask `(in, out)`: row `c` is `mask[:, c % G]`
  (input channel `c` belongs to group `c % G`)."""
  return expand_mask(mask, in_channels).T


class SparseFeatureReactivation(nn.Module):
  """CondenseNetV2's sparse feature reactivation (SFR): BN -> activation -> 1x1 convolution
  from a layer's new features back to its input width, whose kernel is multiplied by a
  learned mask over *outputs*; the dense layer adds the result to its input.

  It is the learned group convolution transposed: input channel `c` belongs to group `c % G`,
  and the mask (`'masks'` collection, shape `(features, G)`, float 0/1) says which outputs
  each group still writes. The effective kernel is `kernel * expand_output_mask(mask, in)`.
  Condensing (`condense.condense_event`) drops, per group, the still-written outputs with the
  smallest L1 norm over the group's input channels, `features // condense_factor` per event.

  Call: `new` `[n, h, w, in]` (the layer's new features), `x` `[n, h, w, features]` (its
  input) -> `x` with the reactivation added.
  """
  features: int
  groups: int
  condense_factor: int
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  activation: str = 'relu'

  @nn.compact
  def __call__(self, new, x, train: bool = False):
    in_channels = new.shape[-1]
    new = batch_norm_relu(train, self.dtype, self.bn_axis_name, activation=self.activation)(new)
    kernel = self.param('kernel', conv_init, (1, 1, in_channels, self.features), jnp.float32)
    mask = self.variable('masks', 'mask', jnp.ones, (self.features, self.groups), jnp.float32)
    weight = kernel[0, 0] * expand_output_mask(mask.value, in_channels)  # [in, out]
    return x + jnp.dot(new, weight.astype(self.dtype)).astype(x.dtype)


class CondensedSFR(nn.Module):
  """The inference form of an SFR (the official `CondensingSFR`, with a scatter instead of its
  dense output matrix): BN -> activation -> channel shuffle that puts each input group's
  channels `g, g+G, ...` together -> 1x1 group conv -> scatter-add of its outputs into the
  layer input at the kept output positions.

  `index` (`'indices'` collection) lists, for each grouped output (group after group, each
  group's kept outputs in increasing order), the position it is added to; two groups may
  write the same position. The kernel is grouped, `(1, 1, in / groups, kept)`, with
  `kept = features * groups / condense_factor`.

  Call: `new` `[n, h, w, in]`, `x` `[n, h, w, c]` (`c >= features`) -> `x` with the
  reactivation added to its first `features` channels.
  `lowering`: see `grouped_conv`. `placement` (`execution.Execution.sfr_placement`): 'scatter'
  adds the outputs with one scatter (`x.at[..., index].add(outputs)`); 'gather' reads, for
  each group, its output at every position it writes (a zero elsewhere) with one channel
  gather, for runtimes without a scatter-add (TFLite). The same function. With
  `layout='channel_major'` (eval mode only) `new` is `[in, n, h, w]`, `x` and the result
  `[c, n, h, w]`, the group convolution one batched matrix product, and the placement
  works on whole rows; ValueError in training.
  """
  features: int
  groups: int
  condense_factor: int
  dtype: Any = jnp.float32
  lowering: str = 'grouped'
  placement: str = 'scatter'
  layout: str = 'channels_last'
  bn_axis_name: Optional[str] = None
  activation: str = 'relu'

  @nn.compact
  def __call__(self, new, x, train: bool = False):
    channel_major = self.layout == 'channel_major'
    axis = 0 if channel_major else new.ndim - 1
    in_channels = new.shape[axis]
    kept = self.features * self.groups // self.condense_factor
    index = self.variable('indices', 'index', jnp.zeros, (kept,), jnp.int32)
    norm = batch_norm_relu(train, self.dtype, self.bn_axis_name, activation=self.activation)
    kernel = self.param('kernel', conv_init, (1, 1, in_channels // self.groups, kept),
                        jnp.float32).astype(self.dtype)
    if channel_major:
      check_channel_major(train, 'CondensedSFR')
      new = normalize_channel_major(norm, new, eval_norm_terms(norm, in_channels, new.dtype))
      # Group g reads channels g, g+G, ... (the channel shuffle) and writes its kept outputs.
      grouped = new.reshape(in_channels // self.groups, self.groups, -1).swapaxes(0, 1)
      weights = kernel[0, 0].reshape(-1, self.groups, kept // self.groups).transpose(1, 2, 0)
      y = jnp.einsum('goi,gip->gop', weights, grouped).reshape((kept,) + new.shape[1:])
    else:
      new = channel_shuffle(norm(new), in_channels // self.groups)  # group g: g, g+G, ...
      y = grouped_conv(new, kernel, self.groups, lowering=self.lowering)
    y = y.astype(x.dtype)
    if self.placement == 'scatter':
      return x.at[index.value].add(y) if channel_major else x.at[..., index.value].add(y)
    if self.placement != 'gather':
      raise ValueError(f"placement={self.placement!r} is not 'scatter' or 'gather'.")
    per_group = kept // self.groups
    positions = jnp.arange(self.features)
    zero = jnp.zeros_like(jax.lax.slice_in_dim(y, 0, 1, axis=axis))
    added = jax.lax.slice_in_dim(x, 0, self.features, axis=axis)
    for g in range(self.groups):
      # Where group g writes each position: its output j, or the zero appended after them.
      writes = index.value[g * per_group:(g + 1) * per_group][None, :] == positions[:, None]
      source = jnp.where(writes.any(axis=1), jnp.argmax(writes, axis=1), per_group)
      outputs = jax.lax.slice_in_dim(y, g * per_group, (g + 1) * per_group, axis=axis)
      added = added + jnp.take(jnp.concatenate([outputs, zero], axis=axis), source, axis=axis)
    if x.shape[axis] == self.features:
      return added
    return jax.lax.dynamic_update_slice_in_dim(x, added, 0, axis=axis)


class SELayer(nn.Module):
  """Squeeze-and-excitation (the official `SELayer`): channel weights from the spatial mean,
  through `c -> c // reduction -> c` bias-free linear maps with ReLU and a sigmoid between.

  Call: `x` `[n, h, w, c]` or `[n, c]` -> the same shape, each channel scaled. With
  `layout='channel_major'`, `x` is `[c, n, h, w]` and so is the result.
  """
  reduction: int = 16
  dtype: Any = jnp.float32
  layout: str = 'channels_last'

  @nn.compact
  def __call__(self, x):
    if self.layout == 'channel_major':  # [c, n, h, w]: the same function, transposed
      weights = self._weights(x.astype(jnp.float32).mean(axis=(2, 3)).T)  # [n, c]
      return (x * weights.T[:, :, None, None]).astype(self.dtype)
    c = x.shape[-1]
    weights = self._weights(x.astype(jnp.float32).mean(axis=tuple(range(1, x.ndim - 1))))
    return (x * weights.reshape(weights.shape[:1] + (1,) * (x.ndim - 2) + (c,))).astype(
        self.dtype)

  def _weights(self, pooled):
    """The channel weights `[n, c]` of the spatial means `pooled` `[n, c]`."""
    c = pooled.shape[-1]
    squeeze = self.param('squeeze', linear_init, (c, c // self.reduction), jnp.float32)
    excite = self.param('excite', linear_init, (c // self.reduction, c), jnp.float32)
    return jax.nn.sigmoid(jax.nn.relu(pooled @ squeeze) @ excite)


class CondensedConv(nn.Module):
  """The inference form of an LGC: gather -> BN -> ReLU (or `activation`) -> 1x1 group conv ->
  channel shuffle.

  `index` (`'indices'` collection) lists the kept input channels, group after group; the
  kernel is a grouped kernel `(1, 1, kept / groups, out)` whose output channels come out
  group-major and are shuffled back into the LGC's interleaved order. `form` says how it runs
  (`execution.Execution.condensed_conv`): 'gather_free' (eval mode only) or, after the
  gather, one of `execution.LOWERINGS`; every form computes the same function.

  Call: `x` `[n, h, w, in]` -> `[n, h, w, features]`, where `kept = in * groups /
  condense_factor`; `stats` is accepted for the signature of `LearnedGroupConv` and unused
  (the gathered channels get their own statistics). With `layout='channel_major'` (eval mode
  only; `execution.Execution.condensed_blocks`) `x` is `[in, n, h, w]`, the result
  `[features, n, h, w]`, and `form` is not used: the gather takes whole rows and the group
  convolution is one batched matrix product. Raises ValueError for an unknown `form`, and for
  'gather_free' or 'channel_major' in training.
  """
  features: int
  groups: int
  condense_factor: int
  dtype: Any = jnp.float32
  form: str = 'grouped'
  layout: str = 'channels_last'
  bn_axis_name: Optional[str] = None
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x, train: bool = False, stats=None):
    del stats  # gathered channels: the BN computes its own batch statistics
    channel_major = self.layout == 'channel_major'
    kept = x.shape[0 if channel_major else -1] * self.groups // self.condense_factor
    index = self.variable('indices', 'index', jnp.zeros, (kept,), jnp.int32)
    norm = batch_norm_relu(train, self.dtype, self.bn_axis_name, activation=self.activation)
    kernel = self.param('kernel', conv_init, (1, 1, kept // self.groups, self.features),
                        jnp.float32).astype(self.dtype)
    if channel_major:
      check_channel_major(train, 'CondensedConv')
      return self._channel_major(x, index.value, norm, kernel)
    if self.form == 'gather_free':
      if train:
        raise ValueError("form='gather_free' runs in eval mode only: in training every copy of "
                         'a gathered channel gets a gradient of its own.')
      return self._gather_free(x, index.value, norm, kernel)
    if self.form == 'per_group' and not train:
      return self._per_group(x, index.value, norm, kernel)
    x = norm(take_channels(x, index.value))  # [n, h, w, kept]
    if self.form == 'block_diagonal':
      return jnp.dot(x, self._shuffled_dense(kernel))
    y = grouped_conv(x, kernel, self.groups, lowering=self.form)
    return channel_shuffle(y, self.groups)

  def _shuffled_dense(self, kernel):
    """The grouped kernel as one dense `[kept, out]` matrix whose columns come out already
    shuffled (no pass over the output)."""
    return block_diagonal(kernel, self.groups)[0, 0][:, shuffle_order(self.features,
                                                                      self.groups)]

  def _channel_major(self, x, index, norm, kernel):
    """Eval mode on `[in, n, h, w]`: gather rows -> BN -> ReLU -> one batched product over
    the groups -> `[features, n, h, w]`, interleaved (the channel shuffle)."""
    kept = index.shape[0]
    h = normalize_channel_major(norm, jnp.take(x, index, axis=0),
                                eval_norm_terms(norm, kept, x.dtype))
    per_in, per_out = kept // self.groups, self.features // self.groups
    weights = kernel[0, 0].reshape(per_in, self.groups, per_out).transpose(1, 2, 0)
    y = jnp.einsum('goi,gip->gop', weights, h.reshape(self.groups, per_in, -1))
    return jnp.swapaxes(y, 0, 1).reshape((self.features,) + x.shape[1:])

  def _per_group(self, x, index, norm, kernel):
    """Eval mode, group by group: gather -> BN (running statistics) -> ReLU -> matmul; the
    outputs are interleaved at the end, which is the channel shuffle."""
    kept = index.shape[0]
    terms = eval_norm_terms(norm, kept, x.dtype)
    per_in, per_out = kept // self.groups, self.features // self.groups
    outputs = []
    for g in range(self.groups):
      s = slice(g * per_in, (g + 1) * per_in)
      h = norm.normalize(take_channels(x, index[s]), *(t[s] for t in terms))
      outputs.append(jnp.dot(h, kernel[0, 0, :, g * per_out:(g + 1) * per_out]))
    return jnp.stack(outputs, axis=-1).reshape(x.shape[:-1] + (self.features,))

  def _gather_free(self, x, index, norm, kernel):
    """Eval mode without the gather: BN -> ReLU over all input channels, then one matmul.

    The kept channels' BN terms and kernel rows go back to the input positions they were
    gathered from; channels no group reads get zero terms and zero rows. A channel that two
    groups read has its rows added (they fill different columns) and its BN terms written
    once, which is exact because both copies of them are the same: conversion copies them from
    the one BN of the training form (`condense.export`, the official converter), and
    `condense.check_gathered_norms` verifies it for models read from files.
    """
    channels = x.shape[-1]
    scatter = lambda v: jnp.zeros((channels,) + v.shape[1:], v.dtype).at[index]
    terms = eval_norm_terms(norm, index.shape[0], x.dtype)
    h = norm.normalize(x, *(scatter(t).set(t) for t in terms))
    dense = self._shuffled_dense(kernel)
    return jnp.dot(h, scatter(dense).add(dense))


class CondensedLinear(nn.Module):
  """Classifier of the condensed model: gather the kept features, then a smaller Linear.

  Call: `x` `[n, in]` -> `[n, features]`; `index` (`'indices'` collection) is `[kept]`.
  """
  features: int
  kept: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    index = self.variable('indices', 'index', jnp.zeros, (self.kept,), jnp.int32)
    kernel = self.param('kernel', linear_init, (self.kept, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x = take_channels(x, index.value)
    return jnp.dot(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
