"""Tests for condensenet_jax.execution: the per-backend rules and their thresholds."""

import dataclasses

import jax
import ml_collections
import pytest

from condensenet_jax import execution
from condensenet_jax.execution import Execution


def test_lowering_rule():
  assert Execution(backend='gpu').lowering() == 'block_diagonal'
  assert Execution(backend='cpu').lowering() == 'block_diagonal'
  assert Execution(backend='tpu').lowering() == 'grouped'
  assert Execution(backend='gpu', conv_lowering='per_group').lowering() == 'per_group'
  assert Execution().lowering() == Execution(backend=jax.default_backend()).lowering()


def test_condensed_conv_rule_on_cpu_is_one_table():
  auto, keep = Execution(backend='cpu'), Execution(backend='cpu', condensed_gathers='keep')
  small = execution.CPU_GATHER_FREE_MIN_PIXELS
  middle = execution.CPU_PER_GROUP_MAX_PIXELS
  large = 32 * 32
  assert small < middle < large
  assert [auto.condensed_conv(p, train=False) for p in (small, middle, large)] == [
      'per_group', 'gather_free', 'gather_free']
  assert [keep.condensed_conv(p, train=False) for p in (small, middle, large)] == [
      'per_group', 'per_group', 'block_diagonal']
  skip = Execution(backend='cpu', condensed_gathers='skip')
  assert {skip.condensed_conv(p, train=False) for p in (1, small, large)} == {'gather_free'}
  explicit = Execution(backend='cpu', conv_lowering='grouped')
  assert explicit.condensed_conv(small, train=False) == 'grouped'
  assert explicit.condensed_conv(large, train=False) == 'gather_free'


def test_condensed_conv_rule_in_training_and_elsewhere():
  for gathers in ('auto', 'skip', 'keep'):  # training always gathers
    policy = Execution(backend='cpu', condensed_gathers=gathers)
    assert policy.condensed_conv(32 * 32, train=True) == 'block_diagonal'
  for backend, lowering in (('gpu', 'block_diagonal'), ('tpu', 'grouped')):
    assert Execution(backend=backend).condensed_conv(32 * 32, train=False) == lowering
    assert Execution(backend=backend).condensed_conv(4, train=False) == lowering
    assert Execution(backend=backend, condensed_gathers='skip').condensed_conv(
        4, train=False) == 'gather_free'


def test_dense_blocks_rule():
  assert Execution(backend='cpu').dense_blocks(train=False) == 'preallocate'
  assert Execution(backend='cpu').dense_blocks(train=True) == 'concatenate'
  assert Execution(backend='gpu').dense_blocks(train=False) == 'concatenate'
  explicit = Execution(backend='gpu', dense_block_form='preallocate')
  assert explicit.dense_blocks(train=True) == 'preallocate'


def test_condensed_blocks_rule():
  assert Execution(backend='cpu').condensed_blocks(train=False) == 'channel_major'
  assert Execution(backend='cpu').condensed_blocks(train=True) == 'channels_last'
  assert Execution(backend='gpu').condensed_blocks(train=False) == 'channels_last'
  # A choice of the channels-last forms keeps that layout under 'auto'.
  for choice in ({'conv_lowering': 'grouped'}, {'condensed_gathers': 'keep'}):
    assert Execution(backend='cpu', **choice).condensed_blocks(train=False) == 'channels_last'
  explicit = Execution(backend='gpu', condensed_layout='channel_major')
  assert explicit.condensed_blocks(train=False) == 'channel_major'
  assert explicit.condensed_blocks(train=True) == 'channels_last'


def test_inference_chunk_and_compiler_options():
  assert Execution(backend='cpu').inference_chunk() == execution.CPU_EVAL_CHUNK
  assert Execution(backend='gpu').inference_chunk() == 0
  assert Execution(backend='cpu', eval_chunk=5).inference_chunk() == 5
  assert Execution(backend='cpu').compiler_options() == execution.CPU_COMPILER_OPTIONS
  assert Execution(backend='cpu', cpu_convolutions='ynnpack').compiler_options() is None
  assert Execution(backend='gpu').compiler_options() is None


@pytest.mark.parametrize('field,value', [
    ('conv_lowering', 'fast'), ('dense_block_form', 'buffer'), ('condensed_gathers', 'fold'),
    ('condensed_layout', 'nchw'),
    ('cpu_convolutions', 'mkl'), ('eval_chunk', -2)])
def test_unknown_choices_are_named(field, value):
  with pytest.raises(ValueError, match=f'{field}={value!r}'):
    Execution(**{field: value})
  config = ml_collections.ConfigDict({'execution': {
      f.name: f.default for f in dataclasses.fields(Execution) if f.name != 'backend'}})
  config.execution[field] = value
  with pytest.raises(ValueError, match=f'config.execution.{field}={value!r}'):
    Execution.from_config(config, 'cpu')


def test_execution_is_a_hashable_value():
  assert Execution(backend='cpu') == Execution(backend='cpu')
  assert hash(Execution(backend='cpu')) == hash(Execution(backend='cpu'))
  assert Execution().for_backend('tpu') == Execution(backend='tpu')
