"""The offline quick start: a small CondenseNet on scikit-learn's bundled digits.

    python train.py --config configs/digits.py --workdir runs/digits

1,438 training and 359 test images (8x8 digits upsampled to 32x32; the data ships with
scikit-learn, nothing is downloaded). A CondenseNet with stages 2-2-2, growth 4-8-32 and
G = C = 4 trains 30 epochs (690 steps) through all three condensing events and the
optimization stage, then is exported. Seeds 0, 1, 2 gave 99.7 / 99.4 / 98.9% test accuracy
for the trained model and 98.1 / 99.2 / 96.7% for the condensed one, in 94-118 s on 2 CPU
cores (about 5 s of it compiling the training step).
"""

from configs import cifar


def get_config():
  config = cifar.get_config()
  config.dataset = 'digits'
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 30
  config.learning_rate = 0.1
  config.flip = False             # a mirrored digit is another symbol
  config.crop_padding = 2
  config.log_every_steps = 10
  config.eval_every_epochs = 10
  config.checkpoint_every_steps = 50
  config.model.stages = (2, 2, 2)
  config.model.growth = (4, 8, 32)
  return config
