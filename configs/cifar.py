"""CondenseNet-86 on CIFAR-10 with the official recipe.

    python train.py --config configs/cifar.py --workdir runs/c10

Trains CondenseNet-86 (stages 14-14-14, growth 8-16-32, G = C = 4) for 300 epochs at batch 64:
SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 cosine-annealed per step to 0,
random crop (4-pixel zero padding) + horizontal flip, no group lasso. Condensing events at
epochs 50, 100 and 150; the condensed model (65.81M FLOPs, 0.516M params) is exported,
evaluated and saved in <workdir>/condensed at the end. The paper reports 5.06% test error
(94.94% accuracy). Expect roughly half a day on one modern GPU (235k steps); a CPU is far too
slow for the full recipe. CIFAR-10 is downloaded once by tfds (TFDS_DATA_DIR).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = 'cifar10'
  config.data_dir = ml_collections.FieldReference(None, field_type=str)  # tfds data_dir

  config.batch_size = 64          # global, split across devices
  config.eval_batch_size = 512
  config.num_epochs = 300
  config.learning_rate = 0.1
  config.lr_base_batch_size = 0   # 0: no linear scaling; else lr *= batch_size / this
  config.warmup_epochs = 0.0
  config.warmup_initial_lr = 0.0  # the warmup rises linearly from this to the peak
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4      # coupled (added to the gradient), as PyTorch's SGD
  config.weight_decay_vectors = True  # False: no decay of BN scales/biases and biases (timm)
  config.label_smoothing = 0.0
  config.ema_decay = 0.0          # > 0: keep an EMA of the weights, evaluate and export it
  config.group_lasso = 0.0        # lambda; applied during the condensing stages only
  config.dtype = 'float32'        # or 'bfloat16' (activations; params stay float32)
  config.sync_batch_stats = False  # True: BN batch statistics over all devices
  config.deterministic = True     # GPU: XLA's deterministic kernels (bit-identical reruns)

  config.crop_padding = 4
  config.flip = True
  config.rand_augment = ''        # a timm RandAugment policy, e.g. 'rand-m9-mstd0.5'; '': none
  config.random_erasing = 0.0     # probability of erasing a rectangle (timm, 'pixel' mode)
  config.classifier_keep = 0.5    # fraction of classifier inputs the export keeps

  config.log_every_steps = 50
  config.eval_every_epochs = 10   # 0: only at the end
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  # Compiled programs are kept here so that a resumed run starts at once; None:
  # <workdir>/compilation_cache, '': off. JAX_COMPILATION_CACHE_DIR, when set, wins.
  config.compilation_cache_dir = ml_collections.FieldReference(None, field_type=str)

  config.model = ml_collections.ConfigDict()
  config.model.name = 'CondenseNet'
  config.model.stages = (14, 14, 14)
  config.model.growth = (8, 16, 32)
  config.model.bottleneck = 4
  config.model.group_1x1 = 4
  config.model.group_3x3 = 4
  config.model.condense_factor = 4
  config.model.dropout_rate = 0.0
  config.model.stem = 'cifar'

  # How the programs execute: speed only, never the function computed; 'auto' and -1 follow
  # the rules of condensenet_jax.execution for the run's backend (evidence: docs/backends.md).
  config.execution = ml_collections.ConfigDict()
  config.execution.conv_lowering = 'auto'      # 'grouped', 'block_diagonal' or 'per_group'
  config.execution.dense_block_form = 'auto'   # 'concatenate' or 'preallocate'
  config.execution.condensed_gathers = 'auto'  # condensed model: 'keep' or 'skip' its gathers
  config.execution.condensed_layout = 'auto'   # condensed, eval: 'channels_last', 'channel_major'
  config.execution.cpu_convolutions = 'xla'    # CPU: XLA's own convolution kernels, or 'ynnpack'
  config.execution.eval_chunk = -1             # examples per inference pass per device; 0: all
  return config
