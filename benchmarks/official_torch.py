"""Times the official PyTorch CondenseNet-86 (CIFAR shapes) on random data, for side-by-side
comparisons with `benchmarks.bench`; one JSON line per mode, in the same fields.

    python -m benchmarks.official_torch --official-dir PATH --modes train --train-batch 64
    python -m benchmarks.official_torch --official-dir PATH --modes train --bf16 --channels-last
    python -m benchmarks.official_torch --official-dir PATH --modes infer_masked,infer_converted

PATH is a checkout of the authors' repository (github.com/ShichenLiu/CondenseNet); this module
only imports its `layers`, `models.condensenet` and `models.condensenet_converted`. PyTorch is
not a dependency of this project: install it next to this module to use it.

Modes:
  train            one SGD step as the official `main.py` takes it: forward with a progress
                   value inside the first stage, cross-entropy plus the group-lasso penalty of
                   every LearnedGroupConv, backward, Nesterov SGD update;
  infer_masked     the training-form network in eval mode, without gradients;
  infer_converted  the official converted (condensed) model in eval mode, its index buffers
                   filled with valid indices (they start uninitialized).

`--bf16` runs under `torch.autocast(dtype=torch.bfloat16)` and `--channels-last` converts the
model and input to that memory format; on CUDA, cuDNN's autotuner is on, as in `main.py`.
"""

import argparse
import sys
import time
import types

from benchmarks.bench import emit_json

MODES = ('train', 'infer_masked', 'infer_converted')


def parse_args(argv=None):
  """The command line; `--modes` becomes a list (argparse exits on an unknown mode)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--official-dir', required=True,
                      help='a checkout of the official CondenseNet repository')
  parser.add_argument('--modes', default='train', help=f'comma-separated subset of {MODES}')
  parser.add_argument('--train-batch', type=int, default=64)
  parser.add_argument('--infer-batch', type=int, default=256)
  parser.add_argument('--steps', type=int, default=20, help='timed steps')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps first')
  parser.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda if any)")
  parser.add_argument('--bf16', action='store_true', help='bfloat16 autocast')
  parser.add_argument('--channels-last', action='store_true')
  parser.add_argument('--lasso', type=float, default=1e-5, help='group-lasso lambda in train')
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  args = parser.parse_args(argv)
  modes = [m for m in args.modes.split(',') if m]
  unknown = set(modes) - set(MODES)
  if unknown or not modes:
    parser.error(f'--modes {args.modes!r}: use a comma-separated subset of {MODES}')
  args.modes = modes
  return args


def _import_official(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit('error: benchmarks.official_torch needs PyTorch (pip install torch); it '
                     'is not a dependency of this project') from None
  sys.path.insert(0, path)
  try:
    from layers import LearnedGroupConv  # pylint: disable=g-import-not-at-top
    from models.condensenet import CondenseNet  # pylint: disable=g-import-not-at-top
    from models.condensenet_converted import CondenseNet as Converted  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f'error: --official-dir {path} does not hold the official CondenseNet code '
                     f'(layers.py, models/condensenet.py, models/condensenet_converted.py): '
                     f'{e}') from None
  return torch, LearnedGroupConv, CondenseNet, Converted


def main(argv=None):
  """Times each mode `argv` names, one JSON line each; returns the records. Exits with an
  error line (SystemExit) when PyTorch or the official code cannot be imported."""
  args = parse_args(argv)
  torch, LearnedGroupConv, CondenseNet, Converted = _import_official(args.official_dir)
  device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
  spec = types.SimpleNamespace(stages=[14, 14, 14], growth=[8, 16, 32], bottleneck=4,
                               group_1x1=4, group_3x3=4, condense_factor=4, dropout_rate=0.0,
                               data='cifar10', num_classes=10)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

  def autocast():
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  results = []
  for mode in args.modes:
    batch = args.train_batch if mode == 'train' else args.infer_batch
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(
        memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), device=device)
    LearnedGroupConv.global_progress = 0.0
    progress = 0.1  # inside the first of the condense_factor - 1 condensing stages
    if mode == 'train':
      net = CondenseNet(spec).to(device).to(memory_format=memory_format).train()
      optimizer = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-4,
                                  nesterov=True)
      criterion = torch.nn.CrossEntropyLoss()
      lgcs = [m for m in net.modules() if isinstance(m, LearnedGroupConv)]

      def step():
        with autocast():
          loss = criterion(net(images, progress), labels)
          if args.lasso:
            loss = loss + args.lasso * sum(m.lasso_loss for m in lgcs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    else:
      net = CondenseNet(spec) if mode == 'infer_masked' else Converted(spec)
      with torch.no_grad():
        for name, buffer in net.named_buffers():
          if name.endswith('index'):
            n = buffer.numel()
            buffer.copy_(torch.arange(n) * 2 if 'classifier' in name else torch.randperm(n))
      net = net.to(device).to(memory_format=memory_format).eval()

      def step():
        with torch.no_grad(), autocast():
          if mode == 'infer_masked':
            net(images, progress)
          else:
            net(images)
    for _ in range(args.warmup):
      step()
    sync()
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      step()
      sync()
      times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2] if len(times) % 2 else sum(
        times[len(times) // 2 - 1:len(times) // 2 + 1]) / 2
    result = {
        'impl': 'official-pytorch', 'mode': mode, 'batch_size': batch,
        'img_per_s': batch / median, 'step_ms_median': 1000 * median,
        'step_ms_min': 1000 * times[0], 'step_ms_max': 1000 * times[-1], 'steps': args.steps,
        'bf16': args.bf16, 'channels_last': args.channels_last,
        'lasso': args.lasso if mode == 'train' else None,
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        'threads': torch.get_num_threads(), 'torch': torch.__version__,
    }
    emit_json(result, args.out)
    results.append(result)
  return results


if __name__ == '__main__':
  main()
