"""CondenseNetV2 on CIFAR-10: CondenseNet-86's layout with sparse feature reactivation.

    python train.py --config configs/cifar_cdnv2.py --workdir runs/c10_cdnv2

Not the paper's CondenseNetV2-110 or -146 (41M / 62M FLOPs, 4.65% / 4.35% CIFAR-10 error):
the official V2 code builds its CIFAR models (stride-1 stem, 8x8 pooling) but defines no CIFAR
variant, and their stages, growth and groups are not given in its README. This config keeps
everything of configs/cifar.py (stages 14-14-14, growth 8-16-32, G = C = 4, the 300-epoch
recipe) and adds V2's parts, so that a run next to configs/cifar.py measures them: an SFR in
every layer (G = C = 4), hard-swish from the second block, SE layers in the third, and after
the last block an SE layer (reduction 16) and a 256-wide fc layer with hard-swish. 75.65M FLOPs
and 0.908M params in the V2 counter's convention (CondenseNet-86: 65.82M, 0.520M). Condensing
events at epochs 50, 100 and 150, the last one at progress 0.5, before the V2 guard.
"""

from configs import cifar


def get_config():
  config = cifar.get_config()
  config.model.name = 'CondenseNetV2'
  config.model.group_trans = 4
  config.model.trans_factor = 4
  config.model.hs_start_block = 1   # 0-based, as the official arguments
  config.model.se_start_block = 2
  config.model.last_se_reduction = 16
  config.model.fc_channel = 256
  return config
