"""The DenseNet-BC-100 (k = 12) baseline on CIFAR-10.

    python train.py --config configs/densenet_cifar.py --workdir runs/densenet_c10

Same recipe as configs/cifar.py (300 epochs, batch 64, cosine lr 0.1); 292.38M FLOPs, 0.769M
params, no condensing and no export. DenseNet-BC-100 reaches about 95.5% on CIFAR-10
(Huang et al., 2017); roughly a day on one modern GPU.
"""

from configs import cifar


def get_config():
  config = cifar.get_config()
  config.model.name = 'DenseNet'
  config.model.stages = (16, 16, 16)
  config.model.growth = (12, 12, 12)
  config.model.group_1x1 = 1
  config.model.group_3x3 = 1
  config.model.reduction = 0.5   # channels a transition keeps
  return config
