"""CondenseNetV2-C on ImageNet with the official V2 recipe (configs/imagenet_cdnv2_a.py says
what is implemented).

    python train.py --config configs/imagenet_cdnv2_c.py --workdir runs/cdnv2_c

Model: stages 4-6-8-10-8, growth 8-16-32-64-128, G = C = 8, fc 1024 (the official `cdnv2_c`;
309.74M FLOPs, 6.18M params). The paper reports 24.1% top-1 error.
"""

from configs import imagenet_cdnv2_a


def get_config():
  config = imagenet_cdnv2_a.get_config()
  m = config.model
  m.stages = (4, 6, 8, 10, 8)
  m.growth = (8, 16, 32, 64, 128)
  m.fc_channel = 1024
  return config
