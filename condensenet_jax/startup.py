"""Process start-up: joining a multi-host run, deterministic GPU kernels, the persistent
compilation cache and the workdir check (the XLA options of the programs are in `execution`).

Everything here happens once per process, before the run's programs are built; nothing here
touches the model or the data.
"""

import contextlib
import os
import tempfile
import time
import warnings
from typing import Callable, Optional

import jax


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


@contextlib.contextmanager
def first_compilation(log: Callable[[str], None], what: str = 'training step'):
  """Around the first call of a compiled program: says that it compiles (and where a resumed
  run finds it), then how long compiling and running it took and whether it came from the
  persistent compilation cache."""
  log(f'compiling the {what} ({compile_note()})...')
  started, hits = time.time(), cache_hits()
  yield
  how = 'loaded from the compilation cache' if cache_hits() > hits else 'compiled'
  log(f'{what} {how} and run in {time.time() - started:.1f} s')


def start(config, workdir: str) -> Callable[..., None]:
  """Starts a training process: checks `workdir` (ValueError before anything is written),
  sets deterministic GPU kernels as `config` says, turns on the compilation cache (before the
  first compilation: JAX decides then whether it uses one) and joins the other processes of a
  multi-host run. Returns the log function: `print` on process 0, nothing elsewhere."""
  check_workdir(workdir)
  configure_determinism(config)
  enable_compilation_cache(config, workdir)
  maybe_initialize_distributed()
  if jax.process_index() == 0:
    return lambda *a: print(*a, flush=True)
  return lambda *a: None


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
