"""Throughput of training and inference on synthetic data of a config's shapes.

    python -m benchmarks.bench --config configs/cifar.py --mode train --batch-size 64 --steps 20
    python -m benchmarks.bench --config configs/cifar.py --mode infer_condensed --batch-size 256
    python -m benchmarks.bench --config configs/cifar.py --mode train --dtype bfloat16

Modes:
  train            the real compiled training step of `condensenet_jax.train` (group lasso
                   on, masks applied, optimizer update, metrics), at the first stage;
  infer_masked     the training-form model in eval mode (the evaluation program of a run);
  infer_condensed  the exported model after all condensing events (same program).

Images are random uint8 arrays of the config's dataset shape, so nothing is downloaded. Tracing
and compilation (`jit(...).lower(...).compile()`) are timed apart as `compile_s`; then
`--warmup` steps run untimed and `--steps` steps are timed one by one (each waits for its
result). The last line of the output is one JSON object with the figures.
"""

import argparse
import collections.abc
import glob
import gzip
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Optional

MODES = ('train', 'infer_masked', 'infer_condensed')


def load_config(path: str):
  """`get_config()` of a config file, as `train.py --config` reads it."""
  if not os.path.exists(path):
    raise SystemExit(f'error: --config {path} does not exist')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:  # config files import `configs.*`
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def parse_args(argv=None, parser=None, **defaults):
  """The benchmark's flags; `parser` (another tool's, with flags of its own) gets them added,
  and `defaults` replace theirs."""
  parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='a config file, e.g. configs/cifar.py')
  parser.add_argument('--mode', required=True, choices=MODES)
  parser.add_argument('--batch-size', type=int, default=64, help='global batch')
  parser.add_argument('--steps', type=int, default=20, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None,
                      help="compute dtype (default: the config's)")
  parser.add_argument('--conv-lowering', default=None,
                      help="config.execution.conv_lowering (default: the config's, 'auto')")
  parser.add_argument('--dense-block-form', default=None,
                      help="config.execution.dense_block_form: 'concatenate' or 'preallocate' "
                           "(default: the config's, 'auto')")
  parser.add_argument('--condensed-gathers', default=None,
                      help="config.execution.condensed_gathers: 'keep' or 'skip' the condensed "
                           "model's channel gathers (default: the config's, 'auto')")
  parser.add_argument('--condensed-layout', default=None,
                      help="config.execution.condensed_layout: 'channels_last' or "
                           "'channel_major' condensed dense blocks in eval mode (default: the "
                           "config's, 'auto')")
  parser.add_argument('--group-lasso', type=float, default=1e-5,
                      help='lambda used in train mode when the config has none (0: off)')
  parser.add_argument('--cpu-convolutions', choices=('xla', 'ynnpack'), default=None,
                      help="config.execution.cpu_convolutions: which kernels run convolutions "
                           "on a CPU (default: the config's, 'xla')")
  parser.add_argument('--compile-phases', action='store_true',
                      help="trace the compilation with jax.profiler and report XLA's phases "
                           '(HLO passes, kernel emission, code generation) and its kernel count')
  parser.add_argument('--deterministic', choices=('true', 'false'), default=None,
                      help="config.deterministic (default: the config's); it sets XLA's "
                           'deterministic GPU kernels, so it only takes effect in a process '
                           'that has not started JAX yet')
  parser.add_argument('--rand-augment', default=None,
                      help="config.rand_augment for train mode: a timm policy such as "
                           "'rand-m9-mstd0.5', or '' for none (default: the config's)")
  parser.set_defaults(**defaults)
  args = parser.parse_args(argv)
  if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
    parser.error('--batch-size and --steps must be positive and --warmup not negative')
  return args


def emit_json(record: dict, path: Optional[str] = None) -> None:
  """Prints `record` as one JSON line and, with `path`, appends the line to that file."""
  line = json.dumps(record)
  print(line, flush=True)
  if path:
    with open(path, 'a') as f:
      f.write(line + '\n')


def time_steps(fn, steps: int, warmup: int):
  """Per-step seconds of the timed steps."""
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def model_flops(model, mode: str, batch_size: int) -> Optional[float]:
  """Floating-point operations one step needs by the official count of the model's function
  (2 per multiply-add of `flops.count`, the paper's FLOPs), times 3 for a training step
  (forward, and backward for inputs and weights); None for a model it cannot count. This is
  the work of the function, not of a lowering: masked 1x1 weights and zero blocks of
  block-diagonal kernels are not counted, so its ratio to a step's time is the model FLOP
  utilization."""
  from condensenet_jax import flops, models  # pylint: disable=g-import-not-at-top
  if not isinstance(model, (models.CondenseNet, models.DenseNet)):
    return None
  count, _ = flops.count(model, models.default_image_size(model))
  return 2.0 * count * batch_size * (3 if mode == 'train' else 1)


def execution_used(model, mode: str) -> dict:
  """What `model.execution` resolves to for `mode` on the run's backend: the lowering of the
  grouped convolutions, the dense-block form, and (infer_condensed) the form of the condensed
  1x1 convolutions on each block's map size."""
  from condensenet_jax import models  # pylint: disable=g-import-not-at-top
  policy, train = model.execution, mode == 'train'
  used = {'conv_lowering_used': policy.lowering(),
          'dense_block_form_used': policy.dense_blocks(train), 'condensed_conv_used': None}
  if mode == 'infer_condensed':
    used['condensed_layout_used'] = policy.condensed_blocks(train=False)
    stride, _ = models.stem_geometry(model.stem)
    side = models.default_image_size(model) // stride
    sides = [side // 2 ** b for b in range(len(model.stages))]
    used['condensed_conv_used'] = ', '.join(
        f'{s}x{s}: {policy.condensed_conv(s * s, train=False)}' for s in sides)
  return used


def _cost(program) -> dict:
  """XLA's own estimate of one call's floating-point operations and bytes accessed (summed
  over the program's operations), or {} where the backend gives none."""
  try:
    cost = program.cost_analysis()
    if isinstance(cost, (list, tuple)):  # some JAX versions: one dict per computation
      cost = cost[0] if cost else {}
    if not isinstance(cost, collections.abc.Mapping):
      return {}
    return {k: float(cost[k]) for k in ('flops', 'bytes accessed') if k in cost}
  except Exception:  # pylint: disable=broad-except  (a diagnostic: never fail the timing)
    return {}


# Profiler events that mark the phases of XLA's compilation on CPU (JAX 0.10): an event belongs
# to a phase when its name starts with one of the phase's prefixes. Another backend or version
# may name them otherwise; a phase with no event is left out of the record.
COMPILE_PHASES = {
    'hlo_passes_s': ('HLO passes through layout assignment', 'HLO passes after layout assignment'),
    'kernel_emission_s': ('FusionCompiler::Compile',),
    'codegen_s': ('Codegen',),
}


def compile_phases(trace_dir: str) -> dict:
  """The phases of the compilation traced under `trace_dir`: for each, the wall time from its
  first event's start to its last event's end (on any thread), and `kernels`, the number of
  fused kernels XLA emitted (`FusionCompiler::Compile` events)."""
  events = []
  for path in glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True):
    with gzip.open(path) as f:
      events += [e for e in json.load(f)['traceEvents'] if e.get('ph') == 'X']
  found = {}
  for phase, prefixes in COMPILE_PHASES.items():
    spans = [(e['ts'], e['ts'] + e.get('dur', 0.0)) for e in events
             if e['name'].startswith(prefixes)]
    if spans:
      found[phase] = (max(end for _, end in spans) - min(start for start, _ in spans)) / 1e6
  kernels = sum(e['name'] == 'FusionCompiler::Compile' for e in events)
  if kernels:
    found['kernels'] = kernels
  return found


def _compile(lower: Callable[[], Any], phases: bool):
  """`lower().compile()`: the program, the seconds spent tracing and lowering, the seconds
  spent compiling, and (with `phases`) `compile_phases` of a profiler trace of the latter,
  which then bypasses any persistent compilation cache."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  lowered = lower()
  lowered_at = time.perf_counter()
  if not phases:
    program = lowered.compile()
    return program, lowered_at - start, time.perf_counter() - lowered_at, None
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  # A program found in a persistent compilation cache would show no phases: compile afresh.
  # (JAX decides once per process whether it uses the cache; resetting makes it decide again.)
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  try:
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        program = lowered.compile()
      done = time.perf_counter()
      return program, lowered_at - start, done - lowered_at, compile_phases(trace_dir)
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    compilation_cache.reset_cache()


class Prepared(NamedTuple):
  """A compiled benchmark program and what describes it."""
  step: Callable[[], Any]  # one call of the program (the training step carries its state)
  program: Any  # the compiled program (`jax.stages.Compiled`)
  compile_s: float  # tracing, lowering and XLA's compilation
  config: Any
  run: Any  # the `train.Run` it came from
  model: Any  # the training-form model
  eval_model: Any  # the model the program runs
  lower_s: float = 0.0  # tracing and lowering, the part of `compile_s` spent in JAX
  compile_phases: Optional[dict] = None  # `compile_phases`, with --compile-phases


def prepare(args) -> Prepared:
  """Builds the config's run on synthetic data and compiles the program that `args.mode`
  measures."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from condensenet_jax import condense, data, models, startup, train  # pylint: disable=g-import-not-at-top

  config = load_config(args.config)
  config.batch_size = config.eval_batch_size = args.batch_size
  if args.dtype:
    config.dtype = args.dtype
  for field in ('conv_lowering', 'dense_block_form', 'condensed_gathers', 'condensed_layout',
                'cpu_convolutions'):
    if getattr(args, field):
      config.execution[field] = getattr(args, field)
  if args.mode == 'train' and not config.group_lasso:
    config.group_lasso = args.group_lasso
  if args.rand_augment is not None:
    config.rand_augment = args.rand_augment
  if args.deterministic is not None:
    config.deterministic = args.deterministic == 'true'
  # Enough epochs that every timed step is in the first (condensing, lasso-on) stage.
  per_epoch = 4
  config.num_epochs = max(config.num_epochs, 8 * (args.steps + args.warmup + 2) // per_epoch)
  startup.configure_determinism(config)
  dataset = data.synthetic(config.dataset, num_train=per_epoch * args.batch_size,
                           num_test=args.batch_size)
  with tempfile.TemporaryDirectory() as workdir:
    run_ = train.setup(config, workdir, dataset=dataset)
  model = eval_model = run_.model
  state = train.initial_state(run_)
  if args.mode == 'train':
    batches = [train.global_batch(run_, b)
               for _, b in zip(range(2), train.train_batches(run_, 0))]
    program, lower_s, xla_s, phases = _compile(
        lambda: run_.train_step.lower(state, batches[0]), args.compile_phases)
    holder = {'state': state, 'i': 0}

    def step():
      holder['state'], metrics = program(holder['state'], batches[holder['i'] % 2])
      holder['i'] += 1
      return metrics
    fn = step
  else:
    variables = state.variables()
    if args.mode == 'infer_condensed':
      if not models.condenses(model):
        raise SystemExit(f'error: --mode infer_condensed needs a CondenseNet or CondenseNetV2 '
                         f'config, not '
                         f'{type(model).__name__}')
      host = jax.device_get(variables)
      masks = condense.condense_all(host['params'], host['masks'], model)
      eval_model, small = condense.export(model, {**host, 'masks': masks},
                                          classifier_keep=config.classifier_keep)
      variables = train.replicate(small, NamedSharding(run_.mesh, P()))
    images, labels, valid = next(data.eval_batches(dataset.test_images, dataset.test_labels,
                                                   args.batch_size))
    batch = train.global_batch(run_, {'image': images, 'label': labels, 'valid': valid})
    program, lower_s, xla_s, phases = _compile(
        lambda: run_.eval_step(eval_model).lower(variables, batch), args.compile_phases)
    fn = lambda: program(variables, batch)
  return Prepared(fn, program, lower_s + xla_s, config, run_, model, eval_model, lower_s, phases)


def run(args) -> dict:
  """Compiles, warms up and times `args.steps` steps; the figures as a dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from condensenet_jax import startup  # pylint: disable=g-import-not-at-top
  prepared = prepare(args)
  config, model, eval_model = prepared.config, prepared.model, prepared.eval_model
  cost = _cost(prepared.program)
  times = time_steps(prepared.step, args.steps, args.warmup)
  median = float(np.median(times))
  device = jax.devices()[0]
  return {
      'mode': args.mode, 'batch_size': args.batch_size,
      'img_per_s': args.batch_size / median, 'step_ms_median': 1000 * median,
      'step_ms_min': 1000 * min(times), 'step_ms_max': 1000 * max(times),
      'compile_s': prepared.compile_s, 'lower_s': prepared.lower_s,
      'compile_phases': prepared.compile_phases, 'steps': args.steps,
      'train_step_compilations': len(prepared.run.traces) if args.mode == 'train' else None,
      'model_flops': model_flops(model, args.mode, args.batch_size),
      'xla_flops': cost.get('flops'), 'xla_bytes_accessed': cost.get('bytes accessed'),
      'dtype': config.dtype, 'rand_augment': config.rand_augment, **dict(config.execution),
      **execution_used(eval_model, args.mode),
      'compiler_options': model.execution.compiler_options(),
      'deterministic': bool(config.deterministic),
      'xla_deterministic_flag': startup.DETERMINISTIC_FLAG in os.environ.get('XLA_FLAGS', ''),
      'model': type(eval_model).__name__, 'stages': list(model.stages),
      'growth': list(model.growth), 'device': device.device_kind,
      'backend': jax.default_backend(), 'num_devices': jax.device_count(),
      'host': platform.processor() or platform.machine(), 'jax': jax.__version__,
  }


def main(argv=None):
  """Runs the benchmark `argv` describes, prints a summary and the JSON line; returns the
  record."""
  args = parse_args(argv)
  result = run(args)
  print(f"{result['mode']}: {result['model']} {result['stages']}x{result['growth']}, "
        f"batch {result['batch_size']}, {result['dtype']}, {result['num_devices']} x "
        f"{result['device']} ({result['backend']})")
  print(f"  trace + compile: {result['compile_s']:.1f} s (trace and lower "
        f"{result['lower_s']:.1f} s)")
  if result['compile_phases']:
    print('  XLA phases: ' + ', '.join(f'{k} {v:.1f}' if isinstance(v, float) else f'{k} {v}'
                                       for k, v in result['compile_phases'].items()))
  print(f"  step: median {result['step_ms_median']:.1f} ms (min {result['step_ms_min']:.1f}, "
        f"max {result['step_ms_max']:.1f}) over {result['steps']} steps -> "
        f"{result['img_per_s']:.1f} img/s")
  emit_json(result)
  return result


if __name__ == '__main__':
  main()
