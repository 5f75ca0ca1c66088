"""Tests for condensenet_jax.condense: schedule, group lasso, condensing events, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from condensenet_jax import checkpoint, condense, models, torch_import
from condensenet_jax.execution import Execution
from conftest import max_relative_error, official_stage, randomize


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _assert_trees_equal(actual, expected):
  actual, expected = _flat(actual), _flat(expected)
  assert actual.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(actual[k], expected[k], err_msg='/'.join(k))


# --- schedule -----------------------------------------------------------------------------

def test_event_steps_of_the_cifar_recipe():
  steps_per_epoch = 782  # 50000 / 64, rounded up
  total = 300 * steps_per_epoch
  assert condense.event_steps(total, 4) == [50 * steps_per_epoch, 100 * steps_per_epoch,
                                            150 * steps_per_epoch]
  for k, step in enumerate(condense.event_steps(total, 4), start=1):
    assert condense.stage_at(step, total, 4) == k
    assert condense.stage_at(step - 1, total, 4) == k - 1
  assert condense.stage_at(total - 1, total, 4) == 3


@pytest.mark.parametrize('total,condense_factor', [(97, 4), (300, 4), (1000, 8), (50, 2)])
def test_stage_at_agrees_with_the_official_rule(total, condense_factor):
  ours = [condense.stage_at(s, total, condense_factor) for s in range(total + 1)]
  official = [official_stage(s / total, condense_factor) for s in range(total + 1)]
  assert ours == official
  traced = jax.jit(lambda s: condense.stage_at(s, total, condense_factor))(jnp.arange(total + 1))
  np.testing.assert_array_equal(traced, ours)


def test_condensing_stages_are_keyed_to_the_condense_factor():
  assert [condense.is_condensing(s, 4) for s in range(4)] == [True, True, True, False]
  assert [condense.is_condensing(s, 2) for s in range(2)] == [True, False]


def test_the_model_schedule_takes_the_factor_and_the_guard_from_the_model():
  v1, v2 = models.CondenseNetTiny(), models.CondenseNetV2Tiny()
  total = 999  # odd and below 1000: V2's guard skips its last event
  assert condense.model_event_steps(v1, total) == condense.event_steps(total, 4)
  assert condense.model_event_steps(v1, total) == [167, 333, 500]
  assert condense.model_event_steps(v2, total) == [167, 333]
  assert [condense.model_stage_at(v2, s, total) for s in (166, 167, 499, 500, 998)] == \
      [0, 1, 2, 2, 2]
  assert [condense.model_stage_at(v1, s, total) for s in (499, 500)] == [2, 3]
  dense = models.DenseNetBC100()
  assert condense.model_event_steps(dense, total) == []
  assert condense.model_stage_at(dense, 500, total) == 0


def test_learned_layers_read_an_sfr_kernel_transposed():
  model = models.CondenseNetV2Tiny()
  variables = models.init_variables(model, seed=0)
  layers = list(condense.learned_layers(variables['params'], variables['masks']))
  assert len(layers) == 2 * sum(model.stages)  # an LGC and an SFR in every dense layer
  for path, kernel, mask in layers:
    stored = traverse_util.flatten_dict(variables['params'])[path + ('kernel',)][0, 0]
    np.testing.assert_array_equal(kernel, stored.T if condense.is_sfr(path) else stored)
    assert kernel.shape[0] == mask.shape[0]
  assert [(p, k) for p, k, _ in condense.learned_layers(None, variables['masks'])] == \
      [(p, None) for p, _, _ in layers]
  with pytest.raises(ValueError, match='params have no'):
    list(condense.learned_layers({}, variables['masks']))


# --- parity with the official code --------------------------------------------------------

def test_condense_event_drops_the_official_channels(any_fixture):
  # CondenseNetV2's fixtures: the LGC inputs and the SFR outputs of each event.
  model, c = any_fixture.model, any_fixture.condense_factor
  states = [torch_import.load_state_dict(model, any_fixture.state_dict(f'state{k}'))
            for k in range(c)]
  event = jax.jit(lambda p, m: condense.condense_event(p, m, model))
  for k in range(1, c):
    # Event k is decided on the weights of state k applied to the masks of state k-1.
    _assert_trees_equal(event(states[k]['params'], states[k - 1]['masks']), states[k]['masks'])
    # Eager (concrete) evaluation gives the same masks.
    _assert_trees_equal(condense.condense_event(states[k]['params'], states[k - 1]['masks'],
                                                model), states[k]['masks'])


def test_group_lasso_equals_the_official_sum(fixture):
  model, c, g = fixture.model, fixture.condense_factor, fixture.model.group_1x1
  lasso = jax.jit(lambda p, m: condense.group_lasso(p, m, model))
  checked = 0
  for event in fixture.config['events']:
    k = event['k']
    variables = torch_import.load_state_dict(model, fixture.state_dict(f'state{k}'))
    official = event['group_lasso']
    if k < min(g, c) - 1:  # the official rule (keyed to G) and the paper (C) agree
      value = float(lasso(variables['params'], variables['masks']))
      assert abs(value - official) <= 1e-5 * official, (k, value, official)
      checked += 1
    elif k >= c - 1:  # optimization stage: both give no penalty
      assert official == 0.0 and not condense.is_condensing(k, c)
  assert checked >= 1


def test_export_equals_the_official_converted_model(fixture):
  model, c = fixture.model, fixture.condense_factor
  variables = torch_import.load_state_dict(model, fixture.state_dict(f'state{c - 1}'))
  small, small_vars = condense.export(model, variables)
  converted = fixture.state_dict('converted')
  checked = 0
  for key, index in _flat(small_vars['indices']).items():
    path = '.'.join(key[:-1])
    official = 'classifier' if path == 'classifier' else f'features.{path}'
    np.testing.assert_array_equal(index, converted[f'{official}.index'], err_msg=path)
    checked += 1
    if path == 'classifier':
      kernel = small_vars['params']['classifier']['kernel']
      np.testing.assert_array_equal(np.asarray(kernel).T, converted['classifier.linear.weight'])
    else:
      kernel = _flat(small_vars['params'])[key[:-1] + ('kernel',)]
      np.testing.assert_array_equal(kernel.transpose(3, 2, 0, 1),
                                    converted[f'{official}.conv.weight'], err_msg=path)
      for leaf, name in (('scale', 'weight'), ('bias', 'bias')):
        np.testing.assert_array_equal(_flat(small_vars['params'])[key[:-1] + ('norm', leaf)],
                                      converted[f'{official}.norm.{name}'])
  assert checked == len(traverse_util.flatten_dict(variables['masks'])) + 1
  logits = jax.jit(small.apply)(small_vars, fixture.x)
  assert max_relative_error(logits, fixture.arrays['converted_logits']) < 1e-4


# --- hand-built cases ---------------------------------------------------------------------

def _one_layer(kernel, mask):
  params = {'block': {'conv_1': {'kernel': jnp.asarray(kernel, jnp.float32)[None, None]}}}
  masks = {'block': {'conv_1': {'mask': jnp.asarray(mask, jnp.float32)}}}
  return params, masks


class _C:
  def __init__(self, condense_factor):
    self.condense_factor = condense_factor


def test_condense_event_scores_by_group_and_breaks_ties_by_index():
  # in=8, out=4, G=2 (output channels 0, 2 -> group 0; 1, 3 -> group 1), C=4: drop 2 per event.
  kernel = np.ones((8, 4))
  kernel[5, [0, 2]] = 0.1   # group 0 likes input 5 least ...
  kernel[6, [0, 2]] = -0.2  # ... then input 6 (|w| counts)
  kernel[3, 1] = 0.0        # group 1: input 3 scores 1 (the others 2)
  params, masks = _one_layer(kernel, np.ones((8, 2)))
  model = _C(4)
  first = condense.condense_event(params, masks, model)['block']['conv_1']['mask']
  expected = np.ones((8, 2))
  expected[[5, 6], 0] = 0
  expected[[3, 0], 1] = 0  # input 3, then the tie among the rest goes to the lowest index, 0
  np.testing.assert_array_equal(first, expected)
  # Second event: pruned inputs are never picked again; ties again by index.
  second = condense.condense_event(params, {'block': {'conv_1': {'mask': first}}}, model)
  expected[[0, 1], 0] = 0
  expected[[1, 2], 1] = 0
  np.testing.assert_array_equal(second['block']['conv_1']['mask'], expected)


def test_condense_event_ignores_weights_already_masked():
  # A pruned input with a huge weight must not shield an alive one.
  kernel = np.ones((4, 2))
  kernel[0] = 100.0
  mask = np.array([[0.0], [1.0], [1.0], [1.0]])
  kernel[2] = 0.5
  params, masks = _one_layer(kernel, mask)
  out = condense.condense_event(params, masks, _C(4))['block']['conv_1']['mask']
  np.testing.assert_array_equal(out[:, 0], [0, 1, 0, 1])


def test_condense_event_refuses_a_fully_condensed_layer():
  params, masks = _one_layer(np.ones((8, 4)), np.ones((8, 2)))
  model = _C(4)
  masks = condense.condense_all(params, masks, model)  # the 3 events in a row
  assert condense.events_done_per_layer(masks, model) == {'block/conv_1': 3}
  with pytest.raises(ValueError, match=r'block/conv_1 has already had all 3 condensing events'):
    condense.condense_event(params, masks, model)


def test_condense_event_compiles_once_for_all_events():
  model = models.CondenseNetTiny()
  variables = randomize(models.init_variables(model), seed=0)
  traces = []

  @jax.jit
  def event(params, masks):
    traces.append(1)
    return condense.condense_event(params, masks, model)

  masks = variables['masks']
  for _ in range(model.condense_factor - 1):
    masks = event(variables['params'], masks)
  assert len(traces) == 1
  # Under jit a further event leaves the fully condensed masks unchanged.
  _assert_trees_equal(event(variables['params'], masks), masks)
  assert len(traces) == 1
  assert set(condense.events_done_per_layer(masks, model).values()) == {3}


# --- properties over random weights and configurations ------------------------------------

@pytest.mark.parametrize('fields,seed', [
    (dict(growth=(4, 8, 8), group_1x1=4, group_3x3=4, condense_factor=4), 0),
    pytest.param(dict(growth=(4, 8, 8), group_1x1=2, group_3x3=2, condense_factor=4), 1,
                 marks=pytest.mark.slow),
    pytest.param(dict(growth=(8, 8, 8), group_1x1=8, group_3x3=8, condense_factor=8), 2,
                 marks=pytest.mark.slow),
    pytest.param(dict(growth=(4, 8, 8), group_1x1=4, group_3x3=2, condense_factor=2), 3,
                 marks=pytest.mark.slow),
])
def test_condensing_then_export_preserves_the_function(fields, seed):
  model = models.CondenseNet(stages=(2, 2, 2), num_classes=7, **fields)
  variables = randomize(models.init_variables(model, seed=seed), seed=seed)
  rng = np.random.default_rng(seed)
  event = jax.jit(lambda p, m: condense.condense_event(p, m, model))
  masks = variables['masks']
  for _ in range(model.condense_factor - 1):
    # A stand-in for training between events: rescale every weight at random.
    params = jax.tree.map(lambda w: w * rng.uniform(0.2, 2.0, w.shape).astype(w.dtype),
                          variables['params'])
    new = event(params, masks)
    for old_mask, new_mask in zip(jax.tree.leaves(masks), jax.tree.leaves(new), strict=True):
      assert np.all(np.asarray(new_mask) <= np.asarray(old_mask))  # masks only shrink
    masks = new
    variables = {**variables, 'params': params, 'masks': masks}
  for mask in jax.tree.leaves(masks):
    in_channels = mask.shape[0]
    np.testing.assert_array_equal(np.asarray(mask).sum(0), in_channels // model.condense_factor)
  x = jax.random.normal(jax.random.PRNGKey(seed), (3, 32, 32, 3))
  small, small_vars = condense.export(model, variables, classifier_keep=1.0)
  with jax.default_matmul_precision('highest'):
    expected = jax.jit(model.apply)(variables, x)
    actual = jax.jit(small.apply)(small_vars, x)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_export_refuses_a_model_that_is_not_fully_condensed():
  model = models.CondenseNetTiny()
  variables = models.init_variables(model)
  masks = condense.condense_event(variables['params'], variables['masks'], model)
  with pytest.raises(ValueError, match=r'denseblock_1/denselayer_1/conv_1 has had 1 of the 3 '
                                       r'condensing events'):
    condense.export(model, {**variables, 'masks': masks})


def test_export_keeps_the_classifier_inputs_with_the_largest_l1_norm():
  model = models.CondenseNetTiny()
  variables = randomize(models.init_variables(model), seed=4)
  masks = variables['masks']
  for _ in range(3):
    masks = condense.condense_event(variables['params'], masks, model)
  variables = {**variables, 'masks': masks}
  kernel = np.asarray(variables['params']['classifier']['kernel'])  # [48, 10]
  for keep, count in ((0.5, 24), (0.25, 12), (1.0, 48)):
    small, small_vars = condense.export(model, variables, classifier_keep=keep)
    index = np.asarray(small_vars['indices']['classifier']['index'])
    norms = np.abs(kernel).sum(1)
    assert small.num_classifier_inputs == count and len(index) == count
    assert set(index) == set(np.argsort(-norms)[:count])
    assert np.all(np.diff(norms[index]) >= 0)  # official order: increasing norm
    np.testing.assert_array_equal(small_vars['params']['classifier']['kernel'], kernel[index])
  with pytest.raises(ValueError, match='classifier_keep=0'):
    condense.export(model, variables, classifier_keep=0)


def test_gathered_norm_copies_are_checked_where_models_are_read(tmp_path):
  model = models.CondenseNetTiny()
  variables = randomize(models.init_variables(model), seed=5)
  masks = condense.condense_all(variables['params'], variables['masks'], model)
  small, small_vars = condense.export(model, {**variables, 'masks': masks})
  condense.check_gathered_norms(small, small_vars)  # conversion copies the BN: no error
  # Make the two copies of a channel that two groups read differ.
  layer = next(path for path, index in _flat(small_vars['indices']).items()
               if path[0] != 'classifier' and len(set(index)) < len(index))[:-1]
  index = _flat(small_vars['indices'])[layer + ('index',)]
  channel = next(c for c in index if list(index).count(c) > 1)
  second_copy = np.flatnonzero(index == channel)[1]
  flat = traverse_util.flatten_dict(jax.tree.map(np.array, small_vars))
  flat[('params',) + layer + ('norm', 'bias')][second_copy] += 1.0
  tampered = traverse_util.unflatten_dict(flat)
  message = (f"{'/'.join(layer)} reads input channel {channel} in two groups with different "
             "BN bias values")
  with pytest.raises(ValueError, match=message):
    condense.check_gathered_norms(small, tampered)
  keep = Execution(condensed_gathers='keep')
  condense.check_gathered_norms(small.clone(execution=keep), tampered)
  checkpoint.save_condensed(str(tmp_path), small, tampered)
  with pytest.raises(ValueError, match=r"load it with execution=Execution\(condensed_gathers="):
    checkpoint.load_condensed(str(tmp_path))
  loaded, _ = checkpoint.load_condensed(str(tmp_path), execution=keep)
  assert loaded.execution == keep
