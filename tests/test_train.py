"""End-to-end tests of training: the real entry point, CIFAR under mocked tfds, one
compilation across stages, resume, and 4 devices vs 1."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from condensenet_jax import (checkpoint, condense, data, execution, flops, models, recipe, startup,
                             train)

# Every test here trains: the full tier.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))
from configs import cifar as cifar_config  # pylint: disable=g-import-not-at-top
from configs import digits as digits_config  # pylint: disable=g-import-not-at-top


def tiny(config, epochs=1):
  """Shrinks a config to a two-minute-free size: a tiny model, one epoch."""
  config.num_epochs = epochs
  config.model.stages = (1, 1, 1)
  config.model.growth = (4, 8, 8)
  config.eval_every_epochs = 0
  config.log_every_steps = 5
  return config


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  """One uninterrupted run of the shrunk digits config (23 steps, checkpoints every 5)."""
  workdir = tmp_path_factory.mktemp('digits')
  config = tiny(digits_config.get_config())
  config.checkpoint_every_steps = 5
  config.keep_checkpoints = 10
  summary = train.train_and_evaluate(config, str(workdir))
  return config, workdir, summary


def test_one_compilation_for_all_stages(digits_run):
  _, _, summary = digits_run
  assert summary['total_steps'] == 23
  assert summary['condensing_event_steps'] == [4, 8, 12]
  assert summary['train_step_compilations'] == 1


def test_run_writes_summary_metrics_and_condensed_model(digits_run):
  config, workdir, summary = digits_run
  on_disk = json.loads((workdir / 'summary.json').read_text())
  assert on_disk == json.loads(json.dumps(summary))
  for key in ('accuracy', 'condensed_accuracy', 'flops', 'params', 'condensed_flops',
              'condensed_params', 'condensing_event_steps', 'train_img_per_s', 'wall_seconds',
              'final_state_sha256'):
    assert key in summary, key
  model = recipe.build_model(config, num_classes=10)
  assert summary['masked_multiply_adds'] == flops.multiply_adds(model, 32)
  assert summary['condensed_multiply_adds'] == flops.multiply_adds(
      models.CondensedCondenseNet.from_model(model), 32) < summary['masked_multiply_adds']
  assert 0.0 <= summary['condensed_accuracy'] <= 1.0
  assert summary['test_examples'] == 359
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_records = [r for r in records if r['kind'] == 'train']
  assert train_records[-1]['step'] == 23 and train_records[-1]['stage'] == 3
  assert any(p.name.startswith('events.out.tfevents') for p in workdir.iterdir())
  # The saved condensed model reproduces the reported accuracy.
  small, variables = checkpoint.load_condensed(str(workdir / 'condensed'))
  dataset = data.digits()
  x = data.normalize(dataset.test_images, dataset.mean, dataset.std)
  predictions = np.argmax(jax.jit(small.apply)(variables, x), -1)
  accuracy = float(np.mean(predictions == dataset.test_labels))
  assert accuracy == pytest.approx(summary['condensed_accuracy'], abs=1e-6)
  assert set(condense.events_done_per_layer(
      train_masks(workdir, summary), models.CondenseNetTiny()).values()) == {3}


def test_condensed_model_classifies_raw_images_at_the_runs_accuracy(digits_run):
  _, workdir, summary = digits_run
  classifier = checkpoint.load_classifier(str(workdir / 'condensed'))
  dataset = data.digits()
  assert classifier.preprocessing == dataset.preprocessing()
  assert classifier.class_names == [str(d) for d in range(10)]
  logits = classifier(dataset.test_images)  # uint8, as the dataset holds them
  assert logits.shape == (359, 10)
  accuracy = float(np.mean(np.argmax(logits, -1) == dataset.test_labels))
  assert accuracy == pytest.approx(summary['condensed_accuracy'], abs=1e-6)
  with pytest.raises(ValueError, match=r'uint8 RGB images of shape \[n, 32, 32, 3\]'):
    classifier(dataset.test_images.astype(np.float32))


def test_tensorboard_reads_the_runs_scalars(digits_run):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  _, workdir, _ = digits_run
  events = event_accumulator.EventAccumulator(str(workdir))
  events.Reload()
  scalars = events.Tags()['scalars']
  assert {'train/loss', 'train/accuracy', 'train/lr', 'final/condensed_accuracy'} <= set(scalars)
  assert events.Scalars('train/stage')[-1].value == 3


def test_a_finished_workdir_is_left_as_it_is(digits_run, capsys):
  config, workdir, summary = digits_run
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*')
            if 'compilation_cache' not in p.parts}
  summary_text = (workdir / 'summary.json').read_text()
  again = train.train_and_evaluate(config, str(workdir))
  assert again == json.loads(summary_text)
  assert (workdir / 'summary.json').read_text() == summary_text
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob('*')
          if 'compilation_cache' not in p.parts} == before
  assert f'the run in {workdir} has finished (23 steps' in capsys.readouterr().out


def train_masks(workdir, summary):
  """Masks of the final checkpoint (read back through orbax)."""
  ckpt = checkpoint.Checkpoints(str(workdir / 'checkpoints'))
  step = ckpt.latest_step()
  assert step == summary['total_steps']
  state, meta = ckpt.restore(step)
  ckpt.close()
  assert meta['step'] == step and meta['stage'] == 3
  return state['masks']


def test_resume_from_a_mid_run_checkpoint_is_exact(digits_run, tmp_path):
  config, workdir, summary = digits_run
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir / 'checkpoints', resumed / 'checkpoints')
  for step in (23, 20, 15):  # keep 5 and 10: stage 2, after the event at step 8
    shutil.rmtree(resumed / 'checkpoints' / str(step))
  again = train.train_and_evaluate(config, str(resumed))
  assert again['resumed_from_step'] == 10
  assert again['steps_this_run'] == 13
  assert again['final_state_sha256'] == summary['final_state_sha256']
  assert again['condensed_accuracy'] == summary['condensed_accuracy']


@pytest.mark.parametrize('resume_at', [7, 8, 9])  # around the condensing event at step 8
def test_resume_next_to_a_condensing_event_is_exact(tmp_path_factory, resume_at):
  config = tiny(digits_config.get_config())
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = 30
  every_step = _every_step_run(tmp_path_factory, config)
  workdir = tmp_path_factory.mktemp(f'resume_{resume_at}')
  shutil.copytree(every_step[0] / 'checkpoints' / str(resume_at),
                  workdir / 'checkpoints' / str(resume_at))
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['resumed_from_step'] == resume_at
  assert summary['final_state_sha256'] == every_step[1]['final_state_sha256']


_EVERY_STEP = {}


def _every_step_run(tmp_path_factory, config):
  """One uninterrupted run with a checkpoint after every step (shared by the cases above)."""
  if 'run' not in _EVERY_STEP:
    workdir = tmp_path_factory.mktemp('every_step')
    _EVERY_STEP['run'] = (workdir, train.train_and_evaluate(config, str(workdir)))
  return _EVERY_STEP['run']


def test_resume_refuses_a_workdir_of_another_model(digits_run, tmp_path):
  config, workdir, _ = digits_run
  other = tmp_path / 'other'
  shutil.copytree(workdir / 'checkpoints', other / 'checkpoints')
  config = tiny(digits_config.get_config())
  config.model.growth = (8, 8, 8)
  with pytest.raises(ValueError, match='holds a run of a different model'):
    train.train_and_evaluate(config, str(other))
  assert sorted(os.listdir(other / 'checkpoints')) == sorted(
      os.listdir(workdir / 'checkpoints'))  # nothing was touched


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  """A shrunk digits run that keeps an EMA of the weights (a decay low enough to see it),
  with a checkpoint after every step; two epochs, evaluated after the first."""
  workdir = tmp_path_factory.mktemp('ema')
  config = tiny(digits_config.get_config(), epochs=2)
  config.ema_decay = 0.75
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = 50
  config.eval_every_epochs = 1
  return config, workdir, train.train_and_evaluate(config, str(workdir))


def _state(workdir, step):
  ckpt = checkpoint.Checkpoints(str(workdir / 'checkpoints'))
  try:
    return ckpt.restore(step)[0]
  finally:
    ckpt.close()


def test_ema_follows_the_weights_step_by_step(ema_run):
  config, workdir, summary = ema_run
  event = summary['condensing_event_steps'][1]
  d = np.float32(config.ema_decay)
  # Step 0: the average starts from the initial weights.
  model = recipe.build_model(config, num_classes=10)
  start = models.init_variables(model, seed=config.seed)
  previous = {'params': start['params'], 'batch_stats': start['batch_stats']}
  for step in (1, 2, event, event + 1, summary['total_steps']):
    if step != 1:
      previous = _state(workdir, step - 1)['ema']
    state = _state(workdir, step)
    new = {'params': state['params'], 'batch_stats': state['batch_stats']}
    terms = jax.tree.map(lambda e, n: (np.asarray(e) * d, np.float32(1 - d) * np.asarray(n)),
                         previous, new)
    for (a, b), got in zip(jax.tree.leaves(terms, is_leaf=lambda t: isinstance(t, tuple)),
                           jax.tree.leaves(state['ema'])):
      # Equal up to the rounding of the two terms (XLA may fuse them into one multiply-add).
      assert np.all(np.abs(got - (a + b)) <= 2**-23 * (np.abs(a) + np.abs(b))), step
    # The average is not the weights themselves (0.75 leaves a visible lag).
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state['ema']['params']),
                                                        jax.tree.leaves(state['params'])))


def test_ema_is_evaluated_and_exported(ema_run):
  config, workdir, summary = ema_run
  assert summary['condensed_from'] == 'ema'
  assert 0.0 <= summary['ema_accuracy'] <= 1.0
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {r['kind'] for r in records} >= {'eval', 'eval_ema'}
  # The condensed model is the export of the averaged weights with the run's masks.
  state = _state(workdir, summary['total_steps'])
  model = recipe.build_model(config, num_classes=10)
  averaged = {'params': state['ema']['params'], 'batch_stats': state['ema']['batch_stats'],
              'masks': state['masks']}
  _, expected = condense.export(model, averaged, classifier_keep=config.classifier_keep)
  _, saved = checkpoint.load_condensed(str(workdir / 'condensed'))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # The tools read the averaged weights of the checkpoint, and say so.
  from condensenet_jax import artifacts  # pylint: disable=g-import-not-at-top
  trained = artifacts.load(str(workdir), forms=('trained',))[0]
  assert trained.source.endswith('(EMA of the weights)')
  np.testing.assert_array_equal(jax.tree.leaves(trained.variables['params'])[0],
                                jax.tree.leaves(averaged['params'])[0])


def test_resume_with_ema_is_exact(ema_run, tmp_path):
  config, workdir, summary = ema_run
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir / 'checkpoints' / '30', resumed / 'checkpoints' / '30')
  again = train.train_and_evaluate(config, str(resumed))
  assert again['resumed_from_step'] == 30
  assert again['final_state_sha256'] == summary['final_state_sha256']
  assert again['ema_accuracy'] == summary['ema_accuracy']


def test_resume_refuses_to_switch_the_ema_on_or_off(ema_run, digits_run, tmp_path):
  for (config, workdir, _), decay in ((ema_run, 0.0), (digits_run, 0.9998)):
    other = tmp_path / f'other_{decay}'
    step = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    shutil.copytree(workdir / 'checkpoints' / str(step[0]), other / 'checkpoints' / str(step[0]))
    config = config.copy_and_resolve_references()
    config.ema_decay = decay
    with pytest.raises(ValueError, match=r'EMA of the weights .*--config.ema_decay='):
      train.train_and_evaluate(config, str(other))
    assert os.listdir(other / 'checkpoints') == [str(step[0])]  # nothing was moved aside
    assert not (other / 'summary.json').exists()


def test_cifar_config_under_mocked_tfds(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = tiny(cifar_config.get_config())
  config.batch_size = 32
  config.eval_batch_size = 50
  with tfds.testing.mock_data(num_examples=192):
    summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['dataset'] == 'cifar10'
  assert summary['total_steps'] == 6
  assert summary['test_examples'] == 192
  assert summary['train_step_compilations'] == 1
  assert (tmp_path / 'condensed' / 'variables.npz').exists()


def test_cifar_without_data_fails_with_a_clear_message(tmp_path):
  env = {**os.environ, 'TFDS_DATA_DIR': str(tmp_path / 'tfds')}
  result = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/cifar.py', '--workdir',
       str(tmp_path / 'run')], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "dataset 'cifar10' is not prepared" in result.stderr
  assert 'TFDS_DATA_DIR' in result.stderr
  assert 'Traceback' not in result.stderr


def test_train_py_entry_point(tmp_path):
  """The real command line on a shrunk digits config, through every condensing stage."""
  result = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/digits.py', '--workdir',
       str(tmp_path), '--config.num_epochs=1', '--config.model.stages=1,1,1',
       '--config.model.growth=4,8,8', '--config.eval_every_epochs=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for k in (1, 2, 3):
    assert f'condensing event {k}/3' in out
  assert 'test accuracy of the condensed model' in out
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['train_step_compilations'] == 1
  assert summary['condensing_event_steps'] == [4, 8, 12]


def test_four_devices_with_synced_batch_stats_match_one_device():
  script = textwrap.dedent('''
      import jax, numpy as np
      from condensenet_jax import train
      from configs import digits
      config = digits.get_config()
      config.model.stages = (1, 1, 1)
      config.model.growth = (4, 8, 8)
      config.num_epochs = 1
      config.sync_batch_stats = True
      config.batch_size = 32
      # A small step size: at lr 0.1 SGD amplifies float32 rounding noise (~1e-5 after one
      # step) to ~1e-3 within 16 steps, which would hide what this test is about.
      config.learning_rate = 0.01
      results = []
      for devices in (jax.devices()[:1], jax.devices()):
        run = train.setup(config, '/unused', devices=devices)
        state = train.initial_state(run)
        batches = train.train_batches(run, 0)
        for _ in range(16):  # through the first two condensing events (steps 8 and 15 of 45)
          state, metrics = run.train_step(state, train.global_batch(run, next(batches)))
        results.append(jax.device_get(state))
      one, four = results
      assert len(jax.devices()) == 4
      diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))
                                                              / (np.max(np.abs(a)) + 1e-12)),
                                           one, four))
      masks_equal = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one.masks),
                                                              jax.tree.leaves(four.masks)))
      print('MAXDIFF', max(diffs), 'MASKS', masks_equal, 'STEP', int(one.step), int(four.step))
  ''')
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'PYTHONPATH': str(ROOT)}
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('MAXDIFF')][0].split()
  # One BN channel of this tiny model has a batch variance near 0, where 1/sqrt(var + eps)
  # = 316 magnifies the float32 rounding of the batch mean (which 1 and 4 devices compute in
  # different orders): params agree to ~1e-6 for 10 steps, then to ~2e-4. A device count
  # that changed the math (statistics or their gradients not synchronized) is off by >1e-2.
  assert float(line[1]) < 1e-3, line
  assert line[3] == 'True' and line[5:] == ['16', '16']


def test_bfloat16_training_stays_close_to_float32():
  """config.dtype='bfloat16': activations and convolutions in bfloat16; params, masks, BN
  statistics and optimizer state stay float32, and a few steps track the float32 run."""
  finals, losses = {}, {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny(digits_config.get_config())
    config.dtype = dtype
    config.learning_rate = 0.02
    run = train.setup(config, '/unused', devices=jax.devices()[:1])
    state = train.initial_state(run)
    batches = train.train_batches(run, 0)
    losses[dtype] = []
    for _ in range(6):
      state, metrics = run.train_step(state, train.global_batch(run, next(batches)))
      losses[dtype].append(float(metrics['cross_entropy']))
    finals[dtype] = jax.device_get(state)
  low, full = finals['bfloat16'], finals['float32']
  for tree in (low.params, low.batch_stats, low.masks, low.opt_state):
    floats = {leaf.dtype for leaf in jax.tree.leaves(tree) if leaf.dtype.kind == 'f'}
    assert floats == {np.dtype('float32')}, floats
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=0.03)
  assert losses['bfloat16'] != losses['float32']  # the bfloat16 path really ran
  # Each parameter's bfloat16-vs-float32 gap is small next to how far training moved it.
  start = jax.device_get(train.initial_state(run)).params
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, a), b, s in zip(flat(low.params), jax.tree.leaves(full.params),
                             jax.tree.leaves(start)):
    assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b - s) + 1e-6, jax.tree_util.keystr(path)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(low.masks),
                                                  jax.tree.leaves(full.masks)))


def _convolutions(hlo: str) -> tuple[int, int]:
  """The convolutions of a compiled program that XLA runs itself (outside library fusions),
  and all of them."""
  library = {re.search(r'calls=%([\w.\-]+)', line).group(1) for line in hlo.splitlines()
             if '"fusion_config":{"kind":"__' in line and 'calls=%' in line}
  own, total, inside = 0, 0, False
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%([\w.\-]+) .*\{$', line)
    if header:
      inside = header.group(1) in library
    elif re.search(r'= \S+ convolution\(', line):
      own, total = own + (not inside), total + 1
  return own, total


def test_cpu_convolutions_chooses_the_kernels_of_the_compiled_programs(tmp_path):
  config = tiny(digits_config.get_config())
  assert config.execution.cpu_convolutions == 'xla'
  config.execution.cpu_convolutions = 'fast'
  with pytest.raises(ValueError, match=r"config.execution.cpu_convolutions='fast' is not one of "
                                       r"\('xla', 'ynnpack'\)"):
    train.setup(config, str(tmp_path))
  config.execution.cpu_convolutions = 'ynnpack'
  assert execution.Execution.from_config(config, 'cpu').compiler_options() is None
  if jax.default_backend() != 'cpu':
    return
  config.execution.cpu_convolutions = 'xla'
  assert execution.Execution.from_config(config, 'cpu').compiler_options() == {
      'xla_cpu_experimental_ynn_fusion_type':
          'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
      'xla_backend_optimization_level': 1}
  config.batch_size = config.eval_batch_size = 8
  config.model.growth = (8, 8, 8)  # 3x3 convolutions over 32 channels, as CondenseNet-86's
  dataset = data.synthetic(config.dataset, num_train=64, num_test=8)
  run = train.setup(config, str(tmp_path), dataset=dataset)
  variables = train.initial_state(run).variables()
  batch = {'image': dataset.test_images, 'label': dataset.test_labels,
           'valid': np.ones(8, bool)}
  batch = train.global_batch(run, batch)
  hlo = run.eval_step(run.model).lower(variables, batch).compile().as_text()
  own, total = _convolutions(hlo)
  # The stem and the 3x3 convolution of each dense layer (per group on the smaller maps), all
  # on XLA's kernels; YNNPACK would take the first block's (32 input channels).
  assert own == total >= 4, (own, total)


def test_compilation_cache_defaults_to_the_workdir(monkeypatch, tmp_path):
  updates = {}
  monkeypatch.setattr(jax.config, 'update', lambda k, v: updates.__setitem__(k, v))
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/elsewhere')
  config = digits_config.get_config()
  assert startup.enable_compilation_cache(config, str(tmp_path)) == '/elsewhere'
  assert not updates  # the environment wins and nothing is changed
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  assert startup.enable_compilation_cache(config, str(tmp_path)) == str(
      tmp_path / 'compilation_cache')
  assert updates['jax_compilation_cache_dir'] == str(tmp_path / 'compilation_cache')
  updates.clear()
  config.compilation_cache_dir = ''
  assert startup.enable_compilation_cache(config, str(tmp_path)) is None and not updates


def test_training_steps_make_no_implicit_transfers(tmp_path):
  """Once the state is placed, steps move nothing between host and devices implicitly: the
  batches are placed explicitly (`train.global_batch`) and the state stays on the devices."""
  config = tiny(digits_config.get_config())
  run = train.setup(config, str(tmp_path), devices=jax.devices()[:1])
  state = train.initial_state(run)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
  batches = train.train_batches(run, 0)
  state, _ = run.train_step(state, train.global_batch(run, next(batches)))  # compiles
  with jax.transfer_guard('disallow'):
    for _ in range(3):
      state, metrics = run.train_step(state, train.global_batch(run, next(batches)))
    jax.block_until_ready((state, metrics))
  assert int(jax.device_get(state.step)) == 4
