"""Trains, condenses, exports and evaluates a CondenseNet.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/cifar.py --workdir runs/c10 --config.num_epochs=30

Kept short on purpose: the logic lives in condensenet_jax.train, which tests call directly.
Mistakes (an unknown config field, a missing file, a bad value, a workdir that cannot be
used) end in one `error: ...` line and exit code 1, before anything is written.
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the exported '
                    'model; a run started again in the same workdir resumes.')

USAGE = 'python train.py --config configs/digits.py --workdir runs/digits'


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def _flag_value(argv: list[str], name: str):
  """The value of `--name VALUE` or `--name=VALUE` in `argv`, or None."""
  for i, arg in enumerate(argv):
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
  return None


def _unknown_field(argv: list[str], error: AttributeError) -> str:
  """A one-line message for a `--config.<field>` that the config does not have."""
  text = str(error).encode().decode('unicode_escape')
  field = re.search(r"'(\w+)'", text)
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  name = field.group(1) if field else '?'
  flag = next((a.split('=', 1)[0] for a in argv
               if a.startswith('--config.') and re.search(rf'\.{name}(=|$)', a)),
              f'--config.{name}')
  from condensenet_jax.validation import RENAMED_FIELDS  # pylint: disable=g-import-not-at-top
  renamed = RENAMED_FIELDS.get(flag[len('--config.'):])
  if renamed:
    return f'{flag} is now --config.{renamed}.'
  message = f'{flag}: the config has no field {name!r}'
  if suggestion:
    return f'{message}; did you mean {flag[:flag.rindex(".") + 1]}{suggestion.group(1)}?'
  return f'{message}; the config file lists its fields.'


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with every ordinary mistake turned into one `error:` line."""
  config = _flag_value(argv, 'config')
  if config is not None and not os.path.isfile(config):
    _fail(f'--config {config}: no such file; give a config file, for example '
          'configs/cifar.py or configs/digits.py.')
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e}. Usage: {USAGE}')
  except AttributeError as e:  # ml_collections: an override names a field the config lacks
    _fail(_unknown_field(argv, e))
  except Exception as e:  # pylint: disable=broad-except  # the config file itself fails
    _fail(f'--config {config}: cannot be loaded ({type(e).__name__}: {e}).')
  missing = [f'--{name}' for name in ('config', 'workdir') if FLAGS[name].value is None]
  if missing:
    _fail(f'{" and ".join(missing)} must be given. Usage: {USAGE}')
  if len(rest) > 1:
    _fail(f'unexpected arguments {rest[1:]}. Usage: {USAGE}')
  return rest


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
  from condensenet_jax import data, preemption, reporting, train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted:
    sys.exit(0)  # a checkpoint was written; running again resumes
  except (data.DatasetUnavailableError, ValueError, reporting.NonFiniteError) as e:
    _fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
