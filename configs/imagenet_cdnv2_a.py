"""CondenseNetV2-A on ImageNet with the official V2 recipe, as far as it is implemented here.

    python train.py --config configs/imagenet_cdnv2_a.py --workdir runs/cdnv2_a

Model: stages 1-1-4-6-8, growth 8-8-16-32-64, G = C = 8 for the learned group convolutions
and the sparse feature reactivations, hard-swish from block 2 and SE layers from block 3
(0-based), last SE reduction 16, fc 828 (the official `cdnv2_a`; 45.87M FLOPs, 2.04M params
in its counter). The paper reports 35.6% top-1 error.

Recipe of the official `train.py`: 350 epochs at global batch 1024, SGD with Nesterov
momentum 0.9, lr 0.4 (not scaled with the batch) after 5 warm-up epochs rising linearly from
0.1, cosine per step to 0, weight decay 4e-5 on the weights only (timm skips BN parameters and
biases), label smoothing 0.1, no group lasso (its training never adds it), random-resized crop
224 + flip, RandAugment rand-m9-mstd0.5 (on the device; bilinear where timm draws bilinear or
bicubic), random erasing with probability 0.2 (per-pixel noise, on the normalized images),
an EMA of the weights with decay 0.9998 after every step (masks not averaged; the EMA model is
evaluated beside the trained one and is the one exported, as the official conversion does);
eval resize 256 / center crop 224. Not implemented here: timm's random choice of the resize
interpolation of the crop (bilinear here). Needs the ILSVRC2012 tars as configs/imagenet.py
does; days on 8 GPUs.
"""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.batch_size = 1024
  config.num_epochs = 350
  config.learning_rate = 0.4
  config.lr_base_batch_size = 0
  config.warmup_epochs = 5.0
  config.warmup_initial_lr = 0.1
  config.weight_decay = 4e-5
  config.weight_decay_vectors = False
  config.label_smoothing = 0.1
  config.rand_augment = 'rand-m9-mstd0.5'
  config.random_erasing = 0.2
  config.ema_decay = 0.9998
  config.group_lasso = 0.0
  m = config.model
  m.name = 'CondenseNetV2'
  m.stages = (1, 1, 4, 6, 8)
  m.growth = (8, 8, 16, 32, 64)
  m.group_1x1 = m.group_3x3 = m.group_trans = 8
  m.condense_factor = m.trans_factor = 8
  m.hs_start_block = 2
  m.se_start_block = 3
  m.last_se_reduction = 16
  m.fc_channel = 828
  return config
