"""CondenseNetV2 against the official V2 code: logits of imported weights, masks after every
LGC and SFR condensing event, the group lasso (fixtures/make_v2_fixtures.py made the numbers)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FIXTURES, V2_FIXTURE_NAMES, max_relative_error
from test_fixtures import _npz_entries
from condensenet_jax import condense, flops, models, torch_import

SCRIPT = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'make_v2_fixtures.py'


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_imported_weights_give_the_official_logits_after_every_event(v2_fixture):
  model = v2_fixture.model
  apply = jax.jit(lambda v, x: model.apply(v, x))
  for k in range(v2_fixture.condense_factor):
    variables = torch_import.load_state_dict(model, v2_fixture.state_dict(f'state{k}'))
    logits = apply(variables, v2_fixture.x)
    error = max_relative_error(logits, v2_fixture.arrays[f'logits{k}'])
    assert error < 1e-5, (k, error)


def test_masks_hold_both_kinds_of_layer(v2_fixture):
  variables = torch_import.load_state_dict(v2_fixture.model, v2_fixture.state_dict('state1'))
  events = condense.events_done_per_layer(variables['masks'], v2_fixture.model)
  kinds = {name.rsplit('/', 1)[-1] for name in events}
  assert kinds == {'conv_1', 'sfr'} and set(events.values()) == {1}
  model, first = v2_fixture.model, next(iter(events))
  sfr = variables['masks']['denseblock_1']['denselayer_1']['sfr']['mask']
  assert sfr.shape == (2 * model.growth[0], model.group_trans), first  # (outputs, groups)


def test_condense_event_drops_the_official_lgc_inputs_and_sfr_outputs(v2_fixture):
  model, c = v2_fixture.model, v2_fixture.condense_factor
  states = [torch_import.load_state_dict(model, v2_fixture.state_dict(f'state{k}'))
            for k in range(c)]
  event = jax.jit(lambda p, m: condense.condense_event(p, m, model))
  for k in range(1, c):
    # Event k is decided on the weights of state k applied to the masks of state k-1.
    _assert_trees_equal(event(states[k]['params'], states[k - 1]['masks']), states[k]['masks'])
    _assert_trees_equal(condense.condense_event(states[k]['params'], states[k - 1]['masks'],
                                                model), states[k]['masks'])
  with pytest.raises(ValueError, match='has already had all'):
    condense.condense_event(states[-1]['params'], states[-1]['masks'], model)


def test_group_lasso_equals_the_official_sums(v2_fixture):
  model, c = v2_fixture.model, v2_fixture.condense_factor
  lasso = jax.jit(condense.group_lasso)
  for event in v2_fixture.config['events']:
    k = event['k']
    if k >= min(model.group_1x1, model.group_trans, c) - 1:
      continue  # the official sums stop at stage G-1 (see test_condense)
    variables = torch_import.load_state_dict(model, v2_fixture.state_dict(f'state{k}'))
    official = event['group_lasso_lgc'] + event['group_lasso_sfr']
    value = float(lasso(variables['params'], variables['masks']))
    assert abs(value - official) <= 1e-5 * official, (k, value, official)


def test_flops_and_params_equal_the_official_counter_on_a_b_c():
  official = json.loads((FIXTURES / 'v2_variants.json').read_text())
  for name, make in (('cdnv2_a', models.CondenseNetV2_A), ('cdnv2_b', models.CondenseNetV2_B),
                     ('cdnv2_c', models.CondenseNetV2_C)):
    assert flops.count(make(), 224) == (official[name]['flops'], official[name]['params']), name
  # The paper's table: 46M, 146M and 309M FLOPs.
  for make, published in ((models.CondenseNetV2_A, 46e6), (models.CondenseNetV2_B, 146e6),
                          (models.CondenseNetV2_C, 309e6)):
    assert abs(flops.count(make(), 224)[0] - published) < 1e6


def test_flops_and_params_equal_the_official_counter_on_the_fixtures(v2_fixture):
  config = v2_fixture.config
  assert flops.count(v2_fixture.model, config['image_size']) == (
      config['flops_training_model'], config['params_training_model'])
  rows = flops.per_layer(v2_fixture.model, config['image_size'])
  assert sum(r['flops'] for r in rows) == config['flops_training_model']
  assert [r['layer'] for r in rows][-3:] == ['se_last', 'fc', 'classifier']


def test_a_misfit_sfr_mask_is_named(fixture_by_name):
  fixture = fixture_by_name('v2_tiny_cifar')
  key = 'features.denseblock_2.denselayer_1.sfr._mask'  # growth 8, 4 groups: {1, 5} is one
  state = fixture.state_dict('state1')
  state[key][0, 5] = 1 - state[key][0, 1]
  with pytest.raises(torch_import.StateDictError,
                     match=r'sfr\._mask: mask is not group-structured: input channel 5 '):
    torch_import.load_state_dict(fixture.model, state)
  state = fixture.state_dict('state1')
  state[key][0, 1::4] = 1 - state[key][0, 1::4]  # group 1 writes one output more or less
  with pytest.raises(torch_import.StateDictError, match=r'sfr\._mask: groups keep .* outputs'):
    torch_import.load_state_dict(fixture.model, state)


@pytest.fixture(scope='module')
def regenerated(tmp_path_factory):
  """The folder where make_v2_fixtures.py wrote every V2 fixture afresh."""
  pytest.importorskip('torch', reason='make_v2_fixtures.py runs the official PyTorch code, and '
                                      'PyTorch is not installed')
  official = os.environ.get('CONDENSENET_OFFICIAL_V2_DIR')
  if not official:
    pytest.skip('CONDENSENET_OFFICIAL_V2_DIR is not set: point it at a checkout of the official '
                'CondenseNetV2 code to check that tests/fixtures/make_v2_fixtures.py reproduces '
                'the fixtures')
  out = tmp_path_factory.mktemp('v2_fixtures')
  run = subprocess.run([sys.executable, str(SCRIPT), '--official-dir', official, '--out',
                        str(out)], capture_output=True, text=True, timeout=600, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  return out


@pytest.mark.parametrize('name', V2_FIXTURE_NAMES + ('v2_variants',))
def test_make_v2_fixtures_reproduces_the_files(name, regenerated):
  made_json, committed_json = regenerated / f'{name}.json', FIXTURES / f'{name}.json'
  assert made_json.read_bytes() == committed_json.read_bytes()
  if name != 'v2_variants':  # every npz entry bit for bit, in order
    made = _npz_entries(regenerated / f'{name}.npz')
    committed = _npz_entries(FIXTURES / f'{name}.npz')
    assert [n for n, _ in made] == [n for n, _ in committed]
    differ = [n for (n, a), (_, b) in zip(made, committed) if a != b]
    assert not differ, f'{len(differ)} entries differ, e.g. {differ[:5]}'
