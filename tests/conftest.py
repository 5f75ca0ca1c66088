"""Shared test helpers: the official parity fixtures and tiny models."""

import json
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from condensenet_jax import models

# Programs compiled by one test (e.g. the training step of a tiny config) are reused by the
# next ones that build the same program, also in subprocesses that inherit the variable.
_CACHE = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
# The parity tests compare float32 logits with the official ones at 1e-4. JAX's default
# precision runs float32 convolutions and products in TF32 on recent NVIDIA GPUs (up to 6e-4
# relative on the fixtures, on an H200), so the tests ask for true float32 unless the
# environment chooses (JAX_DEFAULT_MATMUL_PRECISION). No effect on CPU.
if 'JAX_DEFAULT_MATMUL_PRECISION' not in os.environ:
  jax.config.update('jax_default_matmul_precision', 'highest')

FIXTURES = pathlib.Path(os.environ.get(
    'CONDENSENET_FIXTURES',
    pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'reference' / 'fixtures'))
FIXTURE_NAMES = ('tiny_cifar_g4', 'tiny_cifar_g2_c4', 'tiny_imagenet_g8')


class Fixture:
  """One official fixture: its config, model, input and state dicts."""

  def __init__(self, name):
    self.name = name
    self.config = json.loads((FIXTURES / f'{name}.json').read_text())
    self.arrays = np.load(FIXTURES / f'{name}.npz')
    c = self.config
    self.model = models.CondenseNet(
        stages=c['stages'], growth=c['growth'], bottleneck=c['bottleneck'],
        group_1x1=c['group_1x1'], group_3x3=c['group_3x3'],
        condense_factor=c['condense_factor'], num_classes=c['num_classes'], stem=c['stem'])
    self.x = jnp.asarray(self.arrays['x_nchw'].transpose(0, 2, 3, 1))  # [n, h, w, 3]
    self.condense_factor = c['condense_factor']

  def state_dict(self, prefix):
    return {k[len(prefix) + 1:]: self.arrays[k] for k in self.arrays.files
            if k.startswith(prefix + '/')}


def _fixtures_or_skip():
  if FIXTURES.is_dir():
    return
  message = f'official parity fixtures not found at {FIXTURES} (set CONDENSENET_FIXTURES)'
  if os.environ.get('CI'):
    pytest.fail(message)
  pytest.skip(message)


@pytest.fixture(scope='session', params=FIXTURE_NAMES)
def fixture(request):
  _fixtures_or_skip()
  return Fixture(request.param)


@pytest.fixture(scope='session')
def fixture_by_name():
  _fixtures_or_skip()
  cache = {}
  def get(name):
    if name not in cache:
      cache[name] = Fixture(name)
    return cache[name]
  return get


def max_relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def randomize(variables, seed, *, bn=True):
  """Random weights and BN statistics (keeps masks), so that tests are not near-trivial."""
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    names = [getattr(p, 'key', '') for p in path]
    x = np.asarray(x)
    if names[0] == 'masks' or not bn and names[0] == 'batch_stats':
      return x
    if names[-1] == 'var':
      return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
    if names[-1] == 'scale':
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    return rng.normal(0, 0.3, x.shape).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, variables)
