"""CondenseNet-74 (G = C = 8) on ImageNet.

    python train.py --config configs/imagenet_c8.py --workdir runs/in74_c8

As configs/imagenet.py with 8 groups and condense factor 8 (seven condensing events). The
paper reports 29.0% top-1 error (71.0% accuracy) at 274M FLOPs, 2.9M params.
"""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.model.group_1x1 = 8
  config.model.group_3x3 = 8
  config.model.condense_factor = 8
  return config
