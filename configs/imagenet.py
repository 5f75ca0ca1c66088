"""CondenseNet-74 (G = C = 4) on ImageNet.

    python train.py --config configs/imagenet.py --workdir runs/in74_c4

Official recipe: 120 epochs, global batch 256, lr 0.1 at batch 256 scaled linearly with the
batch (`lr_base_batch_size`), cosine per step, Nesterov 0.9, weight decay 1e-4, group lasso
1e-5 during the condensing stages, random-resized crop 224 + flip; eval resize 256 / center
crop 224. The paper reports 26.2% top-1 error (73.8% accuracy) at 529M FLOPs, 4.8M params.
Needs the ILSVRC2012 tars in <TFDS_DATA_DIR>/downloads/manual (tfds prepares them once) and
TensorFlow for tf.data. Several days on 8 GPUs; for larger batches set batch_size and
warmup_epochs (e.g. --config.batch_size=1024 --config.warmup_epochs=5). Multi-host: run the
same command on every host (see README).
"""

from configs import cifar


def get_config():
  config = cifar.get_config()
  config.dataset = 'imagenet2012'
  config.batch_size = 256
  config.eval_batch_size = 512   # divides 8, 16, ... devices (the last batch is padded)
  config.num_epochs = 120
  config.learning_rate = 0.1
  config.lr_base_batch_size = 256
  config.warmup_epochs = 0.0
  config.group_lasso = 1e-5
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 5000
  config.model.stages = (4, 6, 8, 10, 8)
  config.model.growth = (8, 16, 32, 64, 128)
  config.model.group_1x1 = 4
  config.model.group_3x3 = 4
  config.model.condense_factor = 4
  config.model.stem = 'imagenet'
  return config
