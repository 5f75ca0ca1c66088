"""Shared test helpers: the official parity fixtures and tiny models."""

import functools
import json
import os
import pathlib
import re
import subprocess
import sys
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

# The official parity fixtures (README.md in this folder's `fixtures/` describes them and how
# `fixtures/make_fixtures.py` regenerates them); CONDENSENET_FIXTURES may name another folder.
FIXTURES = pathlib.Path(os.environ.get('CONDENSENET_FIXTURES',
                                       pathlib.Path(__file__).resolve().parent / 'fixtures'))
FIXTURE_NAMES = ('tiny_cifar_g4', 'tiny_cifar_g2_c4', 'tiny_imagenet_g8')
# The CondenseNetV2 fixtures (fixtures/make_v2_fixtures.py, from the official V2 code).
V2_FIXTURE_NAMES = ('v2_tiny_cifar', 'v2_tiny_cifar_g2', 'v2_tiny_imagenet')


class Fixture:
  """One official fixture: its config, model, input and state dicts.

  Attributes:
    name: the fixture's name (one of FIXTURE_NAMES or V2_FIXTURE_NAMES).
    config: the `.json` dict (configuration, events, official FLOPs/params).
    arrays: every `.npz` entry by key, as stored (state{k} for k >= 1 holds only the entries
      that changed at event k: read state dicts with `state_dict`).
    model: the CondenseNet (or CondenseNetV2) of the configuration.
    x: the input batch, NHWC float32.
    condense_factor: C; the states are state0 .. state{C-1}.
  """

  def __init__(self, name):
    self.name = name
    paths = [FIXTURES / f'{name}.json', FIXTURES / f'{name}.npz']
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
      script = 'make_v2_fixtures.py' if name in V2_FIXTURE_NAMES else 'make_fixtures.py'
      raise FileNotFoundError(
          f'official parity fixture {name} is missing ({", ".join(missing)}): regenerate it '
          f'with `python tests/fixtures/{script} --official-dir PATH_TO_CHECKOUT` or '
          f'point CONDENSENET_FIXTURES at a folder that holds it')
    self.config = json.loads(paths[0].read_text())
    with np.load(paths[1]) as npz:
      self.arrays = {k: npz[k] for k in npz.files}
    c = self.config
    common = dict(stages=c['stages'], growth=c['growth'], bottleneck=c['bottleneck'],
                  group_1x1=c['group_1x1'], group_3x3=c['group_3x3'],
                  condense_factor=c['condense_factor'], num_classes=c['num_classes'],
                  stem=c['stem'])
    if 'trans_factor' in c:  # the official V2 arguments
      self.model = models.CondenseNetV2(
          group_trans=c['group_trans'], trans_factor=c['trans_factor'],
          hs_start_block=c['HS_start_block'], se_start_block=c['SE_start_block'],
          last_se_reduction=c['last_se_reduction'], fc_channel=c['fc_channel'], **common)
    else:
      self.model = models.CondenseNet(**common)
    self.x = jnp.asarray(self.arrays['x_nchw'].transpose(0, 2, 3, 1))  # [n, h, w, 3]
    self.condense_factor = c['condense_factor']

  def stored(self, prefix):
    """The entries stored under `prefix/`, keyed without the prefix (no copies)."""
    return {k[len(prefix) + 1:]: v for k, v in self.arrays.items() if k.startswith(prefix + '/')}

  def state_dict(self, prefix):
    """The full official state dict saved under `prefix`, as a fresh dict of array copies.

    Args:
      prefix: 'state{k}' (k = 0 .. C-1: the training-form model after condensing event k,
        rebuilt as state0 updated with the changes of state1 .. state{k}) or 'converted'.

    Returns:
      {official state-dict key: numpy array}; callers may modify it and its arrays.

    Raises:
      KeyError: nothing is stored under `prefix` (or one of the states it builds on).
    """
    match = re.fullmatch(r'state(\d+)', prefix)
    chain = [f'state{j}' for j in range(int(match[1]) + 1)] if match else [prefix]
    state = {}
    for part in chain:
      entries = self.stored(part)
      if not entries:
        raise KeyError(f'fixture {self.name} stores nothing under {part}/')
      state.update(entries)
    return {k: v.copy() for k, v in state.items()}


@functools.lru_cache(maxsize=None)
def load_fixture(name):
  """The Fixture `name`, loaded once per session; a missing fixture fails the test."""
  try:
    return Fixture(name)
  except FileNotFoundError as e:
    message = str(e)
  pytest.fail(message, pytrace=False)


@pytest.fixture(scope='session', params=FIXTURE_NAMES)
def fixture(request):
  return load_fixture(request.param)


@pytest.fixture(scope='session', params=V2_FIXTURE_NAMES)
def v2_fixture(request):
  return load_fixture(request.param)


@pytest.fixture(scope='session', params=FIXTURE_NAMES + V2_FIXTURE_NAMES)
def any_fixture(request):
  """Every official fixture, CondenseNet's and CondenseNetV2's."""
  return load_fixture(request.param)


@pytest.fixture(scope='session')
def fixture_by_name():
  return load_fixture


def regenerate(tmp_path_factory, script, env_var: str, repository: str, *args) -> pathlib.Path:
  """The folder where the fixture `script` wrote its fixtures afresh from the official checkout
  named by `env_var`; skips without PyTorch or without the variable."""
  pytest.importorskip('torch', reason=f'{script.name} runs the official PyTorch code, and '
                                      'PyTorch is not installed')
  official = os.environ.get(env_var)
  if not official:
    pytest.skip(f'{env_var} is not set: point it at a checkout of the official {repository} '
                f'code to check that tests/fixtures/{script.name} reproduces the fixtures')
  out = tmp_path_factory.mktemp(script.stem)
  run = subprocess.run([sys.executable, str(script), '--official-dir', official, '--out',
                        str(out), *args], capture_output=True, text=True, timeout=600,
                       check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  return out


# Fixture entries that are outputs of the official model's forward pass: PyTorch's CPU kernels
# sum in an order that depends on the CPU's vector units, so a regeneration on another CPU may
# differ from the committed numbers in the last bits (docs/parity.md).
FORWARD_OUTPUTS = ('logits', 'converted_logits')
FORWARD_TOLERANCE = 1e-6  # relative to the largest magnitude of the array


def assert_npz_reproduced(made: pathlib.Path, committed: pathlib.Path) -> None:
  """The regenerated npz `made` holds the entries of `committed`, in order: the forward
  outputs (`FORWARD_OUTPUTS`) within `FORWARD_TOLERANCE`, every other entry bit for bit (numpy
  header and data; the compressed container bytes depend on the zlib build)."""
  with np.load(made) as new, np.load(committed) as old:
    assert new.files == old.files
    exact = [n for n in old.files if not n.startswith(FORWARD_OUTPUTS)]
    differ = [n for n in exact if new[n].dtype != old[n].dtype or new[n].shape != old[n].shape
              or not np.array_equal(new[n], old[n])]
    assert not differ, f'{len(differ)} entries differ, e.g. {differ[:5]}'
    for n in old.files:
      if n.startswith(FORWARD_OUTPUTS):
        assert new[n].shape == old[n].shape, n
        assert max_relative_error(new[n], old[n]) <= FORWARD_TOLERANCE, n


# Sums the official code computes in float32 (the group-lasso penalties of the fixture .json
# files): their last digits depend on how the CPU vectorizes the reduction.
FLOAT_SUM_KEYS = ('group_lasso', 'group_lasso_lgc', 'group_lasso_sfr')


def assert_json_reproduced(made: pathlib.Path, committed: pathlib.Path) -> None:
  """The regenerated fixture .json `made` equals `committed`: the same structure and values,
  the float32 sums under `FLOAT_SUM_KEYS` within `FORWARD_TOLERANCE` relative, the rest
  exactly."""
  def compare(new, old, where):
    assert type(new) is type(old), where
    if isinstance(old, dict):
      assert list(new) == list(old), where
      for k in old:
        if k in FLOAT_SUM_KEYS and isinstance(old[k], float):
          assert abs(new[k] - old[k]) <= FORWARD_TOLERANCE * abs(old[k]), f'{where}.{k}'
        else:
          compare(new[k], old[k], f'{where}.{k}')
    elif isinstance(old, list):
      assert len(new) == len(old), where
      for i, (a, b) in enumerate(zip(new, old)):
        compare(a, b, f'{where}[{i}]')
    else:
      assert new == old, where
  compare(json.loads(made.read_text()), json.loads(committed.read_text()), made.name)


def official_stage(progress, condense_factor):
  """The official `_check_drop` stage rule, in floating point, for comparison."""
  for i in range(condense_factor - 1):
    if progress * 2 < (i + 1) / (condense_factor - 1):
      return i
  return condense_factor - 1


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
