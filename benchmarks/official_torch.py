"""Times the official PyTorch CondenseNet or CondenseNetV2 on random data, for side-by-side
comparisons with `benchmarks.bench`; one JSON line per mode, in the same fields.

    python -m benchmarks.official_torch --official-dir PATH --modes train --train-batch 64
    python -m benchmarks.official_torch --official-dir PATH --modes train --bf16 --channels-last
    python -m benchmarks.official_torch --official-dir PATH --modes infer_masked,infer_converted
    python -m benchmarks.official_torch --official-dir V2PATH --arch JSON --modes infer_masked

`--arch` is the architecture as `models.architecture` gives it, with the class name under
'name' (default: CondenseNet-86 at CIFAR shapes); images are 32x32 for `stem='cifar'`, else
224x224. PATH is a checkout of the authors' repository: github.com/ShichenLiu/CondenseNet for a
CondenseNet (this module imports its `layers`, `models.condensenet` and
`models.condensenet_converted`), github.com/jianghaojun/CondenseNetV2 for a CondenseNetV2 (its
`utils`, `model.condensenetv2` and `model.converted_condensenetv2`). PyTorch is not a
dependency of this project: install it next to this module to use it.

Modes:
  train            one SGD step as the official training takes it: forward with a progress
                   value inside the first stage, cross-entropy plus the group-lasso penalty of
                   every learned layer, backward, Nesterov SGD update;
  infer_masked     the training-form network in eval mode, without gradients;
  infer_converted  the official converted (condensed) model in eval mode, its index buffers
                   filled with valid indices (they start uninitialized; a V2 SFR's index
                   matrix with a permutation matrix).

`--bf16` runs under `torch.autocast(dtype=torch.bfloat16)` and `--channels-last` converts the
model and input to that memory format; on CUDA, cuDNN's autotuner is on, as in `main.py`.
"""

import argparse
import json
import sys
import time
import types

from benchmarks.bench import emit_json

MODES = ('train', 'infer_masked', 'infer_converted')
# CondenseNet-86 (configs/cifar.py), as `models.architecture` gives it.
CONDENSENET_86 = {'name': 'CondenseNet', 'stages': [14, 14, 14], 'growth': [8, 16, 32],
                  'bottleneck': 4, 'group_1x1': 4, 'group_3x3': 4, 'condense_factor': 4,
                  'num_classes': 10, 'stem': 'cifar', 'dropout_rate': 0.0}


def parse_args(argv=None):
  """The command line; `--modes` becomes a list (argparse exits on an unknown mode)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--official-dir', required=True,
                      help='a checkout of the official CondenseNet (or CondenseNetV2) code')
  parser.add_argument('--arch', default=json.dumps(CONDENSENET_86),
                      help="the architecture as JSON: models.architecture's fields and 'name' "
                           '(default: CondenseNet-86)')
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
  try:
    args.arch = json.loads(args.arch)
  except json.JSONDecodeError as e:
    parser.error(f'--arch is not JSON ({e})')
  if args.arch.get('name') not in ('CondenseNet', 'CondenseNetV2'):
    parser.error(f"--arch: 'name' must be 'CondenseNet' or 'CondenseNetV2', not "
                 f"{args.arch.get('name')!r}")
  return args


def _import_official(path, arch):
  """`(torch, learned layer classes, masked class, converted class, constructor arguments)`
  of the official code for `arch`; exits with an error line when it cannot be imported."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit('error: benchmarks.official_torch needs PyTorch (pip install torch); it '
                     'is not a dependency of this project') from None
  sys.path.insert(0, path)
  data = 'cifar10' if arch['stem'] == 'cifar' else 'imagenet'
  # pylint: disable=g-import-not-at-top
  try:
    if arch['name'] == 'CondenseNet':
      from layers import LearnedGroupConv
      from models.condensenet import CondenseNet
      from models.condensenet_converted import CondenseNet as Converted
      spec = types.SimpleNamespace(
          data=data, **{k: arch[k] for k in ('stages', 'growth', 'bottleneck', 'group_1x1',
                                             'group_3x3', 'condense_factor', 'num_classes')},
          dropout_rate=arch.get('dropout_rate', 0.0))
      return torch, (LearnedGroupConv,), CondenseNet, Converted, spec
    from utils import LGC, SFR
    from model.condensenetv2 import CondenseNetV2
    from model.converted_condensenetv2 import ConvertedCondenseNetV2
  except ImportError as e:
    code = ('CondenseNet code (layers.py, models/condensenet.py, models/condensenet_converted.py)'
            if arch['name'] == 'CondenseNet' else 'CondenseNetV2 code (utils/, '
            'model/condensenetv2.py, model/converted_condensenetv2.py)')
    raise SystemExit(f'error: --official-dir {path} does not hold the official {code}: '
                     f'{e}') from None
  spec = types.SimpleNamespace(
      dataset=data, HS_start_block=arch['hs_start_block'],
      SE_start_block=arch['se_start_block'],
      **{k: arch[k] for k in ('stages', 'growth', 'bottleneck', 'group_1x1', 'group_3x3',
                              'group_trans', 'condense_factor', 'trans_factor',
                              'last_se_reduction', 'fc_channel', 'num_classes')})
  return torch, (LGC, SFR), CondenseNetV2, ConvertedCondenseNetV2, spec


def _fill_indices(torch, net):
  """Valid indices in the converted model's index buffers: a permutation of the kept inputs,
  every other classifier input (V1), a permutation matrix for a V2 SFR's scatter."""
  with torch.no_grad():
    for name, buffer in net.named_buffers():
      if not name.endswith('index'):
        continue
      if buffer.dim() == 2:
        buffer.copy_(torch.eye(buffer.shape[0])[torch.randperm(buffer.shape[0])])
      else:
        n = buffer.numel()
        buffer.copy_(torch.arange(n) * 2 if 'classifier' in name else torch.randperm(n))


def main(argv=None):
  """Times each mode `argv` names, one JSON line each; returns the records. Exits with an
  error line (SystemExit) when PyTorch or the official code cannot be imported."""
  args = parse_args(argv)
  torch, learned, Masked, Converted, spec = _import_official(args.official_dir, args.arch)
  size = 32 if args.arch['stem'] == 'cifar' else 224
  device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
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
    images = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=memory_format)
    labels = torch.randint(0, spec.num_classes, (batch,), device=device)
    for cls in learned:
      cls.global_progress = 0.0
    progress = 0.1  # inside the first of the condense_factor - 1 condensing stages
    if mode == 'train':
      net = Masked(spec).to(device).to(memory_format=memory_format).train()
      optimizer = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-4,
                                  nesterov=True)
      criterion = torch.nn.CrossEntropyLoss()
      lgcs = [m for m in net.modules() if isinstance(m, learned)]

      def step():
        with autocast():
          loss = criterion(net(images, progress), labels)
          if args.lasso:
            loss = loss + args.lasso * sum(m.lasso_loss for m in lgcs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    else:
      net = Masked(spec) if mode == 'infer_masked' else Converted(spec)
      _fill_indices(torch, net)
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
        'impl': 'official-pytorch', 'model': args.arch['name'], 'image_size': size,
        'mode': mode, 'batch_size': batch,
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
