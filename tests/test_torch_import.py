"""Tests for condensenet_jax.torch_import: official state dicts -> Flax variables."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from condensenet_jax import condense, models, torch_import
from conftest import max_relative_error

LGC = 'features.denseblock_1.denselayer_2.conv_1'


def test_imported_states_give_the_official_logits(fixture):
  apply = jax.jit(fixture.model.apply)
  for k in range(fixture.condense_factor):
    variables = torch_import.load_state_dict(fixture.model, fixture.state_dict(f'state{k}'))
    assert set(variables) == {'params', 'batch_stats', 'masks'}
    logits = apply(variables, fixture.x)
    assert max_relative_error(logits, fixture.arrays[f'logits{k}']) < 1e-4, k


def test_converted_state_gives_the_official_logits(fixture):
  small = models.CondensedCondenseNet.from_model(fixture.model)
  variables = torch_import.load_converted_state_dict(small, fixture.state_dict('converted'))
  assert set(variables) == {'params', 'batch_stats', 'indices'}
  logits = jax.jit(small.apply)(variables, fixture.x)
  assert max_relative_error(logits, fixture.arrays['converted_logits']) < 1e-4


def test_masks_are_read_group_by_group(fixture_by_name):
  fx = fixture_by_name('tiny_cifar_g4')
  state = fx.state_dict('state3')
  variables = torch_import.load_state_dict(fx.model, state)
  mask = np.asarray(variables['masks']['denseblock_1']['denselayer_2']['conv_1']['mask'])
  official = state[f'{LGC}._mask'][:, :, 0, 0]  # [out, in]
  for o in range(official.shape[0]):
    np.testing.assert_array_equal(mask[:, o % 4], official[o])
  assert condense.events_done_per_layer(variables['masks'], fx.model)[
      'denseblock_1/denselayer_2/conv_1'] == 3


def test_dataparallel_prefix_is_accepted(fixture_by_name):
  fx = fixture_by_name('tiny_cifar_g4')
  state = {f'module.{k}': v for k, v in fx.state_dict('state0').items()}
  variables = torch_import.load_state_dict(fx.model, state)
  logits = jax.jit(fx.model.apply)(variables, fx.x)
  assert max_relative_error(logits, fx.arrays['logits0']) < 1e-4


def test_bookkeeping_keys_are_optional(fixture_by_name):
  fx = fixture_by_name('tiny_cifar_g4')
  state = {k: v for k, v in fx.state_dict('state2').items()
           if k.rsplit('.', 1)[-1] not in torch_import.BOOKKEEPING}
  variables = torch_import.load_state_dict(fx.model, state)
  assert set(condense.events_done_per_layer(variables['masks'], fx.model).values()) == {2}


@pytest.mark.parametrize('edit,message', [
    (lambda s: s.pop('features.norm_last.running_var'),
     r'missing key features\.norm_last\.running_var \(expected shape \(48,\)\)'),
    (lambda s: s.update({'features.extra.weight': np.zeros((3, 3))}),
     r'unexpected key features\.extra\.weight \(shape \(3, 3\)\)'),
    (lambda s: s.update({'classifier.weight': np.zeros((10, 40), np.float32)}),
     r'classifier\.weight: expected shape \(10, 48\), found \(10, 40\)'),
    (lambda s: s.update({f'{LGC}.conv.weight': np.zeros((16, 12, 3, 3), np.float32)}),
     r'denselayer_2\.conv_1\.conv\.weight: expected shape \(16, 12, 1, 1\), found '
     r'\(16, 12, 3, 3\)'),
])
def test_state_dict_problems_are_named(fixture_by_name, edit, message):
  fx = fixture_by_name('tiny_cifar_g4')
  state = fx.state_dict('state0')
  edit(state)
  with pytest.raises(torch_import.StateDictError, match=message):
    torch_import.load_state_dict(fx.model, state)


def test_wrong_model_fields_are_reported_with_every_problem(fixture_by_name):
  fx = fixture_by_name('tiny_cifar_g4')
  model = models.CondenseNetTiny(num_classes=100)
  with pytest.raises(torch_import.StateDictError, match=r'num_classes=100') as info:
    torch_import.load_state_dict(model, fx.state_dict('state0'))
  assert 'classifier.weight: expected shape (100, 48), found (10, 48)' in str(info.value)
  assert 'classifier.bias: expected shape (100,), found (10,)' in str(info.value)


def test_mask_without_group_structure_is_rejected(fixture_by_name):
  fx = fixture_by_name('tiny_cifar_g4')
  state = fx.state_dict('state1')
  mask = state[f'{LGC}._mask'].copy()
  mask[5, :, 0, 0] = 1 - mask[5, :, 0, 0]  # row 5 (group 1) no longer equals row 1
  state[f'{LGC}._mask'] = mask
  with pytest.raises(torch_import.StateDictError,
                     match=r'_mask: mask is not group-structured: row 5 \(group 1 of 4\)'):
    torch_import.load_state_dict(fx.model, state)


@pytest.mark.parametrize('key,value,message', [
    ('_count', 6.0, r'_count = 6 but the mask has dropped 3 inputs per group'),
    ('_stage', 2.0, r'_stage = 2 but the mask shows 1 condensing events'),
])
def test_count_and_stage_must_agree_with_the_mask(fixture_by_name, key, value, message):
  fx = fixture_by_name('tiny_cifar_g4')
  state = fx.state_dict('state1')
  state[f'{LGC}.{key}'] = np.array([value], np.float32)
  with pytest.raises(torch_import.StateDictError, match=message):
    torch_import.load_state_dict(fx.model, state)


def test_converted_index_out_of_range_is_rejected(fixture_by_name):
  fx = fixture_by_name('tiny_cifar_g4')
  small = models.CondensedCondenseNet.from_model(fx.model)
  state = fx.state_dict('converted')
  state['classifier.index'] = state['classifier.index'] + 40
  with pytest.raises(torch_import.StateDictError, match=r'classifier\.index: indices must lie '
                                                         r'in \[0, 48\)'):
    torch_import.load_converted_state_dict(small, state)


def test_forms_cannot_be_mixed(fixture_by_name):
  fx = fixture_by_name('tiny_cifar_g4')
  small = models.CondensedCondenseNet.from_model(fx.model)
  with pytest.raises(TypeError, match='load_converted_state_dict'):
    torch_import.load_state_dict(small, fx.state_dict('converted'))
  with pytest.raises(TypeError, match='takes a CondensedCondenseNet'):
    torch_import.load_converted_state_dict(fx.model, fx.state_dict('state0'))
  with pytest.raises(torch_import.StateDictError, match='missing key'):
    torch_import.load_state_dict(fx.model, fx.state_dict('converted'))


def test_densenet_state_dict_round_trip():
  # DenseNet keys: transitions carry their own Conv (norm + 1x1 conv).
  model = models.DenseNet(stages=(2, 2, 2), growth=(4, 4, 4))
  variables = models.init_variables(model, seed=3)
  leaf_names = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}
  state = {}
  for (_, *path, leaf), value in traverse_util.flatten_dict(variables).items():
    value = np.asarray(value)
    if path == ['classifier']:
      state[f'classifier.{"weight" if leaf == "kernel" else "bias"}'] = (
          value.T if leaf == 'kernel' else value)
    elif leaf == 'kernel':
      conv = '' if path == ['init_conv'] else '.conv'
      state['features.' + '.'.join(path) + conv + '.weight'] = value.transpose(3, 2, 0, 1)
    else:
      state['features.' + '.'.join(path) + '.' + leaf_names[leaf]] = value
  # 8 + 2*4 = 16 channels, compressed to 8.
  assert state['features.transition_1.conv.conv.weight'].shape == (8, 16, 1, 1)
  assert 'features.transition_2.conv.norm.running_mean' in state
  loaded = torch_import.load_state_dict(model, state)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)


def test_load_pth_refuses_code_and_reads_weights(tmp_path):
  torch = pytest.importorskip(
      'torch', reason='needs PyTorch, which is not a dependency (pip install torch to run it)')
  state = {'features.init_conv.weight': torch.ones(8, 3, 3, 3)}
  path = tmp_path / 'ckpt.pth.tar'
  torch.save({'state_dict': state, 'epoch': 3}, path)
  loaded = torch_import.load_pth(str(path))
  np.testing.assert_array_equal(loaded['features.init_conv.weight'], np.ones((8, 3, 3, 3)))

  class Evil:
    def __reduce__(self):
      return (print, ('code ran',))
  evil = tmp_path / 'evil.pth'
  torch.save({'state_dict': Evil()}, evil)
  with pytest.raises(ValueError, match='refused or unreadable as a weights-only checkpoint'):
    torch_import.load_pth(str(evil))
