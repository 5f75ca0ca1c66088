"""Tests for condensenet_jax.flops: the official FLOPs/params table, and the fixtures."""

import jax
import numpy as np
import pytest

from condensenet_jax import flops, models

# REFERENCE.md: (training-form FLOPs, params, converted FLOPs, converted params), in millions,
# as the official counter prints them (%.2fM FLOPs, %.3fM params); CIFAR rows with 10 classes.
TABLE = [
    ('CondenseNet50', 32, 28.64, 0.217, 28.64, 0.214),
    ('CondenseNet74', 32, 51.90, 0.405, 51.89, 0.402),
    ('CondenseNet86', 32, 65.82, 0.520, 65.81, 0.516),
    ('CondenseNet98', 32, 81.26, 0.648, 81.26, 0.644),
    ('CondenseNet110', 32, 98.24, 0.790, 98.23, 0.785),
    ('CondenseNet122', 32, 116.74, 0.945, 116.74, 0.940),
    ('CondenseNet182', 32, 512.67, 4.222, 512.66, 4.209),
    ('CondenseNet74_C4', 224, 530.36, 5.806, 529.33, 4.774),
    ('CondenseNet74_C8', 224, 275.27, 3.967, 274.23, 2.935),
]


@pytest.mark.parametrize('variant,image_size,train_flops,train_params,flops_c,params_c', TABLE)
def test_reference_table(variant, image_size, train_flops, train_params, flops_c, params_c):
  model = getattr(models, variant)()
  f, p = flops.count(model, image_size)
  assert (round(f / 1e6, 2), round(p / 1e6, 3)) == (train_flops, train_params)
  f, p = flops.count(models.CondensedCondenseNet.from_model(model), image_size)
  assert (round(f / 1e6, 2), round(p / 1e6, 3)) == (flops_c, params_c)


def test_densenet_bc100():
  f, p = flops.count(models.DenseNetBC100(), 32)
  assert (round(f / 1e6, 2), round(p / 1e6, 3)) == (292.38, 0.769)


def test_fixture_counts_exactly(fixture):
  c = fixture.config
  size = c['image_size']
  assert flops.count(fixture.model, size) == (c['flops_training_model'],
                                              c['params_training_model'])
  small = models.CondensedCondenseNet.from_model(fixture.model)
  assert flops.count(small, size) == (c['flops_converted'], c['params_converted'])


def test_condensenet86_exact_counts():
  # Hand check of the classifier term: 800 features -> 10 classes, halved by the export.
  model = models.CondenseNet86()
  small = models.CondensedCondenseNet.from_model(model)
  (f, p), (fc, pc) = flops.count(model, 32), flops.count(small, 32)
  assert f - fc == p - pc == 800 * 10 // 2


def test_params_match_the_trainable_variables_of_the_condensed_model():
  # The converted model's parameter count is exactly its trainable variables.
  for variant, size in (('CondenseNet86', 32), ('CondenseNet74_C8', 224)):
    small = models.CondensedCondenseNet.from_model(getattr(models, variant)())
    shapes = models.variable_shapes(small, size)
    total = sum(x.size for x in jax.tree.leaves(shapes['params']))
    assert flops.count(small, size)[1] == total


def test_unknown_model_type():
  with pytest.raises(TypeError, match='CondenseNet, CondensedCondenseNet, CondenseNetV2 and DenseNet'):
    flops.count(object(), 32)


def _multiply_adds_from_kernels(model, image_size):
  """Multiply-adds as every kernel of `model`'s parameters applied at its layer's map size:
  kernel entries x output pixels (a grouped kernel holds in/G inputs per output)."""
  stride, _ = models.stem_geometry(model.stem)
  total = 0
  params = models.variable_shapes(model)['params']
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [p.key for p in path]
    if names[-1] != 'kernel':
      continue
    if names[0] == 'classifier':
      side = 1
    elif names[0] == 'init_conv':
      side = image_size // stride
    else:  # denseblock_k: the stem's map, halved by each transition before it
      side = image_size // stride // 2 ** (int(names[0].split('_')[1]) - 1)
    total += int(np.prod(leaf.shape)) * side * side
  return total


@pytest.mark.parametrize('variant,image_size,masked,condensed', [
    ('CondenseNetTiny', 32, None, None),
    ('CondenseNet86', 32, 173_858_624, 62_377_888),
    ('CondenseNet74_C4', 224, None, None),
])
def test_multiply_adds_are_what_each_form_runs(variant, image_size, masked, condensed):
  model = getattr(models, variant)()
  small = models.CondensedCondenseNet.from_model(model)
  assert flops.multiply_adds(model, image_size) == _multiply_adds_from_kernels(model, image_size)
  assert flops.multiply_adds(small, image_size) == _multiply_adds_from_kernels(small, image_size)
  if masked is not None:  # the figures the run header and README quote
    assert (flops.multiply_adds(model, image_size), flops.multiply_adds(small, image_size)) == (
        masked, condensed)
