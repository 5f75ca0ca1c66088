"""CondenseNetV2: against the official V2 code (fixtures/make_v2_fixtures.py made the numbers:
logits of imported weights, the group lasso, the export and converted models, FLOPs, the
stage rule with its guard), then a tiny V2 training run and the tools on it, and the configs.
The condensing events of every fixture are checked in tests/test_condense.py."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from conftest import (FIXTURES, V2_FIXTURE_NAMES, assert_json_reproduced, assert_npz_reproduced,
                      max_relative_error, regenerate)
from condensenet_jax import checkpoint, cli, condense, data, flops, models, torch_import
from condensenet_jax import train, validation

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import (cifar, cifar_cdnv2, digits_v2, imagenet_cdnv2_a, imagenet_cdnv2_b,
                     imagenet_cdnv2_c)

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


def test_a_fully_condensed_v2_model_has_no_event_left(v2_fixture):
  # The events themselves: tests/test_condense.py, on every fixture.
  model, c = v2_fixture.model, v2_fixture.condense_factor
  last = torch_import.load_state_dict(model, v2_fixture.state_dict(f'state{c - 1}'))
  with pytest.raises(ValueError, match='has already had all'):
    condense.condense_event(last['params'], last['masks'], model)


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
  return regenerate(tmp_path_factory, SCRIPT, 'CONDENSENET_OFFICIAL_V2_DIR', 'CondenseNetV2')


@pytest.mark.parametrize('name', V2_FIXTURE_NAMES + ('v2_variants',))
def test_make_v2_fixtures_reproduces_the_files(name, regenerated):
  made_json, committed_json = regenerated / f'{name}.json', FIXTURES / f'{name}.json'
  assert_json_reproduced(made_json, committed_json)
  if name != 'v2_variants':
    assert_npz_reproduced(regenerated / f'{name}.npz', FIXTURES / f'{name}.npz')


def test_export_equals_the_official_converted_model(v2_fixture):
  model, c = v2_fixture.model, v2_fixture.condense_factor
  variables = torch_import.load_state_dict(model, v2_fixture.state_dict(f'state{c - 1}'))
  small, small_vars = condense.export(model, variables)
  assert isinstance(small, models.CondensedCondenseNetV2)
  logits = jax.jit(small.apply)(small_vars, v2_fixture.x)
  assert max_relative_error(logits, v2_fixture.arrays['converted_logits']) < 1e-5
  # The official converted state dict, read into the condensed model, is our export.
  official = torch_import.load_converted_state_dict(small, v2_fixture.state_dict('converted'))
  _assert_trees_equal(official, jax.tree.map(np.asarray, small_vars))
  config = v2_fixture.config
  assert flops.count(small, config['image_size']) == (config['flops_converted'],
                                                       config['params_converted'])


def test_export_keeps_the_function_of_the_masked_model():
  model = models.CondenseNetV2Tiny()
  from conftest import randomize  # pylint: disable=g-import-not-at-top
  variables = randomize(models.init_variables(model, seed=3), seed=3)
  masks = condense.condense_all(variables['params'], variables['masks'], model)
  variables = {**variables, 'masks': masks}
  small, small_vars = condense.export(model, variables)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  expected = jax.jit(model.apply)(variables, x)
  # 'keep': the SFRs place their outputs by gathers; otherwise by one scatter.
  for policy in (models.Execution(condensed_gathers='keep', conv_lowering='grouped'),
                 models.Execution(condensed_gathers='skip'), models.Execution()):
    actual = jax.jit(small.clone(execution=policy).apply)(small_vars, x)
    assert max_relative_error(actual, expected) < 1e-5, policy
  with pytest.raises(ValueError, match='export needs every layer fully condensed'):
    condense.export(model, {**variables, 'masks': condense.condense_event(
        variables['params'], models.init_variables(model)['masks'], model)})


def test_a_converted_sfr_index_that_is_not_one_hot_is_named(fixture_by_name):
  fixture = fixture_by_name('v2_tiny_cifar')
  small = models.CondensedCondenseNetV2.from_model(fixture.model)
  state = fixture.state_dict('converted')
  key = 'features.denseblock_1.denselayer_1.sfr.index'
  state[key][0] = 1
  with pytest.raises(torch_import.StateDictError, match=r'sfr\.index: every row must hold one'):
    torch_import.load_converted_state_dict(small, state)
  with pytest.raises(TypeError, match='use load_converted_state_dict for a CondensedCondenseNetV2'):
    torch_import.load_state_dict(small, state)


def _official_v2_stage(progress, condense_factor, previous):
  """The official V2 `_check_drop`: the V1 stage rule, applied only while progress < 0.5005."""
  if progress * 2 >= 1 + 1e-3:
    return previous
  for i in range(condense_factor - 1):
    if progress * 2 < (i + 1) / (condense_factor - 1):
      return i
  return condense_factor - 1


@pytest.mark.parametrize('total,condense_factor', [(46, 4), (690, 4), (97, 4), (2002, 8)])
def test_stage_at_follows_the_official_v2_guard(total, condense_factor):
  stage, official = 0, []
  for s in range(total + 1):
    stage = _official_v2_stage(s / total, condense_factor, stage)
    official.append(stage)
  ours = [condense.stage_at(s, total, condense_factor, stops_at_half=True)
          for s in range(total + 1)]
  assert ours == official
  traced = jax.jit(lambda s: condense.stage_at(s, total, condense_factor, True))(
      np.arange(total + 1))
  np.testing.assert_array_equal(traced, ours)
  fired = [s for s in range(1, total + 1) if official[s] != official[s - 1]]
  assert condense.event_steps(total, condense_factor, stops_at_half=True) == fired


def test_a_run_whose_last_event_the_guard_skips_is_refused():
  config = digits_v2.get_config()
  config.num_epochs = 1  # 23 steps: the last event would fall at step 12, after the guard
  dataset = data.digits()
  model = train.recipe.build_model(config, 10)
  with pytest.raises(ValueError, match="never reach CondenseNetV2's last condensing event"):
    validation.check_model_and_data(config, model, dataset)
  config.num_epochs = 2
  validation.check_model_and_data(config, model, dataset)


@pytest.fixture(scope='module')
def v2_run(tmp_path_factory):
  """A finished tiny CondenseNetV2 digits run: two epochs (46 steps), one layer per block."""
  workdir = tmp_path_factory.mktemp('v2') / 'digits_v2'
  config = digits_v2.get_config()
  config.num_epochs = 2
  config.model.stages = (1, 1, 1)
  config.model.growth = (4, 8, 8)
  config.model.last_se_reduction = 4
  config.eval_every_epochs = 0
  # The V2 recipe's options, so that a run takes their code paths.
  config.label_smoothing, config.random_erasing = 0.1, 0.2
  config.warmup_epochs, config.warmup_initial_lr, config.weight_decay_vectors = 1, 0.05, False
  config.ema_decay = 0.9
  config.rand_augment = 'rand-m9-mstd0.5'
  summary = train.train_and_evaluate(config, str(workdir))
  return workdir, summary


@pytest.mark.slow
def test_a_v2_run_condenses_exports_and_draws(v2_run):
  workdir, summary = v2_run
  assert summary['condensing_event_steps'] == [8, 16, 23]
  # The classifier is not condensed: the export computes the function of the model it is
  # made from, the EMA of the weights.
  assert summary['condensed_from'] == 'ema'
  assert abs(summary['condensed_accuracy'] - summary['ema_accuracy']) <= 1 / 359
  for picture in ('curves.png', 'connectivity.png', 'kept_per_group.png', 'reactivation.png'):
    assert (workdir / picture).stat().st_size > 0, picture
  small, _ = checkpoint.load_condensed(str(workdir / 'condensed'))
  assert isinstance(small, models.CondensedCondenseNetV2)


@pytest.mark.slow
def test_tools_on_a_v2_run(v2_run, capsys):
  tf = pytest.importorskip('tensorflow')
  workdir, summary = v2_run
  assert cli.main(['evaluate', str(workdir)]) == 0
  result = json.loads((workdir / 'eval.json').read_text())['digits']
  assert result['form'] == 'trained'
  assert result['top1'] == pytest.approx(summary['accuracy'])
  assert cli.main(['inspect', str(workdir)]) == 0
  assert 'denseblock_3/denselayer_1' in capsys.readouterr().out
  images = data.digits().test_images[:16]
  expected = np.asarray(checkpoint.load_classifier(str(workdir / 'condensed'))(images))
  assert cli.main(['export', str(workdir), '--format', 'jax']) == 0
  exported = jax.export.deserialize(
      bytearray((workdir / 'export' / 'condensed.jax').read_bytes()))
  np.testing.assert_allclose(exported.call(images), expected, rtol=1e-5,
                             atol=1e-5 * np.abs(expected).max())
  assert cli.main(['export', str(workdir), '--format', 'tflite']) == 0
  interpreter = tf.lite.Interpreter(model_path=str(workdir / 'export' / 'condensed.tflite'))
  interpreter.allocate_tensors()
  source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  logits = []
  for image in images:
    interpreter.set_tensor(source['index'], image[None])
    interpreter.invoke()
    logits.append(interpreter.get_tensor(sink['index'])[0])
  np.testing.assert_allclose(np.stack(logits), expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


def test_imagenet_configs_build_the_official_variants():
  official = json.loads((FIXTURES / 'v2_variants.json').read_text())
  for name, config in (('cdnv2_a', imagenet_cdnv2_a.get_config()),
                       ('cdnv2_b', imagenet_cdnv2_b.get_config()),
                       ('cdnv2_c', imagenet_cdnv2_c.get_config())):
    model = train.recipe.build_model(config, 1000)
    assert isinstance(model, models.CondenseNetV2), name
    assert flops.count(model, 224) == (official[name]['flops'], official[name]['params']), name
    validation.validate(config, devices=8)


def test_the_cifar_v2_config_is_condensenet_86_with_v2_parts():
  config = cifar_cdnv2.get_config()
  model = train.recipe.build_model(config, 10)
  assert isinstance(model, models.CondenseNetV2)
  assert flops.count(model, 32) == (75647570, 907674)  # as its docstring says
  v1 = cifar.get_config()
  assert {k: config[k] for k in v1 if k != 'model'} == {k: v1[k] for k in v1 if k != 'model'}
  for field in ('stages', 'growth', 'bottleneck', 'group_1x1', 'group_3x3', 'condense_factor'):
    assert config.model[field] == v1.model[field], field
  validation.validate(config, devices=1)  # every condensing event before the V2 guard
  total = 300 * data.steps_per_epoch(50000, config.batch_size)
  assert len(condense.event_steps(total, 4, stops_at_half=True)) == 3


def test_the_v2_recipe_schedule_and_weight_decay():
  config = imagenet_cdnv2_a.get_config()
  per_epoch, epochs, warmup = 10, config.num_epochs, config.warmup_epochs
  schedule = train.recipe.learning_rate_schedule(config, per_epoch, epochs * per_epoch)

  def official(step):  # the official LrScheduler, 'cosine' with warm-up, per iteration
    epoch, batch = divmod(step, per_epoch)
    if epoch < warmup:
      return 0.1 + (0.4 - 0.1) * (epoch * per_epoch + batch) / (warmup * per_epoch)
    total = (epochs - warmup) * per_epoch
    return 0.5 * 0.4 * (1 + np.cos(np.pi * ((epoch - warmup) * per_epoch + batch) / total))
  for step in (0, 1, 25, 49, 50, 51, 1000, 3499):
    assert float(schedule(step)) == pytest.approx(official(step), rel=1e-5, abs=1e-7), step
  # No decay of the 1-D parameters: a zero gradient leaves them, and only them, unchanged.
  params = {'norm': {'scale': np.ones(3, np.float32)}, 'kernel': np.ones((2, 3), np.float32)}
  tx = train.recipe.make_optimizer(config, 1.0)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert not np.asarray(updates['norm']['scale']).any()
  np.testing.assert_allclose(updates['kernel'], -4e-5 * (1 + 0.9), rtol=1e-6)  # Nesterov


def test_every_imagenet_config_validates_on_eight_devices():
  from configs import imagenet, imagenet_c8  # pylint: disable=g-import-not-at-top
  for module in (imagenet, imagenet_c8, imagenet_cdnv2_a, imagenet_cdnv2_b, imagenet_cdnv2_c):
    validation.validate(module.get_config(), devices=8)
