"""Trains, condenses, exports and evaluates a CondenseNet.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/cifar.py --workdir runs/c10 --config.num_epochs=30

Kept short on purpose: the logic lives in condensenet_jax.train, which tests call directly.
"""

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
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
  from condensenet_jax import data, train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted:
    sys.exit(0)  # a checkpoint was written; running again resumes
  except (data.DatasetUnavailableError, ValueError, train.NonFiniteError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
