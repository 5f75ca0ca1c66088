"""FLOPs and parameters in the official CondenseNet convention.

The official counter (`measure_model`) counts multiply-adds of convolutions and Linear layers
(plus the Linear bias), one op per element for every ReLU input, `kernel^2` ops per output
element for average pooling, nothing for BN, gathers and channel shuffles; parameters are the
trainable weights (BN scale and bias included, running statistics and indices not). A learned
group convolution counts as its dense convolution divided by the condense factor, for both
FLOPs and parameters. The numbers are computed from the architecture, for a batch of one
square image of `image_size` pixels a side.

CondenseNetV2's counter (its own `measure_model`) differs in three places: it counts no bias
ops for Linear layers (parameters still include the bias), the SE layers count their pooling
(one op per input element), their two bias-free Linear maps, the ReLU between them and two
ops per element for the sigmoid (not the scaling), and a sparse feature reactivation counts as
its dense convolution divided by its condense factor, as a learned group convolution does.
Hard-swish counts as its ReLU6, one op per element. The residual additions are not counted.

That convention counts the masked training model as if it were already condensed.
`multiply_adds` gives what each form really executes instead: the multiply-adds of its
convolutions and classifier, a masked learned group convolution counted dense (its kernel is
applied whole, masked entries included) and a grouped convolution as its groups.
"""

import contextlib

from condensenet_jax import models


class _Counter:
  """Accumulates (ops, params) layer by layer, with the official formulas; `rows` gets one
  record per `section`."""

  def __init__(self):
    self.ops = 0
    self.params = 0
    self.multiply_adds = 0  # as executed: grouped convolutions by group, LGCs dense
    self.rows = []

  @contextlib.contextmanager
  def section(self, name: str):
    """Records what the code inside adds, as `{'layer', 'flops', 'params', 'multiply_adds'}`."""
    before = (self.ops, self.params, self.multiply_adds)
    yield
    self.rows.append({'layer': name, 'flops': self.ops - before[0],
                      'params': self.params - before[1],
                      'multiply_adds': self.multiply_adds - before[2]})

  def relu(self, channels, size):
    self.ops += channels * size * size

  def norm(self, channels):
    self.params += 2 * channels

  def conv(self, in_channels, out_channels, kernel, size, stride=1, padding=0, groups=1,
           divide_by=None):
    """A convolution on a `size` x `size` map; returns the output size. `divide_by` is the
    condense factor for a learned group convolution (counted dense / C)."""
    out = (size + 2 * padding - kernel) // stride + 1
    dense_ops = in_channels * out_channels * kernel * kernel * out * out
    dense_params = in_channels * out_channels * kernel * kernel
    divisor = divide_by or groups
    self.multiply_adds += dense_ops // groups
    self.ops += dense_ops // divisor
    self.params += dense_params // divisor
    return out

  def norm_relu_conv(self, in_channels, out_channels, kernel, size, padding=0, groups=1,
                     divide_by=None):
    self.relu(in_channels, size)
    self.norm(in_channels)
    return self.conv(in_channels, out_channels, kernel, size, padding=padding, groups=groups,
                     divide_by=divide_by)

  def avg_pool(self, channels, size, window, stride):
    out = (size - window) // stride + 1
    self.ops += channels * out * out * window * window
    return out

  def linear(self, in_features, out_features, bias=True, bias_ops=True):
    """A Linear layer; CondenseNetV2's counter leaves out the bias ops (`bias_ops=False`)."""
    biases = out_features if bias else 0
    self.multiply_adds += in_features * out_features
    self.ops += in_features * out_features + (biases if bias_ops else 0)
    self.params += in_features * out_features + biases

  def squeeze_excite(self, channels, size, reduction):
    """CondenseNetV2's SE layer on a `size` x `size` map of `channels` channels."""
    self.ops += channels * size * size  # the average pooling
    reduced = channels // reduction
    self.linear(channels, reduced, bias=False)
    self.relu(reduced, 1)
    self.linear(reduced, channels, bias=False)
    self.ops += 2 * channels  # the sigmoid

  def head(self, channels, size, pool):
    self.norm(channels)
    self.relu(channels, size)
    self.avg_pool(channels, size, pool, pool)


def _condensenet(model, image_size):
  """CondenseNet and CondenseNetV2, training or condensed form."""
  model.check()
  stride, pool = models.stem_geometry(model.stem)
  v2 = isinstance(model, models.CondenseNetV2)
  condensed = models.is_condensed(model)
  n = _Counter()
  with n.section('init_conv'):
    size = n.conv(3, 2 * model.growth[0], 3, image_size, stride=stride, padding=1)
  previous_block = 1
  for block, layer, in_channels, growth in models.dense_layer_inputs(model.stages,
                                                                     model.growth):
    if block != previous_block:  # transition: 2x2 average pooling
      with n.section(f'transition_{previous_block}'):
        size = n.avg_pool(in_channels, size, 2, 2)
      previous_block = block
    width = model.bottleneck * growth
    with n.section(f'denseblock_{block}/denselayer_{layer}'):
      if condensed:  # the gathered inputs
        kept = in_channels * model.group_1x1 // model.condense_factor
        n.norm_relu_conv(kept, width, 1, size, groups=model.group_1x1)
      else:
        n.norm_relu_conv(in_channels, width, 1, size, divide_by=model.condense_factor)
      n.norm_relu_conv(width, growth, 3, size, padding=1, groups=model.group_3x3)
      if v2 and block - 1 >= model.se_start_block:
        n.squeeze_excite(growth, size, 1)
      if v2 and condensed:  # the SFR's kept outputs (their scatter is not counted)
        kept = in_channels * model.group_trans // model.trans_factor
        n.norm_relu_conv(growth, kept, 1, size, groups=model.group_trans)
      elif v2:
        n.norm_relu_conv(growth, in_channels, 1, size, divide_by=model.trans_factor)
  features = model.num_features
  with n.section('norm_last'):
    n.head(features, size, pool)
  if not v2:
    with n.section('classifier'):
      n.linear(model.num_classifier_inputs if condensed else features, model.num_classes)
    return n
  with n.section('se_last'):
    n.squeeze_excite(features, 1, model.last_se_reduction)
  with n.section('fc'):
    n.linear(features, model.fc_channel, bias_ops=False)
    n.relu(model.fc_channel, 1)  # hard-swish
  with n.section('classifier'):
    n.linear(model.fc_channel, model.num_classes, bias_ops=False)
  return n


def _densenet(model, image_size):
  stride, pool = models.stem_geometry(model.stem)
  n = _Counter()
  with n.section('init_conv'):
    size = n.conv(3, 2 * model.growth[0], 3, image_size, stride=stride, padding=1)
  for block, in_channels, end_channels, out_channels in model.block_channels():
    growth = model.growth[block - 1]
    width = model.bottleneck * growth
    for layer in range(model.stages[block - 1]):
      with n.section(f'denseblock_{block}/denselayer_{layer + 1}'):
        n.norm_relu_conv(in_channels + layer * growth, width, 1, size, groups=model.group_1x1)
        n.norm_relu_conv(width, growth, 3, size, padding=1, groups=model.group_3x3)
    if out_channels is not None:
      with n.section(f'transition_{block}'):
        n.norm_relu_conv(end_channels, out_channels, 1, size, groups=model.group_1x1)
        size = n.avg_pool(out_channels, size, 2, 2)
  with n.section('norm_last'):
    n.head(model.num_features, size, pool)
  with n.section('classifier'):
    n.linear(model.num_features, model.num_classes)
  return n


def _counted(model, image_size: int, what: str) -> _Counter:
  if models.condenses(model):
    return _condensenet(model, image_size)
  if isinstance(model, models.DenseNet):
    return _densenet(model, image_size)
  raise TypeError(f'flops.{what} supports CondenseNet, CondensedCondenseNet, CondenseNetV2 and '
                  f'DenseNet, not {type(model).__name__}.')


def count(model, image_size: int) -> tuple[int, int]:
  """(FLOPs, params) of `model` on one `image_size` x `image_size` image, official convention.

  Works for `models.CondenseNet` (training form, LGC counted as dense / C),
  `models.CondensedCondenseNet` (the exported form), `models.CondenseNetV2` and
  `models.CondensedCondenseNetV2` (in the V2 code's convention) and `models.DenseNet`.

  Raises:
    TypeError: `model` is none of these.
    ValueError: a CondenseNet whose architecture cannot be built (`CondenseNet.check`).
  """
  n = _counted(model, image_size, 'count')
  return n.ops, n.params


def multiply_adds(model, image_size: int) -> int:
  """Multiply-adds that `model` executes on one `image_size` x `image_size` image.

  Convolutions and the classifier only (no BN, ReLU, pooling or biases). Unlike `count`, the
  training form's learned group convolutions count dense: that is what the masked model runs.
  For CondenseNet-86 on 32x32 images: 173M (training form) against 62M (condensed).

  Raises:
    TypeError, ValueError: as `count`.
  """
  return _counted(model, image_size, 'multiply_adds').multiply_adds


def per_layer(model, image_size: int) -> list[dict[str, object]]:
  """`count` and `multiply_adds` layer by layer: `{'layer', 'flops', 'params',
  'multiply_adds'}` for the stem (`init_conv`), every dense layer, every transition, the
  final BN-ReLU-pooling (`norm_last`) and the classifier, in order; the columns add up to the
  totals of `count` and `multiply_adds`.

  Raises:
    TypeError, ValueError: as `count`.
  """
  return _counted(model, image_size, 'per_layer').rows


def costs(model, classifier_keep: float = 0.5) -> dict[str, int]:
  """Per image of the model's default size: `flops` and `params` (official convention) and
  `masked_multiply_adds` (really run) of `model`; for a `CondenseNet` or `CondenseNetV2` also
  `condensed_flops`,
  `condensed_params` and `condensed_multiply_adds` of the condensed form that
  `condense.export(model, ..., classifier_keep)` makes.

  Raises:
    TypeError, ValueError: as `count`.
  """
  size = models.default_image_size(model)
  f, p = count(model, size)
  result = {'flops': f, 'params': p, 'masked_multiply_adds': multiply_adds(model, size)}
  small = None
  if isinstance(model, models.CondenseNet):
    small = models.CondensedCondenseNet.from_model(model, classifier_keep)
  elif isinstance(model, models.CondenseNetV2):  # its classifier is not condensed
    small = models.CondensedCondenseNetV2.from_model(model)
  if small is not None:
    f, p = count(small, size)
    result.update(condensed_flops=f, condensed_params=p,
                  condensed_multiply_adds=multiply_adds(small, size))
  return result
