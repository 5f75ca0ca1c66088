"""The whole performance comparison in one command: our training and inference at several
batch sizes and precisions, the card's measured peaks, and (optionally) the official PyTorch
code timed in the same call; prints one table and writes every figure as JSON lines.

    python -m benchmarks.suite --config configs/cifar.py --out results.jsonl \\
        [--official-dir PATH_TO_OFFICIAL_CHECKOUT] [--quick]

What runs, in this order by default (each of our groups in its own process, so that XLA flags
apply and memory is returned):
  peaks       copy bandwidth (read + write of a large array) and matrix-product rate in float32
              and bfloat16, measured with JAX on this device;
  official    `benchmarks.official_torch` (needs PyTorch and a checkout of the official code):
              train in the paper's setting (eager float32, batch 64) and with bfloat16 autocast +
              channels_last at batch 64 and 256, masked and converted inference;
  ours-fast   train at batch 64 float32 and 256 bfloat16 with `--deterministic false`: the cost
              of XLA's deterministic GPU kernels;
  ours        `benchmarks.bench` in train mode at batch 64 and 256 in float32 and bfloat16, and
              masked vs condensed inference at the inference batch, with the config's
              `deterministic` setting (default on);
  profile     `benchmarks.op_profile` of the float32 training step at batch 64: the time per
              category of XLA operation (convolution, dot, transpose, elementwise, ...);
  lowerings   (only when asked for) the float32 training step and condensed inference under
              each explicit `conv_lowering` and each explicit `dense_block_form`, and
              condensed inference with each explicit `condensed_gathers` and
              `condensed_layout`, to check what 'auto' picks on this backend.

Every result is printed and appended to `--out` as soon as it is measured, most wanted first,
so a run cut short (`--budget` seconds for the whole suite) keeps what it measured; a child
that fails leaves an error record. `--quick` shrinks everything (a tiny model unless `--config`
is given, small batches, 2 steps) to check the machinery on a CPU; ratios to the official code
are printed only for CondenseNet-86, the model that side always runs.

"of peak" in the table divides a step's work by its time, as a fraction of the measured
matrix-product rate (of the step's precision) and copy bandwidth. The work in floating-point
operations is the model's own count (`bench.model_flops`: the paper's FLOPs, x3 for training),
so the matmul fraction is the model FLOP utilization; XLA's estimate (`xla_flops` in the
records) is kept beside it but not used, because on GPU it leaves out most library calls
(cuDNN convolutions). The bytes are XLA's estimate of bytes accessed
(`compiled.cost_analysis()`). The float32 peak is taken at JAX's default matmul precision, which
on recent NVIDIA GPUs may use TF32 (the record says which precision setting was in force).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

from benchmarks.bench import emit_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUICK_CONFIG = textwrap.dedent("""
    from configs import cifar

    def get_config():
      config = cifar.get_config()
      config.model.stages = (1, 1, 1)
      config.model.growth = (4, 8, 8)
      return config
""")


GROUPS = ('peaks', 'official', 'ours-fast', 'ours', 'profile', 'lowerings')


def plan(args) -> dict:
  """The measurements of each process group: lists of `benchmarks.bench` argument lists (and
  of `official_torch` ones)."""
  train_batches = (4, 8) if args.quick else (64, 256)
  infer_batch = 8 if args.quick else args.infer_batch
  steps = ['--steps', str(2 if args.quick else args.steps), '--warmup', '1' if args.quick else '3']
  small, large = train_batches

  def train(batch, dtype):
    return ['--mode', 'train', '--batch-size', str(batch), '--dtype', dtype] + steps

  def infer(mode, dtype):
    return ['--mode', mode, '--batch-size', str(infer_batch), '--dtype', dtype] + steps

  # Most wanted first: a group stopped by its time limit keeps what it measured.
  ours = [train(small, 'float32'), train(large, 'bfloat16'),
          infer('infer_masked', 'float32'), infer('infer_condensed', 'float32'),
          train(small, 'bfloat16'), train(large, 'float32'),
          infer('infer_masked', 'bfloat16'), infer('infer_condensed', 'bfloat16')]
  fast = [train(small, 'float32') + ['--deterministic', 'false'],
          train(large, 'bfloat16') + ['--deterministic', 'false']]
  official = [
      ['--modes', 'train', '--train-batch', str(small)],
      ['--modes', 'train', '--train-batch', str(small), '--bf16', '--channels-last'],
      ['--modes', 'train', '--train-batch', str(large), '--bf16', '--channels-last'],
      ['--modes', 'infer_masked,infer_converted', '--infer-batch', str(infer_batch)],
      ['--modes', 'infer_masked,infer_converted', '--infer-batch', str(infer_batch), '--bf16',
       '--channels-last'],
  ]
  official = [o + steps for o in official]
  profile = [['--mode', 'train', '--batch-size', str(small), '--dtype', 'float32', '--steps',
              '1' if args.quick else '3', '--warmup', '1', '--top', '10']]
  from condensenet_jax.execution import CONDENSED_GATHERS, DENSE_BLOCK_FORMS, LAYOUTS, LOWERINGS  # pylint: disable=g-import-not-at-top
  checked = (train(small, 'float32'), infer('infer_condensed', 'float32'))
  lowerings = ([job + ['--conv-lowering', lowering] for lowering in LOWERINGS for job in checked]
               + [job + ['--dense-block-form', form] for form in DENSE_BLOCK_FORMS
                  for job in checked]
               + [checked[1] + ['--condensed-gathers', form] for form in CONDENSED_GATHERS]
               + [checked[1] + ['--condensed-layout', layout] for layout in LAYOUTS])
  return {'ours': ours, 'ours-fast': fast, 'official': official, 'profile': profile,
          'lowerings': lowerings}


def measure_peaks(quick: bool) -> list:
  """Copy bandwidth and matrix-product rates of the default device, measured with JAX."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import bench  # pylint: disable=g-import-not-at-top

  def timed(fn, *args):
    return float(np.median(bench.time_steps(lambda: fn(*args), steps=10, warmup=1)))

  gpu = jax.default_backend() != 'cpu'
  device = jax.devices()[0].device_kind
  results = []
  n = (1 << 18) if quick else ((1 << 28) if gpu else (1 << 26))  # float32 elements
  x = jnp.ones((n,), jnp.float32)
  seconds = timed(jax.jit(lambda a: a * 1.0001), x)
  results.append({'impl': 'peak', 'what': 'copy', 'device': device,
                  'gb_per_s': 2 * 4 * n / seconds / 1e9, 'bytes': 4 * n})
  size = 256 if quick else (8192 if gpu else 2048)
  for dtype in ('float32', 'bfloat16'):
    # Random operands: constant ones or zeros can overstate a GPU's rate.
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
    seconds = timed(jax.jit(lambda p, q: p @ q), a, a)
    results.append({'impl': 'peak', 'what': f'matmul_{dtype}', 'device': device,
                    'tflop_per_s': 2 * size ** 3 / seconds / 1e12, 'size': size,
                    'matmul_precision': str(jax.config.jax_default_matmul_precision)})
  return results


def worker(args):
  """Runs one process group's measurements in this process, one JSON line each."""
  if args.group == 'peaks':
    for record in measure_peaks(args.quick):
      emit_json(record, args.out)
    return
  from benchmarks import bench, op_profile  # pylint: disable=g-import-not-at-top
  if args.group == 'profile':
    impl, measure = 'profile', op_profile.main
  else:
    impl, measure = 'ours', lambda argv: bench.run(bench.parse_args(argv))
  for job_args in plan(args)[args.group]:
    try:
      record = {'impl': impl, 'group': args.group, **measure(['--config', args.config] + job_args)}
    except (Exception, SystemExit) as e:  # pylint: disable=broad-except
      record = {'impl': impl, 'group': args.group, 'args': job_args,
                'error': f'{type(e).__name__}: {e}'}
    emit_json(record, args.out)


def _spawn(group: str, command: list, deadline, out: str) -> bool:
  """Runs one child process (its JSON lines reach stdout and `--out` as they are printed);
  False when the suite's time budget is spent or the child failed (recorded in `out`)."""
  timeout = None if deadline is None else deadline - time.monotonic()
  if timeout is not None and timeout <= 0:
    print(f'suite: no time left for {group}', flush=True)
    return False
  from condensenet_jax.startup import DETERMINISTIC_FLAG  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  if group == 'ours-fast':  # also when this process (or the user) has set it
    flags = env.get('XLA_FLAGS', '').split()
    env['XLA_FLAGS'] = ' '.join(f for f in flags if f != DETERMINISTIC_FLAG)
  start = time.monotonic()
  try:
    code = subprocess.run(command, cwd=ROOT, timeout=timeout, check=False, env=env).returncode
  except subprocess.TimeoutExpired:
    print(f'suite: {group} stopped when the time budget ran out', flush=True)
    return False
  print(f'suite: {group} took {time.monotonic() - start:.0f} s', file=sys.stderr, flush=True)
  if code != 0:
    emit_json({'impl': 'official-pytorch' if group == 'official' else 'ours', 'group': group,
               'args': command[3:], 'error': f'the process exited with code {code}'}, out)
    return False
  return True


def read_results(path: str) -> list:
  """The records of a JSON-lines file, one dict per non-empty line."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# The execution choices a row may set explicitly (bench.py's result fields).
EXECUTION_CHOICES = ('conv_lowering', 'dense_block_form', 'condensed_gathers', 'condensed_layout')


def _precision(r: dict) -> str:
  if r['impl'] == 'official-pytorch':
    return ('bf16 autocast' if r.get('bf16') else 'float32') + (
        ' + channels_last' if r.get('channels_last') else '')
  explicit = [f'gathers {r[k]}' if k == 'condensed_gathers' else r[k]
              for k in EXECUTION_CHOICES if r.get(k) not in (None, 'auto')]
  return r.get('dtype', '') + ('' if r.get('deterministic', True) else ', deterministic off') + (
      ''.join(f', {e}' for e in explicit))


def table(results: list) -> str:
  """Markdown table of every measurement, then the issue's ratios where both sides ran."""
  peaks = {r['what']: r for r in results if r.get('impl') == 'peak'}
  lines = ['| impl | mode | batch | precision | img/s | step ms | compile s | of peak |',
           '|---|---|---|---|---|---|---|---|']
  for r in results:
    if r.get('impl') in ('peak', 'profile') or 'error' in r:
      continue
    frac = ''
    if r['impl'] == 'ours' and peaks:
      seconds = r['step_ms_median'] / 1000
      matmul = peaks.get('matmul_bfloat16' if r.get('dtype') == 'bfloat16' else
                         'matmul_float32')
      parts = []
      flop_count = r.get('model_flops') or r.get('xla_flops')
      if matmul and flop_count:
        parts.append(f"{flop_count / seconds / 1e12 / matmul['tflop_per_s']:.1%} matmul")
      if r.get('xla_bytes_accessed') and 'copy' in peaks:
        parts.append(f"{r['xla_bytes_accessed'] / seconds / 1e9 / peaks['copy']['gb_per_s']:.0%}"
                     ' copy')
      frac = ', '.join(parts)
    compile_s = f"{r['compile_s']:.1f}" if r.get('compile_s') is not None else ''
    lines.append(f"| {r['impl']} | {r['mode']} | {r['batch_size']} | {_precision(r)} | "
                 f"{r['img_per_s']:.1f} | {r['step_ms_median']:.1f} | {compile_s} | {frac} |")
  for r in results:
    if 'error' in r:
      what = ' '.join(str(a) for a in r.get('args', []))[:80]
      lines.append(f"| {r['impl']} | failed: {r['error'][:100]} | {what} | | | | | |")
  if peaks:
    lines.append('')
    lines.append('Peaks measured on ' + next(iter(peaks.values()))['device'] + ': ' + ', '.join(
        f"{w} {p['gb_per_s']:.3g} GB/s" if 'gb_per_s' in p else f"{w} {p['tflop_per_s']:.3g} "
        'TFLOP/s' for w, p in peaks.items()) + '. "of peak" is XLA\'s cost estimate of the '
        "step's flops and bytes over the step time, against these.")
  lines.extend(ratios(results))
  for r in results:
    if r.get('impl') == 'profile' and 'error' not in r:
      lines.append('')
      lines.append(f"Where the {r['mode']} step's time goes (batch {r['batch_size']}, "
                   f"{r['dtype']}, `benchmarks.op_profile`): " + ', '.join(
                       f"{c['category']} {c['ms']:.1f} ms" for c in r['categories'])
                   + f" of {r['wall_ms_per_step']:.1f} ms wall.")
  return '\n'.join(lines)


def ratios(results: list) -> list:
  """The comparisons the performance targets name, where both sides were measured; ours at
  the default lowering and dense-block form ('auto'), as users run it."""
  def pick(impl, mode, batch=None, **want):
    rows = [r for r in results if r.get('impl') == impl and r.get('mode') == mode
            and 'error' not in r and (batch is None or r['batch_size'] == batch)
            and all(r.get(k) in (None, 'auto') for k in EXECUTION_CHOICES)
            and all(r.get(k) == v for k, v in want.items())]
    return max(rows, key=lambda r: r['img_per_s']) if rows else None

  lines = []
  if any(r.get('impl') == 'ours' and (r.get('stages'), r.get('growth')) != (
      [14, 14, 14], [8, 16, 32]) for r in results if 'error' not in r):
    return ['', 'No ratios: our model here is not CondenseNet-86, which the official side '
            'always runs.']

  def ratio(label, ours, theirs):
    if ours and theirs:
      lines.append(f"- {label}: {ours['img_per_s']:.1f} / {theirs['img_per_s']:.1f} img/s = "
                   f"{ours['img_per_s'] / theirs['img_per_s']:.2f}x")

  small = min((r['batch_size'] for r in results if r.get('mode') == 'train'), default=None)
  ratio('training, float32 at the paper batch (ours, deterministic / official eager)',
        pick('ours', 'train', small, dtype='float32', deterministic=True),
        pick('official-pytorch', 'train', small, bf16=False))
  ratio('best training throughput, any batch, precision or determinism (ours / official)',
        pick('ours', 'train'), pick('official-pytorch', 'train'))
  for precision, official_bf16 in (('float32', False), ('bfloat16', True)):
    condensed = pick('ours', 'infer_condensed', dtype=precision)
    ratio(f'condensed inference, {precision} (ours / official converted)', condensed,
          pick('official-pytorch', 'infer_converted', bf16=official_bf16))
    ratio(f'condensed / masked inference, {precision} (ours)', condensed,
          pick('ours', 'infer_masked', dtype=precision))
  deterministic = pick('ours', 'train', small, dtype='float32', deterministic=True)
  fast = pick('ours', 'train', small, dtype='float32', deterministic=False)
  ratio('deterministic GPU kernels, float32 training (on / off)', deterministic, fast)
  if lines:
    lines.insert(0, '')
  return lines


def parse_args(argv=None):
  """The suite's flags (`--group` is the worker mode the suite spawns itself in)."""
  parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
  parser.add_argument('--config', default=None,
                      help='a config file (default: configs/cifar.py; with --quick a tiny one)')
  parser.add_argument('--out', default='benchmark_results.jsonl',
                      help='JSON lines, appended as each figure is measured')
  parser.add_argument('--official-dir', default=None,
                      help='a checkout of the official PyTorch CondenseNet code (optional)')
  parser.add_argument('--official-python', default=sys.executable,
                      help='the Python that has PyTorch (default: this one)')
  parser.add_argument('--steps', type=int, default=20, help='timed steps per measurement')
  parser.add_argument('--infer-batch', type=int, default=1024)
  parser.add_argument('--groups', default='peaks,official,ours-fast,ours,profile',
                      help='comma-separated subset of ' + ','.join(GROUPS) + ', run in the '
                           'order given (the default runs the short groups first, so that a '
                           'budget cut costs the profile and the last of ours; lowerings only '
                           'runs when named)')
  parser.add_argument('--budget', type=float, default=None,
                      help='seconds for the whole suite: each process is stopped when it '
                           'runs out, keeping what it measured (default: no limit)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny model, small batches, 2 steps: checks the machinery')
  parser.add_argument('--group', default=None, help=argparse.SUPPRESS)  # worker mode
  return parser.parse_args(argv)


def main(argv=None):
  """Runs the groups `argv` names and prints the table; returns every record of `--out`
  (with `--group`, runs that one group as a worker and returns None).

  Exits with an error line (SystemExit) for a missing `--config`, unknown `--groups` or an
  existing `--out`.
  """
  args = parse_args(argv)
  if args.group:
    worker(args)
    return None
  with tempfile.TemporaryDirectory(prefix='suite_') as scratch:
    if args.config is None and args.quick:
      args.config = os.path.join(scratch, 'quick_config.py')
      with open(args.config, 'w') as f:
        f.write(QUICK_CONFIG)
    elif args.config is None:
      args.config = os.path.join(ROOT, 'configs', 'cifar.py')
    return _run_groups(args)


def _run_groups(args):
  if not os.path.exists(args.config):
    raise SystemExit(f'error: --config {args.config} does not exist')
  groups = [g for g in args.groups.split(',') if g]
  unknown = set(groups) - set(GROUPS)
  if unknown:
    raise SystemExit(f'error: --groups has unknown {sorted(unknown)}; use a subset of '
                     f'{",".join(GROUPS)}')
  if 'official' in groups and not args.official_dir:
    print('suite: no --official-dir, so the official code is not timed', flush=True)
    groups.remove('official')
  elif args.official_dir:
    args.official_dir = os.path.abspath(args.official_dir)
    if os.sep in args.official_python:
      args.official_python = os.path.abspath(args.official_python)
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    raise SystemExit(f'error: --out {out} already exists; choose a new file (results are '
                     'appended as they are measured, so an old file would mix two runs)')
  common = ['--config', os.path.abspath(args.config), '--out', out, '--steps',
            str(args.steps), '--infer-batch', str(args.infer_batch)] + (
                ['--quick'] if args.quick else [])
  deadline = None if args.budget is None else time.monotonic() + args.budget
  for group in groups:
    if group == 'official':
      commands = [[args.official_python, '-u', '-m', 'benchmarks.official_torch',
                   '--official-dir', args.official_dir, '--out', out] + official_args
                  for official_args in plan(args)['official']]
    else:
      commands = [[sys.executable, '-u', '-m', 'benchmarks.suite', '--group', group] + common]
    for command in commands:
      if not _spawn(group, command, deadline, out):
        break
  results = read_results(out) if os.path.exists(out) else []
  text = table(results)
  print(text, flush=True)
  return results


if __name__ == '__main__':
  main()
