"""Where a benchmark program's time goes: per XLA operation, from a profiler trace.

    python -m benchmarks.op_profile --config configs/cifar.py --mode train --batch-size 64
    python -m benchmarks.op_profile --config configs/cifar.py --mode infer_condensed --top 30

Compiles the program `benchmarks.bench` would time (same flags), runs `--warmup` steps, then
traces `--steps` steps with `jax.profiler` and sums the time of every event that names an
operation of the compiled program (XLA's CPU thunks, or the GPU kernels where the trace has
device events). Each operation is joined with the optimized HLO (`compiled.as_text()`): its
output shape, the JAX source operation it came from, and a category:

  convolution, dot       a convolution or matrix product (alone or fused with elementwise work)
  custom-call:TARGET     a library call (cuDNN convolutions and cuBLAS products on GPU)
  reduction              a reduction (batch-norm statistics, norms, losses)
  gather/scatter         indexed reads or writes (the condensed model's channel gathers)
  transpose/copy         a layout change
  concatenate            a concatenation (the dense blocks' growing inputs)
  elementwise            any other fused elementwise work
  other                  control flow and the rest

Prints the categories, then the `--top` most expensive operations; the last line is a JSON
object with both. Times are summed over the steps' events and divided by the number of steps;
on a CPU, operations on different threads overlap, so the sum can exceed the wall time.
XLA's own CPU convolutions (`config.execution.cpu_convolutions='xla'`) run asynchronously, and
most of their events cover little more than the launch (docs/performance.md#how-to-measure).
Their time shows up in the operations that run beside them, mostly transposes and elementwise
work of the backward pass; time a convolution alone (`benchmarks/lowering.py`) or compare
whole programs instead.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from benchmarks import bench

# The shape is one array type or a tuple of them (GPU library calls return a result and a
# scratch buffer).
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%([\w.\-]+) = (\((?:[^()]|\([^()]*\))*\)|\S+) ([\w\-]+)\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{$')


def parse_hlo(text: str) -> dict:
  """`{instruction name: (shape, category, JAX op_name)}` from optimized HLO text."""
  bodies, current = {}, None
  instructions = {}
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      bodies[current] = []
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    if current is not None:
      bodies[current].append((opcode, rest))
    instructions[name] = (shape, opcode, rest)
  table = {}
  for name, (shape, opcode, rest) in instructions.items():
    called = re.search(r'calls=%([\w.\-]+)', rest)
    inner = bodies.get(called.group(1), []) if called else []
    # The instruction's own source, else that of its fused computation's last (root) line.
    sources = [rest] + [r for _, r in reversed(inner)]
    op_name = next((m.group(1) for m in (re.search(r'op_name="([^"]*)"', r) for r in sources)
                    if m), '')
    table[name] = (shape, _category(opcode, rest, inner), op_name)
  return table


def _category(opcode: str, rest: str, inner: list) -> str:
  ops = {opcode} | {op for op, _ in inner}
  calls = [r for op, r in [(opcode, rest)] + inner if op == 'custom-call']
  if calls:
    target = re.search(r'custom_call_target="([^"]+)"', calls[0])
    return 'custom-call:' + (target.group(1) if target else '?')
  for kind in ('convolution', 'dot'):
    if kind in ops:
      return kind
  if 'reduce' in ops or 'reduce-window' in ops:
    return 'reduction'
  if 'gather' in ops or 'scatter' in ops:
    return 'gather/scatter'
  if 'concatenate' in ops:
    return 'concatenate'
  if opcode in ('while', 'conditional', 'call', 'all-reduce', 'parameter', 'tuple'):
    return 'other'
  if ops & {'transpose', 'copy'} and not ops - {'transpose', 'copy', 'bitcast', 'parameter',
                                                  'reshape'}:
    return 'transpose/copy'
  if opcode in ('fusion', 'add', 'multiply', 'subtract', 'maximum', 'select', 'compare',
                'convert', 'broadcast', 'slice', 'pad', 'reshape', 'bitcast'):
    return 'transpose/copy' if 'transpose' in ops else 'elementwise'
  return 'other'


def op_times(trace_dir: str) -> collections.Counter:
  """Microseconds per operation name over the whole trace (device events where present)."""
  files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not files:
    raise SystemExit(f'error: the profiler wrote no trace under {trace_dir}')
  events = json.load(gzip.open(max(files, key=os.path.getmtime)))['traceEvents']
  process = {e['pid']: e['args'].get('name', '') for e in events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  ops = [e for e in events if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})]
  device = [e for e in ops if process.get(e['pid'], '').startswith('/device:')]
  if not ops:
    raise SystemExit('error: no event of the trace names an XLA operation (args.hlo_op); this '
                     "backend's profiler labels its events some other way")
  totals = collections.Counter()
  for e in device or ops:
    totals[e['args']['hlo_op']] += float(e.get('dur', 0.0))
  return totals


def summarize(totals: collections.Counter, hlo: dict, steps: int, top: int) -> dict:
  """Per-step times from `totals` (microseconds per HLO operation, summed over `steps`) joined
  with `hlo` (`parse_hlo`): `{'total_ms', 'categories': [{'category', 'ms', 'ops'}, ...],
  'top': the `top` costliest operations}`, costliest first."""
  categories = collections.Counter()
  counts = collections.Counter()
  rows = []
  for name, us in totals.items():
    shape, category, op_name = hlo.get(name, ('?', 'other', ''))
    categories[category] += us / steps
    counts[category] += 1
    rows.append({'op': name, 'ms': us / steps / 1000, 'category': category, 'shape': shape,
                 'source': op_name})
  rows.sort(key=lambda r: -r['ms'])
  return {
      'total_ms': sum(categories.values()) / 1000,
      'categories': [{'category': c, 'ms': us / 1000, 'ops': counts[c]}
                     for c, us in categories.most_common()],
      'top': rows[:top],
  }


def parse_args(argv=None):
  """`benchmarks.bench`'s flags (`--steps` here counts traced steps) and `--top`."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--top', type=int, default=20, help='operations listed')
  args = bench.parse_args(argv, parser, steps=2)
  if args.top <= 0:
    parser.error('--top must be positive')
  return args


def main(argv=None):
  """Profiles the program `argv` describes, prints the summary and returns it."""
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  prepared = bench.prepare(args)
  for _ in range(args.warmup):
    jax.block_until_ready(prepared.step())
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        jax.block_until_ready(prepared.step())
      wall = (time.perf_counter() - start) / args.steps
    totals = op_times(trace_dir)
  result = summarize(totals, parse_hlo(prepared.program.as_text()), args.steps, args.top)
  result.update(mode=args.mode, batch_size=args.batch_size, dtype=prepared.config.dtype,
                device=jax.devices()[0].device_kind, wall_ms_per_step=1000 * wall)
  print(f'{args.mode}, batch {args.batch_size}, {prepared.config.dtype}, '
        f"{result['device']}: {result['total_ms']:.1f} ms of operations per step "
        f'({1000 * wall:.1f} ms wall per traced step, profiler on)')
  for c in result['categories']:
    print(f"  {c['ms']:9.1f} ms  {c['ops']:5d} ops  {c['category']}")
  print(f"top {args.top}:")
  for r in result['top']:
    print(f"  {r['ms']:8.2f} ms  {r['category']:14.14s} {r['shape'][:28]:28s} "
          f"{r['source'][-70:]}")
  bench.emit_json(result)
  return result


if __name__ == '__main__':
  main()
