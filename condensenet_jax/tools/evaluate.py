r"""Evaluates a run, a condensed model or an official file on a test set.

    python -m condensenet_jax evaluate runs/digits
    python -m condensenet_jax evaluate runs/c10/condensed --dataset cifar10
    python -m condensenet_jax evaluate converted_condensenet_4.pth --model CondenseNet74_C4 \
        --dataset imagenet2012 --data-dir ~/tensorflow_datasets

A workdir gives its latest checkpoint (the trained, masked form) and its condensed/ export.
For each model it prints and writes to eval.json beside the model (`<workdir>/eval.json`,
`<condensed>/eval.json`, `<file>.eval.json`), under the dataset's name: top-1 and top-5
accuracy, mean loss, the number of examples, FLOPs and params in the official convention, the
multiply-adds really executed per image, and images a second. summary.json is never touched.
"""

import os
import time

from jax.sharding import NamedSharding, PartitionSpec as P

from condensenet_jax import artifacts, data, evaluation, flops, models, reporting, train
from condensenet_jax.tools import common

HELP = 'top-1, top-5, loss, FLOPs and speed of a run, a condensed model or an official file'


def add_arguments(parser) -> None:
  common.add_model_arguments(parser)
  parser.add_argument('--dataset', default=None,
                      help=f'one of {", ".join(data.DATASETS)} (default: the one it was '
                           'trained on)')
  parser.add_argument('--data-dir', default=None, help='tfds data_dir (CIFAR, ImageNet)')
  parser.add_argument('--batch-size', type=int, default=256, help='global evaluation batch')
  parser.add_argument('--form', choices=('trained', 'condensed', 'both'), default='both',
                      help='which forms of a workdir to evaluate (default: both)')


def evaluate(item: artifacts.Loaded, dataset: data.DataSource, batch_size: int,
             progress: bool = True) -> dict:
  """The figures of `item` on `dataset`'s test split (see the module docstring)."""
  model = item.model
  mean, std = ((item.preprocessing['mean'], item.preprocessing['std']) if item.preprocessing
               else (dataset.mean, dataset.std))
  mesh, batch_size = common.mesh_and_batch(batch_size)
  fn = evaluation.compile_eval(model, mesh, common.AXIS, mean, std, model.dtype)
  total = -(-dataset.num_test // batch_size)
  bar = reporting.ProgressBar(0, 1, total, every=max(total // 10, 1), enabled=progress,
                              label=f'{item.form} on {dataset.name}')
  started = time.time()
  result = evaluation.run_eval(fn, train.replicate(item.variables, NamedSharding(mesh, P())),
                               dataset.eval_batches(batch_size), mesh, common.AXIS,
                               progress=lambda done: bar.update(done, {}, done == total))
  size = models.default_image_size(model)
  f, p = flops.count(model, size)
  return {'form': item.form, 'source': item.source, 'step': item.step,
          'dataset': dataset.name, 'top1': result['accuracy'], 'top5': result['top5'],
          'loss': result['loss'], 'examples': result['examples'], 'flops': f, 'params': p,
          'multiply_adds': flops.multiply_adds(model, size), 'img_per_s': result['img_per_s'],
          'batch_size': batch_size, 'seconds': time.time() - started,
          'devices': f'{mesh.size} x {mesh.devices.flat[0].device_kind}'}


def result_path(item: artifacts.Loaded) -> str:
  """Where `item`'s eval.json goes: beside the model."""
  if os.path.isfile(item.source):
    return os.path.splitext(item.source.removesuffix('.tar'))[0] + '.eval.json'
  return os.path.join(item.directory, 'eval.json')


def line(r: dict, path: str) -> str:
  """One printed line of a result."""
  speed = f'{r["img_per_s"]:.0f} img/s' if r['img_per_s'] else 'speed not measured'
  return (f'{r["form"]} ({r["source"]}) on {r["dataset"]}: top-1 {r["top1"]:.4f}, top-5 '
          f'{r["top5"]:.4f}, loss {r["loss"]:.4f}, {r["examples"]} images; '
          f'{r["flops"] / 1e6:.2f}M FLOPs, {r["params"] / 1e6:.3f}M params, '
          f'{r["multiply_adds"] / 1e6:.2f}M multiply-adds run; {speed} -> {path}')


def run(args) -> list[dict]:
  forms = ('trained', 'condensed') if args.form == 'both' else (args.form,)
  items = artifacts.load(args.path, args.model, args.num_classes, forms)
  if not items:
    raise ValueError(f'{args.path} has no {args.form} model yet; the condensed model is '
                     'written when training ends.')
  results = []
  for item in items:
    dataset = common.dataset_for(item, args.dataset, args.data_dir)
    result = evaluate(item, dataset, args.batch_size)
    path = result_path(item)
    common.merge_json(path, {dataset.name: result})
    print(line(result, path), flush=True)
    results.append(result)
  return results
