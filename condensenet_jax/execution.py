"""The execution policy: how the network and the run's programs execute on each backend.

Every choice that changes speed but not the function computed lives here, as one frozen
`Execution` resolved for the backend of the devices that run the program: the lowering of
grouped convolutions, the form of the condensed 1x1 convolutions (with or without their channel
gathers, group by group or as one matrix product), how dense blocks collect features, the
examples per inference pass and the XLA options of the compiled programs. Models and layers
receive its resolved choices and never ask JAX for the backend; `default_backend` (JAX's) is
the fallback of an `Execution` built without one, and the only place that asks. The evidence
for every rule and threshold is in docs/backends.md.
"""

import dataclasses
import functools
import warnings
from typing import Optional

import jax
import numpy as np


def default_backend() -> str:
  """JAX's default backend ('cpu', 'gpu', 'tpu'), for an `Execution` that names none."""
  return jax.default_backend()


LOWERINGS = ('grouped', 'block_diagonal', 'per_group')
CONDENSED_GATHERS = ('keep', 'skip')
DENSE_BLOCK_FORMS = ('concatenate', 'preallocate')
LAYOUTS = ('channels_last', 'channel_major')
CPU_CONVOLUTIONS = ('xla', 'ynnpack')

# On CPU, in eval mode, the condensed model's 1x1 group convolutions over maps of more than
# this many pixels skip their channel gathers (under condensed_gathers='auto').
# Chosen by measurement: docs/backends.md#cpu-gather-free-min-pixels.
CPU_GATHER_FREE_MIN_PIXELS = 64

# On CPU, in eval mode, the condensed model's 1x1 group convolutions that keep their gathers
# run group by group on maps of at most this many pixels, else as one block-diagonal matrix
# product. Under condensed_gathers='auto' only maps of at most CPU_GATHER_FREE_MIN_PIXELS keep
# their gathers, so this bound matters only with condensed_gathers='keep'.
# Chosen by measurement: docs/backends.md#cpu-per-group-max-pixels.
CPU_PER_GROUP_MAX_PIXELS = 256

# Inference on CPU runs in chunks of this many examples (the activations of a chunk stay in
# cache); other backends take the whole per-device batch at once.
# Chosen by measurement: docs/backends.md#eval-chunk.
CPU_EVAL_CHUNK = 32

# XLA's CPU backend (JAX 0.10) hands matrix products, convolutions and reductions to YNNPACK
# (`xla_cpu_experimental_ynn_fusion_type`). These options keep the products and reductions
# there and give the convolutions back to XLA's own kernels; they also lower LLVM's
# optimization level from 2 to 1 (`xla_backend_optimization_level`), which shortens
# compilation. Options of the run's compiled programs only, not XLA_FLAGS: nothing else in
# the process changes.
# Chosen by measurement: docs/backends.md#cpu-compiler-options.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                         'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
                         'xla_backend_optimization_level': 1}


def _check_choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{field}={value!r} is not one of {tuple(allowed)}.')


@dataclasses.dataclass(frozen=True)
class Execution:
  """How a network and a run's programs execute: every speed-only choice, one hashable value.

  The fields are the user's choices; 'auto' (and -1 for `eval_chunk`) leave the choice to the
  rules below, applied for `backend` ('cpu', 'gpu', 'tpu'; None: JAX's default backend when a
  rule is applied). Every choice computes the same function.

  - `conv_lowering`: how grouped convolutions run ('auto' or one of `LOWERINGS`; `lowering`,
    `condensed_conv`).
  - `dense_block_form`: how dense blocks collect their features ('auto' or one of
    `DENSE_BLOCK_FORMS`; `dense_blocks`).
  - `condensed_gathers`: whether the condensed model's 1x1 convolutions gather their kept
    input channels in eval mode ('auto' or one of `CONDENSED_GATHERS`; `condensed_conv`); under
    'keep' a condensed CondenseNetV2's SFRs also place their outputs by gathers
    (`sfr_placement`).
  - `condensed_layout`: the layout the condensed model's dense blocks compute in, in eval mode
    ('auto' or one of `LAYOUTS`; `condensed_blocks`).
  - `cpu_convolutions`: which kernels run convolutions on a CPU (one of `CPU_CONVOLUTIONS`;
    `compiler_options`).
  - `eval_chunk`: examples per inference pass on each device (0: all; -1: by backend;
    `inference_chunk`).

  Raises:
    ValueError: a field outside its choices, naming the field and the choices.
  """
  backend: Optional[str] = None
  conv_lowering: str = 'auto'
  dense_block_form: str = 'auto'
  condensed_gathers: str = 'auto'
  condensed_layout: str = 'auto'
  cpu_convolutions: str = 'xla'
  eval_chunk: int = -1

  def __post_init__(self):
    _check_choice('conv_lowering', self.conv_lowering, ('auto',) + LOWERINGS)
    _check_choice('dense_block_form', self.dense_block_form, ('auto',) + DENSE_BLOCK_FORMS)
    _check_choice('condensed_gathers', self.condensed_gathers, ('auto',) + CONDENSED_GATHERS)
    _check_choice('condensed_layout', self.condensed_layout, ('auto',) + LAYOUTS)
    _check_choice('cpu_convolutions', self.cpu_convolutions, CPU_CONVOLUTIONS)
    if not isinstance(self.eval_chunk, int) or self.eval_chunk < -1:
      raise ValueError(f'eval_chunk={self.eval_chunk!r} must be an integer >= -1 (0: the whole '
                       'per-device batch, -1: by backend).')

  @classmethod
  def from_config(cls, config, backend: Optional[str] = None) -> 'Execution':
    """The `Execution` of `config.execution` (a ConfigDict with this class's fields but
    `backend`) for `backend`; a field the config lacks (a config written before the field
    existed) takes its default. Raises ValueError as the constructor, naming
    `config.execution`."""
    fields = {f.name: config.execution[f.name] for f in dataclasses.fields(cls)
              if f.name != 'backend' and f.name in config.execution}
    try:
      return cls(backend=backend, **fields)
    except ValueError as e:
      raise ValueError(f'config.execution.{e}') from None

  def for_backend(self, backend: str) -> 'Execution':
    """The same choices, resolved for `backend`."""
    return dataclasses.replace(self, backend=backend)

  @property
  def platform(self) -> str:
    """The backend the rules are applied for."""
    return self.backend or default_backend()

  def lowering(self) -> str:
    """The lowering of the grouped convolutions outside the condensed 1x1 ones (one of
    `LOWERINGS`): an explicit `conv_lowering` as it is; 'auto' gives 'grouped' (XLA's
    `feature_group_count`) on TPU and 'block_diagonal' elsewhere.
    Chosen by measurement: docs/backends.md#conv-lowering."""
    if self.conv_lowering != 'auto':
      return self.conv_lowering
    return 'grouped' if self.platform == 'tpu' else 'block_diagonal'

  def condensed_conv(self, pixels: int, train: bool) -> str:
    """How a condensed 1x1 group convolution over maps of `pixels` pixels runs:
    'gather_free' (no channel gather; eval mode only) or one of `LOWERINGS` after its gather.

    Training always gathers (the copies of a channel that several groups read get gradients
    of their own) and takes `lowering()`. In eval mode, on CPU with 'auto' choices:

    | map pixels | condensed_gathers='auto' | 'keep' |
    |---|---|---|
    | at most `CPU_GATHER_FREE_MIN_PIXELS` | 'per_group' | 'per_group' |
    | up to `CPU_PER_GROUP_MAX_PIXELS` | 'gather_free' | 'per_group' |
    | more | 'gather_free' | 'block_diagonal' |

    'skip' is 'gather_free' at every size; other backends keep their gathers under 'auto' and
    take `lowering()`. An explicit `conv_lowering` is used wherever the gathers are kept.
    Chosen by measurement: docs/backends.md#gathers, docs/backends.md#conv-lowering.
    """
    if train:
      return self.lowering()
    cpu = self.platform == 'cpu'
    if self.condensed_gathers == 'skip' or (
        self.condensed_gathers == 'auto' and cpu and pixels > CPU_GATHER_FREE_MIN_PIXELS):
      return 'gather_free'
    if self.conv_lowering == 'auto' and cpu:
      return 'per_group' if pixels <= CPU_PER_GROUP_MAX_PIXELS else 'block_diagonal'
    return self.lowering()

  def condensed_blocks(self, train: bool) -> str:
    """The layout the condensed model's dense blocks compute in (one of `LAYOUTS`).

    'channels_last' is `[n, h, w, c]`, every other choice of this class applying. In
    'channel_major' (eval mode only) a block's features are one `[c, n, h, w]` buffer: a layer
    gathers whole rows of it, runs its 1x1 group convolution as one batched matrix product and
    its 3x3 group convolution as one batched product followed by a sum of shifted maps, with
    no padding to a dense kernel and no transposes inside the block (a CondenseNetV2's SFRs
    scatter-add whole rows into it). Training is always
    'channels_last'; an explicit `condensed_layout` is used as it is in eval mode; 'auto' is
    'channel_major' on CPU unless `conv_lowering` or `condensed_gathers` choose a form of the
    channels-last layout, and 'channels_last' elsewhere.
    Chosen by measurement: docs/backends.md#condensed-layout."""
    if train:
      return 'channels_last'
    if self.condensed_layout != 'auto':
      return self.condensed_layout
    cpu_auto = (self.platform == 'cpu' and self.conv_lowering == 'auto'
                and self.condensed_gathers == 'auto')
    return 'channel_major' if cpu_auto else 'channels_last'

  def sfr_placement(self) -> str:
    """How a condensed CondenseNetV2's SFRs add their outputs into the layer input
    (`layers.CondensedSFR`): 'gather' under `condensed_gathers='keep'` (every condensed layer
    works through channel gathers, no scatters: the TFLite export), else 'scatter'."""
    return 'gather' if self.condensed_gathers == 'keep' else 'scatter'

  def dense_blocks(self, train: bool) -> str:
    """How dense blocks collect their features (one of `DENSE_BLOCK_FORMS`): 'concatenate'
    (each layer's new features concatenated onto a copy of everything before them) or
    'preallocate' (one buffer of the block's final width, written in place). An explicit
    `dense_block_form` as it is; 'auto' preallocates in eval mode on CPU and concatenates
    otherwise. Chosen by measurement: docs/backends.md#dense-blocks."""
    if self.dense_block_form != 'auto':
      return self.dense_block_form
    return 'preallocate' if self.platform == 'cpu' and not train else 'concatenate'

  def inference_chunk(self) -> int:
    """Examples per inference pass on each device (0: the whole per-device batch):
    `eval_chunk` when it is 0 or more; for -1 `CPU_EVAL_CHUNK` on CPU and 0 elsewhere.
    Chosen by measurement: docs/backends.md#eval-chunk."""
    if self.eval_chunk >= 0:
      return self.eval_chunk
    return CPU_EVAL_CHUNK if self.platform == 'cpu' else 0

  def compiler_options(self) -> Optional[dict]:
    """XLA options of the run's compiled programs: on CPU with cpu_convolutions='xla', XLA's
    own convolution kernels and LLVM at optimization level 1 (`CPU_COMPILER_OPTIONS`); None
    for 'ynnpack' (what this JAX does by itself) and on other backends. A JAX that does not
    know the options gets none either, with a warning.
    Chosen by measurement: docs/backends.md#cpu-convolutions."""
    if self.platform != 'cpu' or self.cpu_convolutions == 'ynnpack':
      return None
    return dict(CPU_COMPILER_OPTIONS) if _cpu_compiler_options_supported() else None


@functools.lru_cache(maxsize=None)
def _cpu_compiler_options_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f'This JAX does not take the XLA option {CPU_COMPILER_OPTIONS} ({e}); '
                  "convolutions run on XLA's default CPU kernels, as with "
                  "cpu_convolutions='ynnpack'.", stacklevel=3)
    return False
  return True
