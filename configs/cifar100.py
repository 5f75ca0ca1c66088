"""CondenseNet-86 on CIFAR-100 with the official recipe.

    python train.py --config configs/cifar100.py --workdir runs/c100

As configs/cifar.py with CIFAR-100 (its own mean/std, 100 classes). The paper reports 23.64%
test error (76.36% accuracy); same time as CIFAR-10 (about half a day on one modern GPU).
"""

from configs import cifar


def get_config():
  config = cifar.get_config()
  config.dataset = 'cifar100'
  return config
