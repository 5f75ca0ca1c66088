"""The command line's answers to ordinary mistakes: one `error:` line, a non-zero exit within
seconds, and nothing written."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / 'configs' / 'digits.py')

MISTAKES = {
    'misspelled field': (['--config', DIGITS, '--workdir', 'run', '--config.num_epoch=3'],
                         "--config.num_epoch: the config has no field 'num_epoch'; did you "
                         'mean --config.num_epochs?'),
    'misspelled nested field': (['--config', DIGITS, '--workdir', 'run',
                                 '--config.model.stage=1,1,1'],
                                'did you mean --config.model.stages?'),
    'config file missing': (['--config', 'configs/nope.py', '--workdir', 'run'],
                            '--config configs/nope.py: no such file'),
    'zero batch': (['--config', DIGITS, '--workdir', 'run', '--config.batch_size=0'],
                   'config.batch_size=0: the global batch size must be a positive integer'),
    'negative batch': (['--config', DIGITS, '--workdir', 'run', '--config.batch_size=-4'],
                       'config.batch_size=-4: the global batch size must be a positive integer'),
    'value of the wrong type': (['--config', DIGITS, '--workdir', 'run',
                                 '--config.batch_size=abc'],
                                "flag --config.batch_size=abc: invalid literal for int()"),
    'too few steps': (['--config', DIGITS, '--workdir', 'run', '--config.batch_size=1024',
                       '--config.num_epochs=2'],
                      '4 training steps (2 epochs of 2) are too few for condense_factor=4: its '
                      '3 condensing events need at least 6 steps'),
    'workdir is a file': (['--config', DIGITS, '--workdir', 'a_file'],
                          '--workdir a_file is a file, not a directory'),
    'workdir cannot be created': (['--config', DIGITS, '--workdir', 'a_file/run'],
                                  '--workdir a_file/run cannot be created in'),
    'no workdir': (['--config', DIGITS], '--workdir must be given'),
}


@pytest.mark.parametrize('name', MISTAKES)
def test_a_mistake_gives_one_error_line_and_writes_nothing(name, tmp_path):
  args, message = MISTAKES[name]
  (tmp_path / 'a_file').write_text('keep me')
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
  started = time.time()
  result = subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, 'PYTHONPATH': str(ROOT)})
  assert time.time() - started < 30  # 4-10 s on 2 cores, busy with another test module
  assert result.returncode != 0
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert [l for l in lines if l.startswith('error: ')] == lines[-1:], result.stderr
  assert 'Traceback' not in result.stderr
  assert message in lines[-1]
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before
  assert (tmp_path / 'a_file').read_text() == 'keep me'
