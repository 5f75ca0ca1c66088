"""The benchmark entry points: each mode of bench.py on a tiny config, and the suite's process
groups, failure records and ratios."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import bench, suite  # pylint: disable=g-import-not-at-top

TINY_CONFIG = suite.QUICK_CONFIG  # CondenseNet with one layer per block


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
  path = tmp_path_factory.mktemp('bench') / 'tiny.py'
  path.write_text(TINY_CONFIG)
  return str(path)


@pytest.mark.slow
def test_train_mode_times_the_real_step_once_compiled(tiny_config):
  result = bench.main(['--config', tiny_config, '--mode', 'train', '--batch-size', '8',
                       '--steps', '2', '--warmup', '0', '--compile-phases'])
  assert result['mode'] == 'train' and result['batch_size'] == 8
  assert result['train_step_compilations'] == 1
  assert result['img_per_s'] > 0 and result['step_ms_median'] > 0 and result['compile_s'] > 0
  assert 0 < result['lower_s'] < result['compile_s']
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'cpu':  # the phases of XLA's CPU compiler, compiled afresh
    phases = result['compile_phases']
    assert set(phases) == set(bench.COMPILE_PHASES) | {'kernels'}, phases
    assert phases['kernels'] > 10
    xla_s = result['compile_s'] - result['lower_s']
    assert all(0 < phases[k] <= xla_s for k in bench.COMPILE_PHASES), (phases, xla_s)
  assert result['step_ms_min'] <= result['step_ms_median'] <= result['step_ms_max']
  assert result['img_per_s'] == pytest.approx(8000 / result['step_ms_median'])
  assert result['model'] == 'CondenseNet' and result['stages'] == [1, 1, 1]
  from condensenet_jax import flops, recipe  # pylint: disable=g-import-not-at-top
  model = recipe.build_model(bench.load_config(tiny_config), num_classes=10)
  assert result['model_flops'] == 3 * 2 * flops.count(model, 32)[0] * 8
  assert result['conv_lowering'] == 'auto' and result['conv_lowering_used'] == (
      'grouped' if jax.default_backend() == 'tpu' else 'block_diagonal')
  assert result['dense_block_form'] == 'auto'
  assert result['dense_block_form_used'] == 'concatenate'
  assert result['condensed_conv_used'] is None


def test_model_flops_are_the_papers_count_times_three_for_training():
  from condensenet_jax import models  # pylint: disable=g-import-not-at-top
  model = models.CondenseNet86()
  # 65.8M multiply-adds per 32x32 image (the official count; the paper says 65M).
  assert bench.model_flops(model, 'infer_masked', 1024) == 2 * 65816394 * 1024
  assert bench.model_flops(model, 'train', 64) == 3 * 2 * 65816394 * 64
  assert bench.model_flops(object(), 'train', 64) is None


@pytest.mark.parametrize('mode, model', [('infer_masked', 'CondenseNet'),
                                         ('infer_condensed', 'CondensedCondenseNet')])
def test_inference_modes(tiny_config, mode, model):
  result = bench.main(['--config', tiny_config, '--mode', mode, '--batch-size', '8',
                       '--steps', '1', '--dtype', 'bfloat16'])
  assert result['mode'] == mode and result['model'] == model
  assert result['dtype'] == 'bfloat16' and result['img_per_s'] > 0
  assert result['compile_phases'] is None  # only with --compile-phases
  import jax  # pylint: disable=g-import-not-at-top
  from condensenet_jax import execution  # pylint: disable=g-import-not-at-top
  policy = execution.Execution()
  assert result['conv_lowering_used'] == policy.lowering()
  if jax.default_backend() == 'cpu':  # condensed 1x1 convolutions by map size
    assert result['condensed_conv_used'] == (
        '32x32: gather_free, 16x16: gather_free, 8x8: per_group'
        if mode == 'infer_condensed' else None)
  assert result['dense_block_form_used'] == (
      'preallocate' if jax.default_backend() == 'cpu' else 'concatenate')


def test_condensed_gathers_flag(tiny_config):
  import jax  # pylint: disable=g-import-not-at-top
  result = bench.main(['--config', tiny_config, '--mode', 'infer_condensed', '--batch-size',
                       '4', '--steps', '1', '--condensed-gathers', 'keep'])
  assert result['condensed_gathers'] == 'keep'
  if jax.default_backend() == 'cpu':
    assert result['condensed_conv_used'] == (
        '32x32: block_diagonal, 16x16: per_group, 8x8: per_group')
  with pytest.raises(ValueError, match="condensed_gathers='never'"):
    bench.main(['--config', tiny_config, '--mode', 'infer_condensed', '--batch-size', '4',
                '--steps', '1', '--condensed-gathers', 'never'])


def test_cpu_convolutions_flag(tiny_config):
  import jax  # pylint: disable=g-import-not-at-top
  from condensenet_jax import execution  # pylint: disable=g-import-not-at-top
  on_cpu = jax.default_backend() == 'cpu'
  for choice, options in (('ynnpack', None),
                          ('xla', execution.CPU_COMPILER_OPTIONS if on_cpu else None)):
    result = bench.main(['--config', tiny_config, '--mode', 'infer_masked', '--batch-size',
                         '4', '--steps', '1', '--cpu-convolutions', choice])
    assert result['cpu_convolutions'] == choice and result['compiler_options'] == options


def test_dense_block_form_flag(tiny_config):
  result = bench.main(['--config', tiny_config, '--mode', 'infer_masked', '--batch-size', '4',
                       '--steps', '1', '--dense-block-form', 'concatenate'])
  assert result['dense_block_form'] == result['dense_block_form_used'] == 'concatenate'
  with pytest.raises(ValueError, match="dense_block_form='fast'"):
    bench.main(['--config', tiny_config, '--mode', 'infer_masked', '--batch-size', '4',
                '--steps', '1', '--dense-block-form', 'fast'])


@pytest.mark.slow
def test_module_entry_point_prints_json_last(tiny_config):
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.bench', '--config', tiny_config, '--mode',
       'infer_condensed', '--batch-size', '4', '--steps', '1'],
      cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ}).stdout
  result = json.loads(out.strip().splitlines()[-1])
  for key in ('mode', 'batch_size', 'img_per_s', 'step_ms_median', 'compile_s', 'device'):
    assert key in result, key
  assert result['batch_size'] == 4


def test_missing_config_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match='does not exist'):
    bench.main(['--config', str(tmp_path / 'nope.py'), '--mode', 'train'])


@pytest.mark.slow
def test_suite_runs_a_group_in_a_child_process_and_keeps_each_figure(tmp_path, capsys,
                                                                     monkeypatch):
  from condensenet_jax import startup  # pylint: disable=g-import-not-at-top
  # Even with the deterministic flag set by the caller, 'ours-fast' runs without it.
  monkeypatch.setenv('XLA_FLAGS', startup.DETERMINISTIC_FLAG)
  out = tmp_path / 'results.jsonl'
  results = suite.main(['--quick', '--groups', 'ours-fast,profile', '--out', str(out)])
  profile = results.pop()
  assert profile['impl'] == 'profile' and profile['mode'] == 'train' and profile['total_ms'] > 0
  # Two training measurements with XLA's deterministic GPU kernels off, in a fresh process.
  assert [(r['mode'], r['batch_size'], r['dtype']) for r in results] == [
      ('train', 4, 'float32'), ('train', 8, 'bfloat16')]
  assert all(r['deterministic'] is False and r['xla_deterministic_flag'] is False
             for r in results)
  assert all(r['xla_flops'] > 0 and r['xla_bytes_accessed'] > 0 for r in results)
  assert len(out.read_text().splitlines()) == 3  # one line per figure, written by the child
  printed = capsys.readouterr().out
  assert "Where the train step's time goes (batch 4, float32" in printed
  assert '| ours | train | 8 | bfloat16, deterministic off |' in printed
  assert 'not CondenseNet-86' in printed  # the tiny model is never compared with the official
  with pytest.raises(SystemExit, match='already exists'):
    suite.main(['--quick', '--groups', 'ours-fast', '--out', str(out)])


def _row(impl, mode, batch, img_per_s, **extra):
  record = {'impl': impl, 'mode': mode, 'batch_size': batch, 'img_per_s': img_per_s,
            'step_ms_median': 1000 * batch / img_per_s}
  if impl == 'ours':
    record.update(stages=[14, 14, 14], growth=[8, 16, 32], compile_s=1.0)
  return {**record, **extra}


def test_suite_ratios_pair_the_measurements_the_targets_name():
  results = [
      _row('ours', 'train', 64, 300.0, dtype='float32', deterministic=True),
      _row('ours', 'train', 64, 360.0, dtype='float32', deterministic=False),
      _row('ours', 'train', 256, 900.0, dtype='bfloat16', deterministic=True),
      _row('ours', 'infer_masked', 1024, 4000.0, dtype='float32'),
      _row('ours', 'infer_condensed', 1024, 10000.0, dtype='float32'),
      _row('official-pytorch', 'train', 64, 100.0, bf16=False),
      _row('official-pytorch', 'train', 256, 450.0, bf16=True, channels_last=True),
      _row('official-pytorch', 'infer_converted', 1024, 2500.0, bf16=False),
      # An explicit lowering (the 'lowerings' group) is listed but never paired.
      _row('ours', 'train', 64, 5000.0, dtype='float32', deterministic=True,
           conv_lowering='per_group'),
      _row('ours', 'infer_condensed', 1024, 90000.0, dtype='float32',
           dense_block_form='preallocate'),
      _row('ours', 'infer_condensed', 1024, 80000.0, dtype='float32', condensed_gathers='skip'),
  ]
  text = suite.table(results)
  assert '| ours | train | 64 | float32, per_group | 5000.0 |' in text
  assert '| ours | infer_condensed | 1024 | float32, preallocate | 90000.0 |' in text
  assert '| ours | infer_condensed | 1024 | float32, gathers skip | 80000.0 |' in text
  # The paper setting compares our default (deterministic) float32 step with eager float32.
  assert 'float32 at the paper batch (ours, deterministic / official eager): 300.0 / 100.0 ' \
         'img/s = 3.00x' in text
  assert 'best training throughput, any batch, precision or determinism (ours / official): ' \
         '900.0 / 450.0 img/s = 2.00x' in text
  assert 'condensed inference, float32 (ours / official converted): 10000.0 / 2500.0 ' \
         'img/s = 4.00x' in text
  assert 'condensed / masked inference, float32 (ours): 10000.0 / 4000.0 img/s = 2.50x' in text
  assert 'deterministic GPU kernels, float32 training (on / off): 300.0 / 360.0 img/s = ' \
         '0.83x' in text
  assert 'bfloat16 (ours / official converted)' not in text  # not measured on both sides


def test_suite_lowerings_group_times_each_explicit_lowering():
  from condensenet_jax import execution  # pylint: disable=g-import-not-at-top
  jobs = suite.plan(suite.parse_args(['--quick']))['lowerings']
  named = [job[job.index('--conv-lowering') + 1] for job in jobs if '--conv-lowering' in job]
  assert sorted(named) == sorted(2 * execution.LOWERINGS)
  flag = '--dense-block-form'
  forms = [job[job.index(flag) + 1] for job in jobs if flag in job]
  assert sorted(forms) == sorted(2 * execution.DENSE_BLOCK_FORMS)
  gathers = [job for job in jobs if '--condensed-gathers' in job]
  assert sorted(job[job.index('--condensed-gathers') + 1] for job in gathers) == sorted(
      execution.CONDENSED_GATHERS)
  layouts = [job for job in jobs if '--condensed-layout' in job]
  assert sorted(job[job.index('--condensed-layout') + 1] for job in layouts) == sorted(
      execution.LAYOUTS)
  assert {job[1] for job in gathers + layouts} == {'infer_condensed'}
  assert len(jobs) == len(named) + len(forms) + len(gathers) + len(layouts)
  assert {job[1] for job in jobs} == {'train', 'infer_condensed'}
  assert 'lowerings' not in suite.parse_args([]).groups  # only when asked for


def test_suite_of_peak_uses_the_model_flops():
  peaks = [{'impl': 'peak', 'what': 'copy', 'device': 'X', 'gb_per_s': 1000.0},
           {'impl': 'peak', 'what': 'matmul_float32', 'device': 'X', 'tflop_per_s': 100.0}]
  # 1 TFLOP in 1 s of a 100 TFLOP/s card, 100 GB of a 1000 GB/s copy; XLA's count ignored.
  row = _row('ours', 'train', 100, 100.0, dtype='float32', model_flops=1e12, xla_flops=5e12,
             xla_bytes_accessed=1e11)
  assert '| 1.0% matmul, 10% copy |' in suite.table(peaks + [row])
  del row['model_flops']  # a model the count does not cover: XLA's estimate instead
  assert '| 5.0% matmul, 10% copy |' in suite.table(peaks + [row])



def test_suite_records_failures_and_goes_on(tmp_path, capsys):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  raise ValueError("no such model")\n')
  out = tmp_path / 'results.jsonl'
  results = suite.main(['--quick', '--config', str(broken), '--groups', 'official,ours-fast',
                        '--official-dir', str(tmp_path / 'no_checkout'), '--out', str(out)])
  official = [r for r in results if r['impl'] == 'official-pytorch']
  ours = [r for r in results if r['impl'] == 'ours']
  # The official child exits with an error (no PyTorch or no checkout); the others are skipped.
  assert len(official) == 1 and 'exited with code' in official[0]['error']
  # Each of our measurements fails on its own and is recorded with its arguments.
  assert len(ours) == 2 and all('no such model' in r['error'] for r in ours)
  assert ours[1]['args'][:4] == ['--mode', 'train', '--batch-size', '8']
  assert capsys.readouterr().out.count('| failed:') == 3


@pytest.mark.parametrize('cost, expected', [
    ({'flops': 2.0, 'bytes accessed': 3.0, 'other': 1.0}, {'flops': 2.0, 'bytes accessed': 3.0}),
    ([{'flops': 5.0}], {'flops': 5.0}),
    (None, {}),
    ('unexpected', {}),
    (RuntimeError('not available'), {}),
])
def test_cost_estimate_never_breaks_a_measurement(cost, expected):
  class Program:
    def cost_analysis(self):
      if isinstance(cost, Exception):
        raise cost
      return cost
  assert bench._cost(Program()) == expected  # pylint: disable=protected-access


@pytest.mark.slow
def test_op_profile_joins_the_trace_with_the_compiled_program(tiny_config, capsys):
  from benchmarks import op_profile  # pylint: disable=g-import-not-at-top
  result = op_profile.main(['--config', tiny_config, '--mode', 'train', '--batch-size', '8',
                            '--steps', '1', '--warmup', '1', '--top', '20'])
  categories = {c['category']: c for c in result['categories']}
  assert result['total_ms'] > 0 and len(result['top']) == 20
  assert categories['convolution']['ms'] > 0 and categories['dot']['ms'] > 0
  assert sum(c['ms'] for c in result['categories']) == pytest.approx(result['total_ms'])
  # Every listed operation was found in the optimized HLO; XLA keeps the JAX source of most
  # (not of some instructions its own passes create, which can be the slowest five of a run).
  assert all(r['shape'] != '?' for r in result['top'])
  assert sum(bool(r['source']) for r in result['top']) >= 10
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(
      json.dumps(result))


def test_hlo_categories():
  from benchmarks import op_profile  # pylint: disable=g-import-not-at-top
  text = '''HloModule m

%fused_computation (p0: f32[4,8]) -> f32[8,4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{1,0} transpose(%p0), dimensions={1,0}, metadata={op_name="jit(f)/transpose"}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %transpose_fusion = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation
  %cc = f32[4,2]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm"
  %x = f32[8,4,4,3]{3,2,1,0} parameter(3)
  %k = f32[3,3,3,8]{3,2,1,0} parameter(4)
  %cudnn-conv.12 = (f32[8,4,4,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(f)/conv_general_dilated"}
  %i = s32[2,1]{1,0} parameter(2)
  %g = f32[4,2]{1,0} gather(%a, %i), offset_dims={0}, collapsed_slice_dims={1}, start_index_map={1}, index_vector_dim=1, slice_sizes={4,1}
  ROOT %d = f32[4,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
}
'''
  table = op_profile.parse_hlo(text)
  assert table['transpose_fusion'] == ('f32[8,4]{1,0}', 'transpose/copy', 'jit(f)/transpose')
  assert table['cc'][1] == 'custom-call:__cublas$gemm'
  assert table['g'][1] == 'gather/scatter'
  # Library calls on GPU return tuples (the result and a scratch buffer).
  assert table['cudnn-conv.12'] == ('(f32[8,4,4,8]{3,2,1,0}, u8[0]{0})',
                                    'custom-call:__cudnn$convForward',
                                    'jit(f)/conv_general_dilated')
  assert table['d'] == ('f32[4,2]{1,0}', 'dot', 'jit(f)/dot_general')


@pytest.mark.slow
def test_latency_times_every_form_from_the_same_weights(tiny_config):
  from benchmarks import latency  # pylint: disable=g-import-not-at-top
  result = latency.main(['--config', tiny_config, '--batch-sizes', '1,3', '--repeats', '2',
                         '--warmup', '1'])
  forms = ('masked', 'masked_folded', 'condensed', 'condensed_folded', 'exported', 'tflite')
  assert set(result) == set(forms) | {'ratios'}
  for form in forms:
    assert set(result[form]) == {'1', '3'} and min(result[form].values()) > 0, form
  for batch in ('1', '3'):
    best = min(result[f][batch] for f in forms[2:])
    assert result['ratios'][batch]['best_condensed_over_masked'] == pytest.approx(
        best / result['masked'][batch])


def test_the_official_benchmark_refuses_an_unknown_architecture(capsys):
  from benchmarks import official_torch  # pylint: disable=g-import-not-at-top
  for arch, message in (('{"name": "ResNet"}', "'name' must be 'CondenseNet' or"),
                        ('{name}', '--arch is not JSON')):
    with pytest.raises(SystemExit):
      official_torch.parse_args(['--official-dir', '.', '--arch', arch])
    assert message in capsys.readouterr().err
  assert official_torch.parse_args(['--official-dir', '.']).arch == official_torch.CONDENSENET_86


def test_latency_stops_with_the_official_benchmarks_error_line(tmp_path):
  from benchmarks import latency  # pylint: disable=g-import-not-at-top
  from condensenet_jax import models  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit, match=r'^error: .*(needs PyTorch|does not hold the official '
                                       r'CondenseNetV2 code)'):
    latency.official(str(tmp_path), models.CondenseNetV2Tiny(), [1], 1, 0)


def test_the_official_benchmark_builds_the_given_v2_architecture():
  pytest.importorskip('torch')
  official = os.environ.get('CONDENSENET_OFFICIAL_V2_DIR')
  if not official:
    pytest.skip('CONDENSENET_OFFICIAL_V2_DIR is not set (a checkout of the official V2 code)')
  from condensenet_jax import models  # pylint: disable=g-import-not-at-top
  model = models.CondenseNetV2Tiny()
  arch = json.dumps({'name': 'CondenseNetV2', **models.architecture(model)})
  run = subprocess.run(
      [sys.executable, '-m', 'benchmarks.official_torch', '--official-dir', official, '--arch',
       arch, '--modes', 'train,infer_masked,infer_converted', '--train-batch', '2',
       '--infer-batch', '1', '--steps', '1', '--warmup', '0', '--device', 'cpu'],
      capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
  assert run.returncode == 0, run.stderr
  records = [json.loads(l) for l in run.stdout.splitlines() if l.startswith('{')]
  assert [(r['model'], r['image_size'], r['mode']) for r in records] == [
      ('CondenseNetV2', 32, m) for m in ('train', 'infer_masked', 'infer_converted')]
