"""The README stays short, its commands stay the ones CI runs, and the Python blocks of the
README and of docs/ run verbatim.

Each ```python block runs in a fresh interpreter, in a temporary working directory, with the
repository on PYTHONPATH. A block that reads the quick start's condensed model
(`runs/digits/condensed`) gets one made on the spot: a model of the digits config's shapes,
condensed and exported without training (a real quick start takes minutes).
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from condensenet_jax import checkpoint, condense, data, models

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
MAX_BYTES = 10_000
QUICK_START = ('python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt'
               ' && python train.py --config configs/digits.py --workdir runs/digits')
TEST_COMMAND = 'python -m pytest -q -n 2 tests'
CONDENSED_DIR = 'runs/digits/condensed'


def _blocks(language, path=README):
  """The bodies of the ```<language> fenced blocks of the Markdown file `path`, in order."""
  text = path.read_text(encoding='utf-8')
  return re.findall(rf'^```{language}\n(.*?)^```', text, flags=re.MULTILINE | re.DOTALL)


PYTHON_BLOCKS = [(path.relative_to(REPO).as_posix(), i, code)
                 for path in [README] + sorted((REPO / 'docs').glob('*.md'))
                 for i, code in enumerate(_blocks('python', path))]


def test_readme_is_short():
  size = len(README.read_bytes())
  assert size <= MAX_BYTES, (f'README.md is {size} bytes, over {MAX_BYTES}: move detail to '
                             'docs/.')


def test_first_commands_are_the_quick_start_and_the_test_suite():
  first = _blocks('bash')[0].splitlines()
  assert first[:2] == [QUICK_START, TEST_COMMAND], first[:2]
  ci = REPO / '.ci' / 'run'
  if ci.exists():  # CI runs the README's test command verbatim
    assert TEST_COMMAND in ci.read_text().splitlines()


def test_readme_has_python_blocks():
  assert sum(name == 'README.md' for name, _, _ in PYTHON_BLOCKS) >= 2


def _save_digits_condensed(directory):
  """A condensed model of the digits config's shapes (untrained), with digits' preprocessing."""
  model = models.CondenseNetTiny(growth=(4, 8, 32))  # configs/digits.py: stages 2-2-2
  variables = models.init_variables(model, seed=0)
  masks = condense.condense_all(variables['params'], variables['masks'], model)
  small_model, small_vars = condense.export(model, {**variables, 'masks': masks})
  checkpoint.save_condensed(str(directory), small_model, small_vars,
                            preprocessing=data.digits().preprocessing())


@pytest.mark.slow
@pytest.mark.parametrize('name,index,code', PYTHON_BLOCKS,
                         ids=[f'{name}:block{i}' for name, i, _ in PYTHON_BLOCKS])
def test_python_block_runs_verbatim(name, index, code, tmp_path):
  if CONDENSED_DIR in code:
    _save_digits_condensed(tmp_path / CONDENSED_DIR)
  script = tmp_path / f'readme_block{index}.py'
  script.write_text(code)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in [env.get('PYTHONPATH')] if p])
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (
      f'{name} python block {index} failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}')
