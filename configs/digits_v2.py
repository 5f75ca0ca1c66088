"""The offline quick start with CondenseNetV2: a small CondenseNetV2 on scikit-learn's digits.

    python train.py --config configs/digits_v2.py --workdir runs/digits_v2

The same data, recipe and schedule as configs/digits.py (30 epochs, 690 steps: an even
number, so that the official V2 guard lets the last condensing event through at step 345),
with a CondenseNetV2 of stages 2-2-2 and growth 4-8-32: G = C = 4 for the learned group
convolutions and the sparse feature reactivations, hard-swish from the second block, SE
layers in the third, a 128-wide fc layer. Figures: docs/performance.md#quick-start-and-test-suite.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.name = 'CondenseNetV2'
  config.model.group_trans = 4
  config.model.trans_factor = 4
  config.model.hs_start_block = 1   # 0-based, as the official arguments
  config.model.se_start_block = 2
  config.model.last_se_reduction = 8
  config.model.fc_channel = 128
  return config
