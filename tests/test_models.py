"""Tests for condensenet_jax.models: structure, initialization, variants, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from condensenet_jax import checkpoint, condense, execution, layers, models
from condensenet_jax.execution import Execution
from conftest import randomize


def _shapes(model, image_size):
  return models.variable_shapes(model, image_size)


def _size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_condensenet86_structure():
  shapes = _shapes(models.CondenseNet86(), 32)
  assert set(shapes) == {'params', 'batch_stats', 'masks'}
  # The uncondensed CondenseNet-86 (dense 1x1 kernels) has 1,451,594 parameters.
  assert _size(shapes['params']) == 1_451_594
  masks = traverse_util.flatten_dict(shapes['masks'])
  assert len(masks) == 42
  first = shapes['masks']['denseblock_1']['denselayer_1']['conv_1']['mask']
  last = shapes['masks']['denseblock_3']['denselayer_14']['conv_1']['mask']
  assert first.shape == (16, 4) and last.shape == (16 + 14 * 8 + 14 * 16 + 13 * 32, 4)
  assert shapes['params']['classifier']['kernel'].shape == (800, 10)
  assert shapes['params']['denseblock_2']['denselayer_1']['conv_2']['kernel'].shape == (
      3, 3, 64 // 4, 16)


@pytest.mark.parametrize('variant,image_size,num_masks,features', [
    ('CondenseNet50', 32, 24, 16 + 8 * 56),
    ('CondenseNet182', 32, 90, 24 + 30 * 84),
    ('CondenseNet74_C4', 224, 36, 2064),
    ('CondenseNet74_C8', 224, 36, 2064),
])
def test_variants_build(variant, image_size, num_masks, features):
  model = getattr(models, variant)()
  shapes = _shapes(model, image_size)
  assert len(traverse_util.flatten_dict(shapes['masks'])) == num_masks
  assert model.num_features == features
  assert shapes['params']['classifier']['kernel'].shape == (features, model.num_classes)


def test_densenet_bc100_parameters():
  shapes = _shapes(models.DenseNetBC100(), 32)
  assert _size(shapes['params']) == 769_162  # REFERENCE.md: 0.769M
  assert 'masks' not in shapes
  # Transitions compress by 0.5: 24 + 16*12 = 216 -> 108; 108 + 192 = 300 -> 150.
  assert shapes['params']['transition_1']['conv']['kernel'].shape == (1, 1, 216, 108)
  assert shapes['params']['transition_2']['conv']['kernel'].shape == (1, 1, 300, 150)


@pytest.mark.slow
@pytest.mark.parametrize('how', ['flax_init', 'init_variables'])
def test_initialization_follows_official_code(how):
  model = models.CondenseNet(stages=(2, 2, 2), growth=(8, 16, 32))
  if how == 'flax_init':
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  else:
    variables = models.init_variables(model, seed=0)
    assert jax.tree.structure(variables) == jax.tree.structure(models.variable_shapes(model))
  params = traverse_util.flatten_dict(variables['params'])
  kernels = np.concatenate([np.asarray(v).reshape(-1) / np.sqrt(2.0 / (v.shape[0] * v.shape[1] *
                                                                        v.shape[3]))
                            for k, v in params.items() if k[-1] == 'kernel' and v.ndim == 4])
  np.testing.assert_allclose(kernels.std(), 1.0, atol=0.02)  # He-normal, fan = kh*kw*out
  for k, v in params.items():
    if k[-2:] == ('norm', 'scale') or k[-2:] == ('norm_last', 'scale'):
      np.testing.assert_array_equal(v, 1.0)
    if k[-1] == 'bias':
      np.testing.assert_array_equal(v, 0.0)
  classifier = np.asarray(variables['params']['classifier']['kernel'])
  assert np.abs(classifier).max() <= 1 / np.sqrt(classifier.shape[0])
  for mask in jax.tree.leaves(variables['masks']):
    np.testing.assert_array_equal(mask, 1.0)


@pytest.mark.slow
def test_apply_never_writes_masks_and_dropout_needs_rng():
  model = models.CondenseNetTiny(dropout_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = models.init_variables(model, seed=1)
  train = jax.jit(lambda v, x, rng: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                rngs={'dropout': rng}))
  logits, updates = train(variables, x, jax.random.PRNGKey(2))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert set(updates) == {'batch_stats'}
  other, _ = train(variables, x, jax.random.PRNGKey(3))
  assert not np.allclose(logits, other)  # dropout masks differ with the rng
  with pytest.raises(Exception, match='dropout'):
    model.apply(variables, x, train=True, mutable=['batch_stats'])


def test_lowerings_give_the_same_model():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  base = models.CondenseNetTiny(execution=Execution(conv_lowering='grouped'))
  variables = models.init_variables(base, seed=1)
  with jax.default_matmul_precision('highest'):
    expected = jax.jit(base.apply)(variables, x)
    for lowering in ('block_diagonal', 'per_group'):
      model = models.CondenseNetTiny(execution=Execution(conv_lowering=lowering))
      actual = jax.jit(model.apply)(variables, x)
      np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lowerings_give_the_same_condensed_model():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  model = models.CondenseNetTiny()
  variables = models.init_variables(model, seed=1)
  masks = condense.condense_all(variables['params'], variables['masks'], model)
  small, small_vars = condense.export(model, {**variables, 'masks': masks})
  with jax.default_matmul_precision('highest'):
    keep = lambda lowering: small.clone(execution=Execution(
        conv_lowering=lowering, condensed_gathers='keep'))
    expected = jax.jit(keep('grouped').apply)(small_vars, x)
    for lowering in ('auto', 'block_diagonal', 'per_group'):
      actual = jax.jit(keep(lowering).apply)(small_vars, x)
      np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('model', [models.CondenseNetTiny(), models.CondenseNetV2Tiny()],
                         ids=['v1', 'v2'])
@pytest.mark.slow
def test_gather_forms_give_the_same_condensed_model(model):
  """Every gather choice and layout of the condensed model computes the masked model (the V2
  SFRs' scatter and gather placements and the channel-major blocks included)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = randomize(models.init_variables(model, seed=2), seed=2)
  masks = condense.condense_all(variables['params'], variables['masks'], model)
  small, small_vars = condense.export(model, {**variables, 'masks': masks}, classifier_keep=1.0)
  with jax.default_matmul_precision('highest'):
    expected = jax.jit(model.apply)({**variables, 'masks': masks}, x)
    policies = [Execution(condensed_gathers=g) for g in ('auto',) + execution.CONDENSED_GATHERS]
    policies += [Execution(condensed_layout=layout) for layout in execution.LAYOUTS]
    for policy in policies:
      actual = jax.jit(small.clone(execution=policy).apply)(small_vars, x)
      np.testing.assert_allclose(actual, expected, rtol=1e-5,
                                 atol=1e-5 * np.abs(expected).max(), err_msg=str(policy))


@pytest.mark.parametrize('form', ['learned', pytest.param('condensed', marks=pytest.mark.slow),
                                  pytest.param('bfloat16', marks=pytest.mark.slow)])
def test_dense_block_forms_give_the_same_model(form):
  """Eval mode with the features written into one buffer is the concatenating model: bit for
  bit in float32 (training and condensed forms); in bfloat16 XLA may round a few values of
  the two programs one bfloat16 step apart."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  model = models.CondenseNetTiny(dtype=jnp.bfloat16 if form == 'bfloat16' else jnp.float32)
  variables = models.init_variables(model, seed=1)
  if form == 'condensed':
    masks = condense.condense_all(variables['params'], variables['masks'], model)
    model, variables = condense.export(model, {**variables, 'masks': masks})
  outputs = {}
  for dense_blocks in execution.DENSE_BLOCK_FORMS:
    clone = model.clone(execution=Execution(dense_block_form=dense_blocks))
    apply = jax.jit(lambda v, x, m=clone: m.apply(
        v, x, capture_intermediates=True, mutable=['intermediates']))
    logits, state = apply(variables, x)
    blocks = {name: value['__call__'][0] for name, value in state['intermediates'].items()
              if name.startswith('denseblock_')}
    outputs[dense_blocks] = logits, blocks
  (logits, blocks), (expected_logits, expected_blocks) = (outputs['preallocate'],
                                                          outputs['concatenate'])
  assert sorted(blocks) == ['denseblock_1', 'denseblock_2', 'denseblock_3']
  same = (np.testing.assert_array_equal if form != 'bfloat16' else
          functools.partial(np.testing.assert_allclose, rtol=2**-6, atol=2**-6))
  for name, value in blocks.items():
    assert value.shape == expected_blocks[name].shape
    same(np.asarray(value, np.float32), np.asarray(expected_blocks[name], np.float32))
  same(logits, expected_logits)
  assert np.abs(np.asarray(logits)).max() > 0


@pytest.mark.slow
def test_dense_block_forms_give_the_same_gradients():
  """Training with the preallocated buffer (not the default there) computes the same loss,
  gradients and batch statistics as with concatenation, to float32 rounding."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  model = models.CondenseNetTiny()
  variables = models.init_variables(model, seed=1)
  results = []
  for dense_blocks in execution.DENSE_BLOCK_FORMS:
    m = model.clone(execution=Execution(dense_block_form=dense_blocks))

    def loss(params, m=m):
      logits, updates = m.apply({**variables, 'params': params}, x, train=True,
                                mutable=['batch_stats'])
      return jnp.sum(jnp.square(logits)), updates
    results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params']))
  ((loss_a, stats_a), grads_a), ((loss_b, stats_b), grads_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((grads_a, stats_a)), jax.tree.leaves((grads_b, stats_b))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a)) > 0


def test_bfloat16_keeps_float32_params():
  model = models.CondenseNetTiny(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  shapes = models.variable_shapes(model)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
  variables = models.init_variables(model)
  low = jax.jit(model.apply)(variables, x)
  full = jax.jit(models.CondenseNetTiny().apply)(variables, x)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, full, rtol=0.1, atol=0.05)


def test_wrong_image_size_is_explained():
  model = models.CondenseNetTiny()
  with pytest.raises(ValueError, match='needs input images of 32 pixels'):
    _shapes(model, 28)
  with pytest.raises(ValueError, match='needs input images of 224 pixels'):
    _shapes(models.CondenseNet74_C4(), 256)


@pytest.mark.parametrize('fields,message', [
    (dict(growth=(6, 12, 24), group_1x1=2, group_3x3=2),
     'denselayer_2 input channels = 18 is not divisible by condense_factor = 4'),
    (dict(growth=(4, 6, 8), group_3x3=4), 'growth of denseblock_2 = 6 is not divisible by '
     'group_3x3 = 4'),
    (dict(stages=(2, 2)), 'equal length'),
    (dict(stem='mnist'), "stem='mnist' is unknown"),
])
def test_invalid_architecture_is_explained(fields, message):
  model = models.CondenseNetTiny(**fields)
  with pytest.raises(ValueError, match=message):
    _shapes(model, 32)


def test_condensed_net_from_model_keeps_fields():
  model = models.CondenseNet74_C8(num_classes=100)
  small = models.CondensedCondenseNet.from_model(model, classifier_keep=0.25)
  assert (small.stages, small.growth, small.group_1x1, small.condense_factor,
          small.num_classes, small.stem) == ((4, 6, 8, 10, 8), (8, 16, 32, 64, 128), 8, 8, 100,
                                             'imagenet')
  assert small.num_classifier_inputs == 2064 // 4
  shapes = _shapes(small, 224)
  assert set(shapes) == {'params', 'batch_stats', 'indices'}
  # Condensed LGC: in=16 -> keeps 16*8/8 = 16 inputs, 8 groups of 2, out = 4*8 = 32.
  conv_1 = shapes['params']['denseblock_1']['denselayer_1']['conv_1']
  assert conv_1['kernel'].shape == (1, 1, 2, 32)
  assert shapes['indices']['classifier']['index'].shape == (516,)


@pytest.mark.parametrize('model', [models.CondenseNetTiny(),
                                   models.DenseNet(stages=(2, 2), growth=(4, 4))],
                         ids=['condensenet', 'densenet'])
@pytest.mark.slow
def test_dense_blocks_compute_batch_statistics_once_per_channel(model):
  """In training a dense block hands each layer's first BN the batch statistics of its input,
  computed once per channel. Loss, gradients and running averages are those of BNs that
  compute their own statistics (an interceptor drops the given ones), to float32 rounding."""
  size = models.default_image_size(model)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, size, size, 3))
  variables = models.init_variables(model, seed=1)
  given, dropped = [], []

  def bn_calls(check):
    def intercept(next_fun, args, kwargs, context):
      is_call = context.method_name == '__call__'
      if isinstance(context.module, layers.BatchNormReLU) and is_call and len(args) == 2:
        inputs, stats = args
        if stats is None:
          return next_fun(*args, **kwargs)
        if check:  # the given statistics are those of the BN's input
          given.append(inputs.shape[-1])
          for a, b in zip(stats, layers.batch_stats(inputs)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
          return next_fun(*args, **kwargs)
        dropped.append(inputs.shape[-1])
        return next_fun(inputs, **kwargs)
      return next_fun(*args, **kwargs)
    return nn.intercept_methods(intercept)

  with bn_calls(check=True):
    model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert len(given) == sum(model.stages)  # every dense layer was handed statistics

  def loss(params):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
    return jnp.sum(jnp.square(logits)), updates
  grad = jax.value_and_grad(loss, has_aux=True)
  # Two jitted functions, so that the second one is traced under the interceptor.
  (loss_a, stats_a), grads_a = jax.jit(lambda p: grad(p))(variables['params'])
  with bn_calls(check=False):
    (loss_b, stats_b), grads_b = jax.jit(lambda p: grad(p))(variables['params'])
  assert dropped == given  # the second program was traced without the given statistics
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((grads_a, stats_a)), jax.tree.leaves((grads_b, stats_b))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a)) > 0


def test_architecture_is_the_one_definition_of_the_network(tmp_path):
  policy = Execution(conv_lowering='per_group')
  model = models.CondenseNetTiny(num_classes=7, execution=policy, dtype=jnp.bfloat16)
  # What checkpoints of earlier versions hold as their 'model_fields': they still resume.
  assert models.architecture(model) == {
      'stages': [2, 2, 2], 'growth': [4, 8, 8], 'bottleneck': 4, 'group_1x1': 4,
      'group_3x3': 4, 'condense_factor': 4, 'num_classes': 7, 'stem': 'cifar',
      'dropout_rate': 0.0}
  small = models.CondensedCondenseNet.from_model(model, classifier_keep=0.25)
  assert models.architecture(small) == {**models.architecture(model), 'classifier_keep': 0.25}
  assert (small.execution, small.dtype) == (policy, jnp.bfloat16)  # how it runs is kept
  assert models.describe(small).startswith(
      'CondensedCondenseNet(stages=[2, 2, 2], growth=[4, 8, 8], ')
  assert models.CondensedNet is models.CondensedCondenseNet  # the earlier name
  checkpoint.save_condensed(str(tmp_path), small, models.init_variables(small))
  loaded, _ = checkpoint.load_condensed(str(tmp_path))
  assert models.architecture(loaded) == models.architecture(small)
  assert models.architecture(models.DenseNetBC100())['reduction'] == 0.5
  # Sequences given as lists are the same architecture; nothing is written into the module.
  listed = models.CondenseNetTiny(stages=[2, 2, 2], num_classes=7)
  assert models.architecture(listed) == models.architecture(model)
  assert listed.stages == [2, 2, 2]


def test_images_of_another_size_are_refused_with_the_size_needed():
  with pytest.raises(ValueError, match='the feature map before the final 8x8 pooling is 7x7; '
                                       "stem='cifar' with 2 transitions needs input images of "
                                       '32 pixels a side'):
    models.variable_shapes(models.CondenseNetTiny(), image_size=28)
  assert models.image_size_for('imagenet', 5) == 224 == models.default_image_size(
      models.CondenseNet74_C4())
