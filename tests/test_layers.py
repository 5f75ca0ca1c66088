"""Tests for condensenet_jax.layers: lowerings, channel shuffle, masks, LGC, BN + ReLU."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from condensenet_jax import execution, layers


def _reference_grouped_conv(x, kernel, groups, stride, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision='highest')


@pytest.mark.parametrize('lowering', execution.LOWERINGS)
@pytest.mark.parametrize('kernel_size,stride,pad,groups', [
    (1, 1, 0, 4), (3, 1, 1, 4), (3, 2, 1, 2), (1, 1, 0, 1), (3, 1, 1, 8)])
def test_grouped_conv_lowerings_agree(lowering, kernel_size, stride, pad, groups):
  kx, kk = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, 9, 9, 16))
  kernel = jax.random.normal(kk, (kernel_size, kernel_size, 16 // groups, 24))
  padding = ((pad, pad), (pad, pad))
  expected = _reference_grouped_conv(x, kernel, groups, stride, padding)
  with jax.default_matmul_precision('highest'):
    actual = layers.grouped_conv(x, kernel, groups, strides=(stride, stride), padding=padding,
                                 lowering=lowering)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel_size,pad,groups', [(1, 0, 4), (3, 1, 4), (3, 0, 2), (3, 1, 1)])
def test_channel_major_conv_is_the_grouped_conv_transposed(kernel_size, pad, groups):
  kx, kk = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, 9, 7, 16))
  kernel = jax.random.normal(kk, (kernel_size, kernel_size, 16 // groups, 24))
  expected = _reference_grouped_conv(x, kernel, groups, 1, ((pad, pad), (pad, pad)))
  with jax.default_matmul_precision('highest'):
    actual = layers.channel_major_conv(jnp.transpose(x, (3, 0, 1, 2)), kernel, groups, pad)
  np.testing.assert_allclose(jnp.transpose(actual, (1, 2, 3, 0)), expected, rtol=1e-5,
                             atol=1e-5)


def test_channel_major_layers_are_eval_only_and_stride_one():
  x = jnp.ones((8, 1, 4, 4))
  conv = layers.Conv(features=8, kernel_size=3, groups=2, padding=1, layout='channel_major')
  variables = conv.init(jax.random.PRNGKey(0), x)
  assert conv.apply(variables, x).shape == (8, 1, 4, 4)
  with pytest.raises(ValueError, match="layout='channel_major' runs in eval mode only"):
    conv.apply(variables, x, train=True, mutable=['batch_stats'])
  with pytest.raises(ValueError, match="strides=2 needs layout='channels_last'"):
    conv.clone(strides=2).apply(variables, x)


def test_block_diagonal_layout():
  kernel = jnp.arange(1 * 1 * 2 * 6, dtype=jnp.float32).reshape(1, 1, 2, 6) + 1
  dense = np.asarray(layers.block_diagonal(kernel, 3))[0, 0]  # [6, 6]
  for g in range(3):
    rows, cols = slice(2 * g, 2 * g + 2), slice(2 * g, 2 * g + 2)
    np.testing.assert_array_equal(dense[rows, cols], np.asarray(kernel)[0, 0][:, cols])
    off = np.ones(6, bool)
    off[cols] = False
    assert not dense[rows][:, off].any()


def test_grouped_conv_names_an_unknown_lowering():
  x, kernel = jnp.ones((1, 4, 4, 8)), jnp.ones((1, 1, 4, 8))
  with pytest.raises(ValueError, match=r"lowering='fast' is not one of \('grouped', "):
    layers.grouped_conv(x, kernel, 2, lowering='fast')


def test_channel_shuffle_is_group_major_to_interleaved():
  x = jnp.arange(12.0)[None, None, None, :]  # position p holds channel p
  y = np.asarray(layers.channel_shuffle(x, 3))[0, 0, 0]
  # Group-major position g*4 + k moves to k*3 + g.
  expected = np.empty(12)
  for g in range(3):
    for k in range(4):
      expected[k * 3 + g] = g * 4 + k
  np.testing.assert_array_equal(y, expected)
  np.testing.assert_array_equal(np.asarray(x)[..., layers.shuffle_order(12, 3)][0, 0, 0],
                                expected)


def test_condensed_conv_without_its_gather_is_the_same_function():
  # Channels 0-3 are read by two groups each, channels 12-15 by none.
  index = jnp.array([0, 1, 2, 3, 0, 4, 5, 6, 1, 7, 8, 9, 2, 3, 10, 11], jnp.int32)
  rng = np.random.default_rng(0)
  per_channel = lambda low, high: rng.uniform(low, high, 16).astype(np.float32)[index]
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 16))
  conv = layers.CondensedConv(features=8, groups=4, condense_factor=4)
  variables = conv.init(jax.random.PRNGKey(1), x)
  variables = {
      'params': {'kernel': variables['params']['kernel'],
                 'norm': {'scale': per_channel(0.5, 2), 'bias': per_channel(-1, 1)}},
      'batch_stats': {'norm': {'mean': per_channel(-1, 1), 'var': per_channel(0.5, 2)}},
      'indices': {'index': index}}
  with jax.default_matmul_precision('highest'):
    expected = conv.clone(form='grouped').apply(variables, x)
    for form in ('gather_free', 'block_diagonal', 'per_group'):
      actual = conv.clone(form=form).apply(variables, x)
      np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=form)
    channel_major = conv.clone(layout='channel_major').apply(
        variables, jnp.transpose(x, (3, 0, 1, 2)))
    np.testing.assert_allclose(jnp.transpose(channel_major, (1, 2, 3, 0)), expected, rtol=1e-5,
                               atol=1e-5)
  # Every form reads the same variables: the gather-free one is not a different model.
  assert jax.tree.structure(conv.clone(form='gather_free').init(jax.random.PRNGKey(1), x)) == (
      jax.tree.structure(conv.init(jax.random.PRNGKey(1), x)))
  with pytest.raises(ValueError, match="form='gather_free' runs in eval mode only"):
    conv.clone(form='gather_free').apply(variables, x, train=True, mutable=['batch_stats'])
  with pytest.raises(ValueError, match="CondensedConv: layout='channel_major' runs in eval"):
    conv.clone(layout='channel_major').apply(variables, jnp.transpose(x, (3, 0, 1, 2)),
                                             train=True, mutable=['batch_stats'])


def test_expand_mask_assigns_output_channel_o_to_group_o_mod_g():
  mask = jnp.array([[1., 0.], [0., 1.], [1., 1.]])  # [in=3, G=2]
  expanded = np.asarray(layers.expand_mask(mask, 6))
  for o in range(6):
    np.testing.assert_array_equal(expanded[:, o], np.asarray(mask)[:, o % 2])


def test_learned_group_conv_is_masked_dense_conv():
  lgc = layers.LearnedGroupConv(features=8, groups=4, condense_factor=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 12))
  variables = lgc.init(jax.random.PRNGKey(2), x)
  assert variables['masks']['mask'].shape == (12, 4)
  np.testing.assert_array_equal(variables['masks']['mask'], 1.0)
  mask = np.ones((12, 4), np.float32)
  mask[[0, 5, 7], 1] = 0
  mask[[2, 3, 11], 3] = 0
  variables = {**variables, 'masks': {'mask': jnp.asarray(mask)}}
  with jax.default_matmul_precision('highest'):
    y = lgc.apply(variables, x)
  kernel = np.asarray(variables['params']['kernel'])[0, 0]  # [12, 8]
  effective = kernel * mask[:, np.arange(8) % 4]
  h = np.maximum((np.asarray(x) - 0.0) / np.sqrt(1.0 + 1e-5), 0)  # fresh BN: mean 0, var 1
  np.testing.assert_allclose(y, h @ effective, rtol=1e-5, atol=1e-5)


def test_learned_group_conv_never_writes_masks():
  lgc = layers.LearnedGroupConv(features=8, groups=2, condense_factor=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 3, 6))
  variables = lgc.init(jax.random.PRNGKey(2), x)
  # 'masks' immutable: any write inside apply would raise.
  lgc.apply(variables, x, train=True, mutable=['batch_stats'])
  _, updates = lgc.apply(variables, x, train=True, mutable=True)
  np.testing.assert_array_equal(updates['masks']['mask'], variables['masks']['mask'])


def test_conv_init_is_he_normal_with_fan_out():
  kernel = layers.conv_init(jax.random.PRNGKey(0), (3, 3, 64, 128))
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2.0 / (9 * 128)), rtol=0.03)
  assert np.abs(kernel).max() > 3.5 * np.sqrt(2.0 / (9 * 128))  # untruncated normal


def test_linear_init_is_pytorch_uniform():
  kernel = np.asarray(layers.linear_init(jax.random.PRNGKey(0), (400, 10)))
  bound = 1 / np.sqrt(400)
  assert np.abs(kernel).max() <= bound
  assert np.abs(kernel).max() > 0.98 * bound


def _bn_inputs(dtype, shape=(8, 5, 5, 12)):
  kx, ks, kb, kw, km, kv = jax.random.split(jax.random.PRNGKey(3), 6)
  c = shape[-1]
  x = (jax.random.normal(kx, shape) * 2.0 + 0.5).astype(dtype)
  variables = {
      'params': {'scale': 1.0 + 0.3 * jax.random.normal(ks, (c,)),
                 'bias': 0.5 * jax.random.normal(kb, (c,))},
      'batch_stats': {'mean': 0.1 * jax.random.normal(km, (c,)),
                      'var': 1.0 + jax.random.uniform(kv, (c,))}}
  weight = jax.random.normal(kw, shape)  # the loss is sum(output * weight)
  return x, variables, weight


def _loss_and_grads(module, variables, x, weight, given_stats=False):
  """With `given_stats`, the module is handed the batch statistics of `x` (as a dense block
  does) instead of computing them."""
  def loss(params, x):
    args = (x, layers.batch_stats(x, module.axis_name)) if given_stats else (x,)
    y, updates = module.apply({**variables, 'params': params}, *args, mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) * weight), (y, updates['batch_stats'])
  (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables['params'], x)
  return y, stats, grads


@pytest.mark.parametrize('given_stats', [False, True])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_batch_norm_relu_equals_flax_batch_norm_then_relu(dtype, tol, given_stats):
  """Training mode (output, running averages, gradients of x, scale and bias) and eval mode
  against autodiff of Flax's BatchNorm followed by ReLU; also when the batch statistics are
  computed outside and given (the gradient of x must still go through them)."""
  x, variables, weight = _bn_inputs(dtype)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype,
                         use_fast_variance=False)
  reference = nn.Sequential([flax_bn, nn.relu])
  ours = layers.BatchNormReLU(use_running_average=False, dtype=dtype)
  wrap = lambda v: {k: {'layers_0': t} for k, t in v.items()}
  y_ref, stats_ref, (dp_ref, dx_ref) = _loss_and_grads(reference, wrap(variables), x, weight)
  y, stats, (dp, dx) = _loss_and_grads(ours, variables, x, weight, given_stats)
  assert y.dtype == dtype and dx.dtype == dtype
  assert float(jnp.mean(y > 0)) > 0.3  # the ReLU both passes and blocks
  close = lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
  close(y, y_ref)
  close(stats['mean'], stats_ref['layers_0']['mean'])
  # Flax's running variance takes the biased batch variance; ours the unbiased one, as
  # PyTorch's: n / (n - 1) times it, with n = 8 x 5 x 5 values per channel.
  var0, n = variables['batch_stats']['var'], x.size // x.shape[-1]
  batch_var = (stats_ref['layers_0']['var'] - 0.9 * var0) / 0.1
  close(stats['var'], 0.9 * var0 + 0.1 * batch_var * n / (n - 1))
  for name in ('scale', 'bias'):
    close(dp[name], dp_ref['layers_0'][name])
  close(dx, dx_ref)
  eval_ref = nn.Sequential([flax_bn.clone(use_running_average=True), nn.relu])
  close(layers.BatchNormReLU(use_running_average=True, dtype=dtype).apply(variables, x),
        eval_ref.apply(wrap(variables), x))


@pytest.mark.parametrize('given_stats', [False, True])
def test_batch_norm_relu_synchronized_statistics_equal_one_big_batch(given_stats):
  """With `axis_name`, 4 shards of a batch normalize and differentiate as the whole batch:
  each shard differentiates its part of the loss (as every device does in the train step),
  the parameter gradients add up to the whole batch's."""
  x, variables, weight = _bn_inputs(jnp.float32, (16, 3, 3, 8))
  whole = _loss_and_grads(layers.BatchNormReLU(use_running_average=False), variables, x, weight)
  synced = layers.BatchNormReLU(use_running_average=False, axis_name='shards')
  shard = lambda a: a.reshape((4, 4) + a.shape[1:])
  y, stats, (dp, dx) = jax.vmap(
      lambda x, w: _loss_and_grads(synced, variables, x, w, given_stats), axis_name='shards')(
          shard(x), shard(weight))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  close(y.reshape(x.shape), whole[0])
  for name in ('mean', 'var'):  # every shard holds the same, global, running averages
    close(stats[name], np.broadcast_to(whole[1][name], (4,) + whole[1][name].shape))
  for name in ('scale', 'bias'):
    close(dp[name].sum(axis=0), whole[2][0][name])
  close(dx.reshape(x.shape), whole[2][1])
