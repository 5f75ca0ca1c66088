"""Process start-up: joining a multi-host run, XLA options of the compiled programs,
deterministic GPU kernels, the persistent compilation cache and the workdir check.

Everything here happens once per process, before the run's programs are built; nothing here
touches the model or the data.
"""

import functools
import os
import tempfile
import warnings
from typing import Optional

import jax
import numpy as np


def maybe_initialize_distributed() -> None:
  """Joins a multi-host run when launched as one of several processes.

  Explicitly with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; or through
  JAX's cluster detection on a TPU pod slice, under SLURM or under Open MPI. A single process
  needs nothing.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if 'JAX_COORDINATOR_ADDRESS' in env:
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  elif (int(env.get('SLURM_NTASKS', '1')) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
        or ',' in env.get('TPU_WORKER_HOSTNAMES', '')):
    jax.distributed.initialize()


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
  if (backend or jax.default_backend()) != 'cpu' or choice == 'ynnpack':
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


DETERMINISTIC_FLAG = '--xla_gpu_deterministic_ops=true'


def _backends_started() -> bool:
  """Whether JAX has created its backends (after which XLA_FLAGS changes are not read);
  False where this JAX lacks the private helper that tells: setting the flag is then harmless
  if they have started (though the warning below is not given) and needed if they have not."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def configure_determinism(config) -> None:
  """With `config.deterministic` (default), makes XLA's GPU kernels deterministic (scatter
  and reductions in a fixed order). XLA reads the flag when JAX starts its backends, so this
  must run before the first computation."""
  if not config.deterministic or DETERMINISTIC_FLAG in os.environ.get('XLA_FLAGS', ''):
    return
  if _backends_started():
    if jax.default_backend() == 'gpu':
      warnings.warn('config.deterministic=True, but JAX had already started without '
                    f'XLA_FLAGS={DETERMINISTIC_FLAG}: GPU results may vary between runs. '
                    'Set the flag in the environment before starting Python.', stacklevel=2)
    return
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + DETERMINISTIC_FLAG).strip()


def enable_compilation_cache(config, workdir: str) -> Optional[str]:
  """Keeps compiled programs in `config.compilation_cache_dir` (default
  `<workdir>/compilation_cache`; '' turns it off) so that a resumed or repeated run starts
  without compiling again. An existing JAX_COMPILATION_CACHE_DIR is left as it is. Returns the
  directory in use, if any."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  directory = config.compilation_cache_dir
  if directory is None:
    directory = os.path.join(workdir, 'compilation_cache')
  if not directory:
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  return directory


_CACHE_HITS = [0]  # programs loaded from JAX's persistent compilation cache in this process


def _count_cache_hits(event: str, **kwargs) -> None:
  del kwargs
  if event == '/jax/compilation_cache/cache_hits':
    _CACHE_HITS[0] += 1


jax.monitoring.register_event_listener(_count_cache_hits)


def cache_hits() -> int:
  """How many programs this process has loaded from JAX's persistent compilation cache."""
  return _CACHE_HITS[0]


def compile_note() -> str:
  """What the run says before its training step compiles."""
  cache = jax.config.jax_compilation_cache_dir
  return 'once per run, tens of seconds' + (
      f'; a resumed run loads it from {cache}' if cache else '')


def check_workdir(workdir: str) -> None:
  """Raises ValueError, before anything is written, if `workdir` is not a directory that
  exists or can be created."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--workdir {workdir} is a file, not a directory; give a directory.')
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  try:  # a trial directory, removed at once, tells whether `parent` takes new entries
    os.rmdir(tempfile.mkdtemp(dir=parent, prefix='.workdir-check-'))
  except OSError as e:
    raise ValueError(f'--workdir {workdir} cannot be created in {parent} ({e.strerror}); give '
                     'a --workdir in a directory you can write to.') from None
