"""The benchmark entry point, one step of each mode on a tiny config."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import bench  # pylint: disable=g-import-not-at-top

TINY_CONFIG = textwrap.dedent("""
    from configs import cifar

    def get_config():
      config = cifar.get_config()
      config.model.stages = (1, 1, 1)
      config.model.growth = (4, 8, 8)
      return config
""")


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
  path = tmp_path_factory.mktemp('bench') / 'tiny.py'
  path.write_text(TINY_CONFIG)
  return str(path)


def test_train_mode_times_the_real_step_once_compiled(tiny_config):
  result = bench.main(['--config', tiny_config, '--mode', 'train', '--batch-size', '8',
                       '--steps', '2', '--warmup', '0'])
  assert result['mode'] == 'train' and result['batch_size'] == 8
  assert result['train_step_compilations'] == 1
  assert result['img_per_s'] > 0 and result['step_ms_median'] > 0 and result['compile_s'] > 0
  assert result['step_ms_min'] <= result['step_ms_median'] <= result['step_ms_max']
  assert result['img_per_s'] == pytest.approx(8000 / result['step_ms_median'])
  assert result['model'] == 'CondenseNet' and result['stages'] == [1, 1, 1]


@pytest.mark.parametrize('mode, model', [('infer_masked', 'CondenseNet'),
                                         ('infer_condensed', 'CondensedNet')])
def test_inference_modes(tiny_config, mode, model):
  result = bench.main(['--config', tiny_config, '--mode', mode, '--batch-size', '8',
                       '--steps', '1', '--dtype', 'bfloat16'])
  assert result['mode'] == mode and result['model'] == model
  assert result['dtype'] == 'bfloat16' and result['img_per_s'] > 0


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
