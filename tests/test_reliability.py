"""Reliability: bit-identical reruns, exact resume after SIGTERM/SIGINT/SIGKILL, corrupted
checkpoints, the NaN guard, validation messages, and two processes joined by
jax.distributed. The kill tests run the real train.py in subprocesses."""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from condensenet_jax import checkpoint, train, validation

# Every test here trains (most in subprocesses): the full tier.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import digits as digits_config  # pylint: disable=g-import-not-at-top

# 2 epochs of 23 steps: events at steps 8, 16, 23; checkpoints every 5 steps.
ARGS = ['--config', 'configs/digits.py', '--config.num_epochs=2', '--config.model.stages=1,1,1',
        '--config.model.growth=4,8,8', '--config.eval_every_epochs=0',
        '--config.log_every_steps=5', '--config.checkpoint_every_steps=5']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess environment sharing a persistent compilation cache (later runs skip compiling)."""
  cache = tmp_path_factory.mktemp('xla_cache')
  return {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(cache),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'PYTHONUNBUFFERED': '1'}


def _run(workdir, env, *extra, timeout=600):
  return subprocess.run([sys.executable, 'train.py', *ARGS, '--workdir', str(workdir), *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(workdir):
  return json.loads((pathlib.Path(workdir) / 'summary.json').read_text())


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, env):
  """The uninterrupted run every interrupted one must match: (workdir, summary). It keeps
  the checkpoints of steps 40, 45 and 46."""
  workdir = tmp_path_factory.mktemp('reference')
  result = _run(workdir, env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, _summary(workdir)


@pytest.fixture
def reference(reference_run):
  return reference_run[1]


def _copy_checkpoints(reference_run, workdir):
  shutil.copytree(reference_run[0] / 'checkpoints', workdir / 'checkpoints')
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [40, 45, 46]


def test_reruns_are_bit_identical(reference, env, tmp_path):
  result = _run(tmp_path, env)
  assert result.returncode == 0, result.stderr[-3000:]
  again = _summary(tmp_path)
  assert again['final_state_sha256'] == reference['final_state_sha256']
  assert again['accuracy'] == reference['accuracy']
  assert again['condensed_accuracy'] == reference['condensed_accuracy']


def _start_and_signal(workdir, env, sig, seed, *extra):
  """Starts train.py, waits until step 10 is logged, then sends `sig` after a random delay.
  Returns (returncode, stdout, delay)."""
  log = open(pathlib.Path(workdir).parent / f'{pathlib.Path(workdir).name}.log', 'w+')
  proc = subprocess.Popen([sys.executable, 'train.py', *ARGS, '--workdir', str(workdir), *extra],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
  metrics = pathlib.Path(workdir) / 'metrics.jsonl'
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:  # until step 10 has been logged
    if metrics.exists() and _last_logged_step(metrics) >= 10:
      break
    time.sleep(0.05)
  delay = random.Random(seed).uniform(0.0, 0.5)  # the run needs seconds more to finish
  time.sleep(delay)
  proc.send_signal(sig)
  returncode = proc.wait(timeout=300)
  log.seek(0)
  return returncode, log.read(), delay


def _last_logged_step(metrics: pathlib.Path) -> int:
  steps = [0]
  for line in metrics.read_text().splitlines():
    try:
      steps.append(json.loads(line)['step'])
    except ValueError:  # a line still being written
      pass
  return max(steps)


@pytest.mark.parametrize('sig,seed', [(signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_sigterm_and_sigint_checkpoint_and_resume_exactly(reference, env, tmp_path, sig, seed):
  workdir = tmp_path / 'run'
  returncode, out, delay = _start_and_signal(workdir, env, sig, seed)
  assert returncode == 0, (delay, out[-3000:])
  name = signal.Signals(sig).name
  line = [l for l in out.splitlines() if l.startswith(f'{name}: stopped after step')]
  assert line and 'summary written' not in out, (delay, out[-3000:])
  step = int(line[0].split()[4])
  assert 10 <= step < 46
  assert checkpoint.Checkpoints(str(workdir / 'checkpoints')).latest_step() == step
  result = _run(workdir, env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _summary(workdir)['final_state_sha256'] == reference['final_state_sha256'], delay


def test_sigkill_during_checkpoint_writes_resumes_exactly(reference, env, tmp_path):
  workdir = tmp_path / 'run'
  # A checkpoint at every step: the kill lands in or near an (asynchronous) write.
  returncode, out, delay = _start_and_signal(workdir, env, signal.SIGKILL, 3,
                                             '--config.checkpoint_every_steps=1')
  assert returncode == -signal.SIGKILL, out[-2000:]  # killed before the end
  result = _run(workdir, env, '--config.checkpoint_every_steps=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from' in result.stdout
  assert _summary(workdir)['final_state_sha256'] == reference['final_state_sha256'], delay


def test_corrupted_checkpoint_falls_back_to_the_previous_one(reference_run, env, tmp_path):
  reference = reference_run[1]
  workdir = tmp_path / 'run'
  _copy_checkpoints(reference_run, workdir)
  # Corrupt the latest checkpoint's array data.
  latest = workdir / 'checkpoints' / '46'
  for f in (latest / 'state').rglob('*'):
    if f.is_file() and f.parent.name == 'd':
      f.write_bytes(f.read_bytes()[:7])
  result = _run(workdir, env)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert f'checkpoint {workdir}/checkpoints/46 is truncated or corrupted' in out
  assert 'resuming from' in out and '/45 (step 45' in out
  moved = [p for p in (workdir / 'checkpoints').iterdir() if p.name.startswith('corrupt-46')]
  assert moved, 'the corrupted checkpoint is kept aside, not deleted'
  assert _summary(workdir)['final_state_sha256'] == reference['final_state_sha256']


def test_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(reference_run, env,
                                                                            tmp_path):
  workdir = tmp_path / 'run'
  _copy_checkpoints(reference_run, workdir)
  for step in (45, 46):  # back to step 40
    shutil.rmtree(workdir / 'checkpoints' / str(step))
  result = _run(workdir, env, '--config.learning_rate=1e30')
  assert result.returncode == 1
  # Step 40 (old params) is finite and applies a huge update; step 41 is the first non-finite.
  assert 'error: non-finite loss or gradient at step 41 (stage 3, learning rate' in result.stderr
  assert 'Traceback' not in result.stderr
  ckpt = checkpoint.Checkpoints(str(workdir / 'checkpoints'))
  assert ckpt.all_steps() == [40]
  state, _ = ckpt.restore(40)
  ckpt.close()
  assert all(np.isfinite(np.asarray(v)).all() for v in _leaves(state['params']))


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _tiny_digits():
  config = digits_config.get_config()
  config.model.stages = (1, 1, 1)
  config.model.growth = (4, 8, 8)
  config.num_epochs = 1
  return config


@pytest.mark.parametrize('change,message', [
    (lambda c: c.model.update(growth=(6, 12, 24), group_3x3=2),
     'denseblock_2/denselayer_1 input channels = 18 is not divisible by group_1x1 = 4'),
    (lambda c: setattr(c.model, 'growth', (4, 6, 8)),
     'growth of denseblock_2 = 6 is not divisible by group_3x3 = 4'),
    (lambda c: setattr(c, 'dataset', 'mnist'), "config.dataset='mnist' is unknown"),
    (lambda c: setattr(c.model, 'stem', 'imagenet'),
     "config.model.stem='imagenet' with 3 dense blocks needs 56x56 images, but digits images "
     "are 32x32; use stem='cifar'"),
    (lambda c: setattr(c, 'batch_size', 1024),
     '2 training steps (1 epoch of 2) are too few for condense_factor=4: its 3 condensing '
     'events need at least 6 steps'),
    (lambda c: setattr(c, 'dtype', 'float16'), "config.dtype='float16'"),
    (lambda c: setattr(c, 'label_smoothing', 1.0),
     'config.label_smoothing=1.0 must be in [0, 1)'),
    (lambda c: setattr(c, 'ema_decay', 1.0), 'config.ema_decay=1.0 must be in [0, 1)'),
    (lambda c: setattr(c, 'random_erasing', 1.5),
     'config.random_erasing=1.5 must be a probability in [0, 1]'),
    (lambda c: setattr(c.model, 'name', 'ResNet'), "config.model.name='ResNet'"),
])
def test_invalid_configs_are_refused_before_compiling(change, message, tmp_path):
  config = _tiny_digits()
  change(config)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_resume_refuses_another_schedule(reference_run, env, tmp_path):
  workdir = tmp_path / 'run'
  _copy_checkpoints(reference_run, workdir)
  result = _run(workdir, env, '--config.num_epochs=3')
  assert result.returncode == 1
  assert ('belong to a run with other dataset, seed, batch_size, num_epochs (num_epochs: 2 -> 3)'
          in result.stderr)
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [40, 45, 46]


def test_batch_must_divide_across_devices():
  config = _tiny_digits()
  with pytest.raises(ValueError, match=r'config.batch_size=64 is not divisible by the 3 '
                                       r'devices; use a multiple of 3'):
    validation.validate(config, devices=3)


def test_two_processes_match_one_process_with_four_devices(tmp_path, env):
  script = textwrap.dedent('''
      import json, sys
      import jax
      from condensenet_jax import train
      from configs import digits
      config = digits.get_config()
      config.model.stages = (1, 1, 1)
      config.model.growth = (4, 8, 8)
      config.num_epochs = 1
      config.eval_every_epochs = 0
      config.sync_batch_stats = True
      config.learning_rate = 0.01  # see test_train: keeps float32 noise from growing
      summary = train.train_and_evaluate(config, sys.argv[1])
      print('RESULT', json.dumps({'process': jax.process_index(), 'processes':
                                  jax.process_count(), 'devices': jax.device_count(),
                                  'sha': summary['final_state_sha256'],
                                  'accuracy': summary['accuracy']}))
  ''')
  port = random.Random(os.getpid()).randint(20000, 40000)
  procs = []
  for i in range(2):
    penv = {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
            'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2',
            'JAX_PROCESS_ID': str(i), 'PYTHONPATH': str(ROOT)}
    procs.append(subprocess.Popen([sys.executable, '-c', script, str(tmp_path / 'multi')],
                                  cwd=ROOT, env=penv, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  single = subprocess.run(
      [sys.executable, '-c', script, str(tmp_path / 'single')], cwd=ROOT,
      env={**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
           'PYTHONPATH': str(ROOT)}, capture_output=True, text=True, timeout=600)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert single.returncode == 0, single.stderr[-3000:]
  results = [json.loads(o.split('RESULT ', 1)[1]) for o, _ in outs]
  one = json.loads(single.stdout.split('RESULT ', 1)[1])
  assert [r['processes'] for r in results] == [2, 2] and one['processes'] == 1
  assert results[0]['devices'] == results[1]['devices'] == one['devices'] == 4
  assert results[0]['sha'] == results[1]['sha']  # both processes hold the same state
  # Equal to the single-process run to float tolerance (collectives may sum in another order).
  multi_state, single_state = _restore(tmp_path / 'multi'), _restore(tmp_path / 'single')
  for a, b in zip(jax.tree.leaves(multi_state.params), jax.tree.leaves(single_state.params),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(multi_state.masks), jax.tree.leaves(single_state.masks),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _restore(workdir):
  """The final train state of a run, read onto this process's devices."""
  config = _tiny_digits()
  config.sync_batch_stats = True
  config.learning_rate = 0.01
  run = train.setup(config, str(workdir))
  fresh = train.initial_state(run)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          fresh)
  ckpt = checkpoint.Checkpoints(str(workdir / 'checkpoints'))
  try:
    state, meta = ckpt.restore(ckpt.latest_step(), abstract)
  finally:
    ckpt.close()
  assert meta['step'] == run.total_steps
  return state
