"""Consistency of the official parity fixtures in tests/fixtures (numpy only), and, given
PyTorch and a checkout of the official code, that make_fixtures.py reproduces them exactly.

The checks here read only the fixture files: they hold whatever the parity tests compare the
project against to a recorded, self-consistent run of the official code (group-structured
masks, C-th of the inputs dropped per event, the lowest-scoring ones, a converted model that
follows the last masks).
"""

import json
import pathlib

import numpy as np
import pytest

from conftest import (FIXTURE_NAMES, FIXTURES, assert_json_reproduced, assert_npz_reproduced,
                      official_stage, regenerate)

SCRIPT = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'make_fixtures.py'
LGC_ENTRIES = ('conv.weight', '_mask', '_count', '_stage')  # what an event may change


def _lgc_layers(state):
  """Prefixes of the LearnedGroupConvs of a training-form state dict, in key order."""
  return [k[:-len('._mask')] for k in state if k.endswith('._mask')]


def test_files_hold_every_entry(fixture):
  c, config, arrays = fixture.condense_factor, fixture.config, fixture.arrays
  size, batch = config['image_size'], config['batch']
  assert arrays['x_nchw'].shape == (batch, 3, size, size)
  assert arrays['x_nchw'].dtype == np.float32
  expected = ({'x_nchw', 'converted', 'converted_logits'} | {f'state{k}' for k in range(c)} |
              {f'logits{k}' for k in range(c)})
  assert {k.split('/')[0] for k in arrays} == expected
  for key in [f'logits{k}' for k in range(c)] + ['converted_logits']:
    assert arrays[key].shape == (batch, config['num_classes']), key
    assert np.isfinite(arrays[key]).all() and np.abs(arrays[key]).max() > 0, key
  first = fixture.state_dict('state0')
  for k in range(1, c):
    # state{k} stores only the entries of event k, all of them LearnedGroupConv entries.
    stored = fixture.stored(f'state{k}')
    assert stored and all(key.split('.conv_1.')[-1] in LGC_ENTRIES for key in stored), k
    state = fixture.state_dict(f'state{k}')
    assert list(state) == list(first), k
    for key, value in state.items():
      assert (value.shape, value.dtype) == (first[key].shape, first[key].dtype), (k, key)
  assert [e['k'] for e in config['events']] == list(range(c))
  assert [official_stage(e['progress'], c) for e in config['events']] == list(range(c))


def test_masks_are_group_structured_and_each_event_drops_a_cth(fixture):
  c, g = fixture.condense_factor, fixture.config['group_1x1']
  previous = None
  for k in range(c):
    state = fixture.state_dict(f'state{k}')
    for layer in _lgc_layers(state):
      mask = state[f'{layer}._mask']
      out, inputs = mask.shape[:2]
      assert mask.shape == state[f'{layer}.conv.weight'].shape == (out, inputs, 1, 1)
      mask = mask[:, :, 0, 0]
      assert np.isin(mask, (0.0, 1.0)).all(), layer
      for group in range(g):  # output channel o belongs to group o % G
        assert (mask[group::g] == mask[group]).all(), (k, layer, group)
      dropped = k * (inputs // c)
      assert ((mask[:g] == 0).sum(axis=1) == dropped).all(), (k, layer)
      assert state[f'{layer}._count'].tolist() == [dropped], (k, layer)
      assert state[f'{layer}._stage'].tolist() == [k], (k, layer)
      if previous is not None:  # dropped inputs stay dropped
        assert (mask <= previous[f'{layer}._mask'][:, :, 0, 0]).all(), (k, layer)
    previous = state


def test_each_event_drops_the_lowest_scoring_inputs(fixture):
  # Event k scores the inputs of group g by the sum of |w * mask| over the group's outputs,
  # with the weights of state k and the masks of state k-1.
  c, g = fixture.condense_factor, fixture.config['group_1x1']
  for k in range(1, c):
    before, after = fixture.state_dict(f'state{k - 1}'), fixture.state_dict(f'state{k}')
    for layer in _lgc_layers(after):
      old = before[f'{layer}._mask'][:, :, 0, 0]
      new = after[f'{layer}._mask'][:, :, 0, 0]
      weight = after[f'{layer}.conv.weight'][:, :, 0, 0].astype(np.float64)
      for group in range(g):
        score = np.abs(weight[group::g] * old[group::g]).sum(axis=0)
        dropped = (old[group] == 1) & (new[group] == 0)
        kept = new[group] == 1
        assert dropped.sum() == old.shape[1] // c, (k, layer, group)
        assert score[dropped].max() <= score[kept].min() * (1 + 1e-6), (k, layer, group)


def test_converted_model_follows_the_last_masks(fixture):
  c, g = fixture.condense_factor, fixture.config['group_1x1']
  last, converted = fixture.state_dict(f'state{c - 1}'), fixture.state_dict('converted')
  layers = _lgc_layers(last)
  for layer in layers:
    mask = last[f'{layer}._mask'][:g, :, 0, 0]
    groups = [np.flatnonzero(mask[group]) for group in range(g)]  # increasing order
    index = converted[f'{layer}.index']
    np.testing.assert_array_equal(index, np.concatenate(groups), err_msg=layer)
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
      np.testing.assert_array_equal(converted[f'{layer}.norm.{name}'],
                                    last[f'{layer}.norm.{name}'][index], err_msg=layer)
    # Grouped kernel, output rows group-major: row group * d_out + j is original row
    # group + j * G, reading the group's kept inputs.
    weight = last[f'{layer}.conv.weight'][:, :, 0, 0]
    d_out = weight.shape[0] // g
    expected = np.concatenate([weight[group::g][:, groups[group]] for group in range(g)])
    np.testing.assert_array_equal(converted[f'{layer}.conv.weight'][:, :, 0, 0], expected,
                                  err_msg=layer)
    assert expected.shape[0] == g * d_out
  # Classifier: the half of its inputs with the largest sums of |w|.
  weight, index = last['classifier.weight'], converted['classifier.index']
  score = np.abs(weight).sum(axis=0)
  assert len(index) == len(set(index.tolist())) == weight.shape[1] // 2
  assert score[index].min() >= np.delete(score, index).max()
  np.testing.assert_array_equal(converted['classifier.linear.weight'], weight[:, index])
  np.testing.assert_array_equal(converted['classifier.linear.bias'], last['classifier.bias'])
  # Everything else is carried over unchanged.
  rest = [k for k in last
          if not k.startswith(tuple(f'{layer}.' for layer in layers) + ('classifier.',))]
  assert rest and all(np.array_equal(converted[k], last[k]) for k in rest)
  # Per LGC: index, conv.weight and the five BN entries; the classifier: index, weight, bias.
  assert len(converted) == len(rest) + 7 * len(layers) + 3


@pytest.fixture(scope='module')
def regenerated(tmp_path_factory):
  """The folder where make_fixtures.py wrote every fixture afresh (one run for all)."""
  return regenerate(tmp_path_factory, SCRIPT, 'CONDENSENET_OFFICIAL_DIR', 'CondenseNet',
                    '--only', ','.join(FIXTURE_NAMES))


@pytest.mark.parametrize('name', FIXTURE_NAMES)
def test_make_fixtures_reproduces_the_files(name, regenerated):
  made_json, committed_json = regenerated / f'{name}.json', FIXTURES / f'{name}.json'
  assert json.loads(made_json.read_text()) == json.loads(committed_json.read_text())
  assert_json_reproduced(made_json, committed_json)
  assert_npz_reproduced(regenerated / f'{name}.npz', FIXTURES / f'{name}.npz')
