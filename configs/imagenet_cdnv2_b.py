"""CondenseNetV2-B on ImageNet with the official V2 recipe (configs/imagenet_cdnv2_a.py says
what is implemented).

    python train.py --config configs/imagenet_cdnv2_b.py --workdir runs/cdnv2_b

Model: stages 2-4-6-8-6, growth 6-12-24-48-96, G = C = 6, fc 1024 (the official `cdnv2_b`;
146.47M FLOPs, 3.59M params). The paper reports 28.1% top-1 error.
"""

from configs import imagenet_cdnv2_a


def get_config():
  config = imagenet_cdnv2_a.get_config()
  m = config.model
  m.stages = (2, 4, 6, 8, 6)
  m.growth = (6, 12, 24, 48, 96)
  m.group_1x1 = m.group_3x3 = m.group_trans = 6
  m.condense_factor = m.trans_factor = 6
  m.fc_channel = 1024
  return config
