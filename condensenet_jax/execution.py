"""The execution policy: how the network and the run's programs execute on each backend.

Every choice that changes speed but not the function computed lives here, with its rule and
its thresholds: the lowering of grouped convolutions (`resolve_lowering`), whether condensed
1x1 convolutions gather their inputs (`skips_gathers`), how dense blocks collect features
(`resolve_dense_blocks`), the examples per inference pass (`eval_chunk`) and the XLA options of
the compiled programs (`compiler_options`). Each rule takes the backend of the devices that run
the program; `default_backend` (JAX's) is the fallback, and the only place that asks JAX. The
evidence for every rule is in docs/backends.md.
"""

import functools
import warnings
from typing import Optional

import jax
import numpy as np


def default_backend() -> str:
  """JAX's default backend ('cpu', 'gpu', 'tpu'), for callers that name none."""
  return jax.default_backend()


LOWERINGS = ('grouped', 'block_diagonal', 'per_group')


# On CPU, in eval mode, the condensed model's 1x1 group convolutions over maps of at most this
# many pixels run group by group (`CondensedConv._per_group`: per-group gathers and matmuls);
# on larger maps they skip their gathers (`CPU_GATHER_FREE_MIN_PIXELS`) or run one
# block-diagonal matmul.
# Chosen by measurement: docs/backends.md#cpu-per-group-max-pixels.
CPU_PER_GROUP_MAX_PIXELS = 256


def resolve_lowering(lowering: str, pixels: Optional[int] = None, condensed: bool = False,
                     backend: Optional[str] = None) -> str:
  """Returns the grouped-convolution lowering to use on `backend` (default: JAX's).

  'grouped' is XLA's `feature_group_count` convolution (what TPUs run natively);
  'block_diagonal' runs one dense convolution with a kernel whose off-diagonal blocks are zero;
  'per_group' runs the groups as a batch of per-group matmuls (1x1) or separate convolutions.
  All three compute the same function. 'auto' picks:
    - TPU: 'grouped';
    - GPU: 'block_diagonal';
    - CPU: 'block_diagonal', except 'per_group' for the condensed model's 1x1 convolutions
      (`condensed`) over maps of at most `CPU_PER_GROUP_MAX_PIXELS` pixels (`pixels`, when
      given: the layer passes it in eval mode only).
  Chosen by measurement: docs/backends.md#conv-lowering.

  Args:
    lowering: 'auto' or one of `LOWERINGS`.
    pixels: map height x width of the convolution's input, or None (training).
    condensed: whether the convolution is a condensed model's 1x1 group convolution.
    backend: 'cpu', 'gpu', 'tpu', ...; default `default_backend()`.
  Returns:
    One of `LOWERINGS`; an explicit `lowering` is returned as it is.
  Raises:
    ValueError: `lowering` is neither 'auto' nor one of `LOWERINGS`.
  """
  if lowering == 'auto':
    backend = backend or default_backend()
    if backend == 'tpu':
      return 'grouped'
    if backend != 'cpu':
      return 'block_diagonal'
    small = pixels is not None and pixels <= CPU_PER_GROUP_MAX_PIXELS
    return 'per_group' if small and condensed else 'block_diagonal'
  if lowering not in LOWERINGS:
    raise ValueError(f'conv_lowering={lowering!r} is not one of '
                     f"{('auto',) + LOWERINGS}.")
  return lowering


GATHER_FORMS = ('keep', 'skip')


# With gathers='auto', on CPU, in eval mode, condensed 1x1 convolutions over maps of more than
# this many pixels run without their channel gather (`CondensedConv`); smaller maps keep it.
# Chosen by measurement: docs/backends.md#cpu-gather-free-min-pixels.
CPU_GATHER_FREE_MIN_PIXELS = 64


def skips_gathers(gathers: str, pixels: int, train: bool, backend: Optional[str] = None) -> bool:
  """Whether a condensed 1x1 convolution over maps of `pixels` pixels skips its channel gather.

  `gathers`: 'keep'; 'skip' (eval mode only: training always gathers, since the copies of a
  channel that several groups read get gradients of their own); or 'auto', which skips in
  eval mode on CPU (`backend`, default: JAX's) on maps of more than
  `CPU_GATHER_FREE_MIN_PIXELS` pixels and keeps the gathers elsewhere. Both forms compute the
  same function when the copies of a channel share their BN terms
  (`condense.check_gathered_norms`). Chosen by measurement: docs/backends.md#gathers.

  Raises:
    ValueError: `gathers` is not 'auto', 'keep' or 'skip'.
  """
  if gathers not in ('auto',) + GATHER_FORMS:
    raise ValueError(f'gathers={gathers!r} is not one of {("auto",) + GATHER_FORMS}.')
  if train:
    return False
  if gathers == 'auto':
    return (backend or default_backend()) == 'cpu' and pixels > CPU_GATHER_FREE_MIN_PIXELS
  return gathers == 'skip'


DENSE_BLOCK_FORMS = ('concatenate', 'preallocate')


def resolve_dense_blocks(dense_blocks: str, train: bool, backend: Optional[str] = None) -> str:
  """How a dense block collects its layers' features: 'concatenate' (each layer's new features
  are concatenated onto a copy of everything before them) or 'preallocate' (one buffer of the
  block's final width, into which each layer writes its features in place). The two compute
  the same function. 'auto' picks 'preallocate' in eval mode on CPU (`backend`, default:
  JAX's), 'concatenate' otherwise. Chosen by measurement: docs/backends.md#dense-blocks.

  Raises:
    ValueError: `dense_blocks` is not 'auto' or one of `DENSE_BLOCK_FORMS`.
  """
  if dense_blocks == 'auto':
    cpu = (backend or default_backend()) == 'cpu'
    return 'preallocate' if cpu and not train else 'concatenate'
  if dense_blocks not in DENSE_BLOCK_FORMS:
    raise ValueError(f'dense_blocks={dense_blocks!r} is not one of '
                     f"{('auto',) + DENSE_BLOCK_FORMS}.")
  return dense_blocks


CPU_CONVOLUTIONS = ('xla', 'ynnpack')


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


def compiler_options(config, backend: Optional[str] = None) -> Optional[dict]:
  """XLA options of the run's compiled programs on `backend` (default: JAX's).

  `config.cpu_convolutions` says which kernels run convolutions on a CPU: 'xla' (default; XLA's
  own, and LLVM at optimization level 1: `CPU_COMPILER_OPTIONS`) or 'ynnpack' (what this JAX
  does by itself, at its default level). Other backends get no options. A JAX that does not
  know the options gets none either, with a warning.
  Chosen by measurement: docs/backends.md#cpu-convolutions.

  Raises:
    ValueError: `config.cpu_convolutions` is not one of `CPU_CONVOLUTIONS`.
  """
  choice = cpu_convolutions(config)
  if (backend or default_backend()) != 'cpu' or choice == 'ynnpack':
    return None
  return dict(CPU_COMPILER_OPTIONS) if _cpu_compiler_options_supported() else None


def cpu_convolutions(config) -> str:
  """`config.cpu_convolutions`, checked: one of `CPU_CONVOLUTIONS`, else ValueError."""
  choice = config.cpu_convolutions
  if choice not in CPU_CONVOLUTIONS:
    raise ValueError(f'config.cpu_convolutions={choice!r} is not one of {CPU_CONVOLUTIONS}.')
  return choice


@functools.lru_cache(maxsize=None)
def _cpu_compiler_options_supported() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f'This JAX does not take the XLA option {CPU_COMPILER_OPTIONS} ({e}); '
                  "convolutions run on XLA's default CPU kernels, as with "
                  "config.cpu_convolutions='ynnpack'.", stacklevel=3)
    return False
  return True


# Inference on CPU runs in chunks of this many examples (the activations of a chunk stay in
# cache); other backends take the whole per-device batch at once.
# Chosen by measurement: docs/backends.md#eval-chunk.
CPU_EVAL_CHUNK = 32


def eval_chunk(config, backend: Optional[str] = None) -> int:
  """Examples per inference pass on each device (0: the whole per-device batch).

  `config.eval_chunk` when it is 0 or more; for -1 (default) `CPU_EVAL_CHUNK` on CPU
  (`backend`, default: JAX's) and 0 elsewhere.
  """
  chunk = config.eval_chunk
  if chunk < 0:
    return CPU_EVAL_CHUNK if (backend or default_backend()) == 'cpu' else 0
  return chunk
