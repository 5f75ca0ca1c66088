"""The tools of `python -m condensenet_jax` on a tiny digits run: evaluate, inspect, export
(jax.export in a process without this package, TFLite in its interpreter) and predict, and
their one-line errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from condensenet_jax import checkpoint, cli, data, flops, models, train

pytestmark = pytest.mark.slow  # every test reads a trained run

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import digits as digits_config  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A finished tiny digits run: one epoch, one layer per block."""
  workdir = tmp_path_factory.mktemp('tools') / 'digits'
  config = digits_config.get_config()
  config.num_epochs = 1
  config.model.stages = (1, 1, 1)
  config.model.growth = (4, 8, 8)
  config.eval_every_epochs = 0
  summary = train.train_and_evaluate(config, str(workdir))
  return workdir, summary


def _error(capsys, argv) -> str:
  """Runs the command line, which must fail with one `error:` line; returns it."""
  assert cli.main(argv) == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  return lines[0]


def test_evaluate_reproduces_the_run_and_writes_eval_json_beside_each_model(run_dir, capsys):
  workdir, summary = run_dir
  before = (workdir / 'summary.json').read_bytes()
  results = cli_results('evaluate', [str(workdir), '--batch-size', '128'])
  trained, condensed = results
  assert trained['form'] == 'trained' and condensed['form'] == 'condensed'
  assert trained['top1'] == pytest.approx(summary['accuracy'], abs=1e-9)
  assert condensed['top1'] == pytest.approx(summary['condensed_accuracy'], abs=1e-9)
  assert trained['loss'] == pytest.approx(summary['test_loss'], rel=1e-5)
  assert trained['examples'] == condensed['examples'] == summary['test_examples'] == 359
  assert trained['top1'] <= trained['top5'] <= 1 and condensed['top1'] <= condensed['top5']
  assert (trained['flops'], trained['params']) == (summary['flops'], summary['params'])
  assert condensed['flops'] == summary['condensed_flops']
  assert condensed['multiply_adds'] == summary['condensed_multiply_adds']
  assert trained['step'] == summary['total_steps']
  on_disk = json.loads((workdir / 'eval.json').read_text())
  assert on_disk['digits']['top1'] == trained['top1']
  on_disk = json.loads((workdir / 'condensed' / 'eval.json').read_text())
  assert on_disk['digits']['top1'] == condensed['top1']
  assert (workdir / 'summary.json').read_bytes() == before
  printed = capsys.readouterr().out
  assert f'trained ({workdir}/checkpoints/23) on digits: top-1 {trained["top1"]:.4f}' in printed


def cli_results(command, argv):
  from condensenet_jax.tools import evaluate, inspection  # pylint: disable=g-import-not-at-top
  import argparse  # pylint: disable=g-import-not-at-top
  module = {'evaluate': evaluate, 'inspect': inspection}[command]
  parser = argparse.ArgumentParser()
  module.add_arguments(parser)
  return module.run(parser.parse_args(argv))


def test_inspect_rows_add_up_to_both_forms(run_dir, tmp_path):
  workdir, summary = run_dir
  rows = cli_results('inspect', [str(workdir), '--out', str(tmp_path)])
  total = rows[-1]
  assert total['layer'] == 'total'
  assert (total['trained_flops'], total['trained_params']) == (summary['flops'],
                                                               summary['params'])
  assert (total['condensed_flops'], total['condensed_params']) == (
      summary['condensed_flops'], summary['condensed_params'])
  layers = [r for r in rows if r['layer'].startswith('denseblock_')]
  assert [r['layer'] for r in layers] == [f'denseblock_{b}/denselayer_1' for b in (1, 2, 3)]
  for r in layers:  # fully condensed, C = 4: every group keeps a quarter of its inputs
    assert r['kept_per_group'] == str(r['in_channels'] // 4) and r['groups'] == 4
  csv_text = (tmp_path / 'layers.csv').read_text()
  assert csv_text.splitlines()[0].startswith('layer,block,in_channels,groups,kept_per_group')
  assert len(csv_text.splitlines()) == len(rows) + 1
  assert (tmp_path / 'layers.md').read_text().count('\n') == len(rows) + 2


def test_export_jax_runs_without_this_package(run_dir, tmp_path):
  workdir, _ = run_dir
  assert cli.main(['export', str(workdir), '--format', 'jax']) == 0
  path = workdir / 'export' / 'condensed.jax'
  meta = json.loads((workdir / 'export' / 'meta.json').read_text())
  assert meta['image_size'] == 32 and meta['input_dtype'] == 'uint8'
  assert meta['jax']['input_shape'] == ['batch', 32, 32, 3]
  assert meta['class_names'] == [str(i) for i in range(10)]
  dataset = data.digits()
  images = dataset.test_images[:7]
  np.save(tmp_path / 'images.npy', images)
  script = textwrap.dedent(f"""
      import sys
      import jax, numpy as np
      exported = jax.export.deserialize(bytearray(open({str(path)!r}, 'rb').read()))
      for n in (7, 1):  # the batch dimension is symbolic
        images = np.load({str(tmp_path / 'images.npy')!r})[:n]
        np.save({str(tmp_path)!r} + f'/logits{{n}}.npy', np.asarray(exported.call(images)))
      assert not any(m.startswith('condensenet_jax') for m in sys.modules), 'imported'
  """)
  subprocess.run([sys.executable, '-c', script], check=True, cwd=tmp_path, timeout=300)
  expected = np.asarray(checkpoint.load_classifier(str(workdir / 'condensed'))(images))
  for n in (7, 1):
    logits = np.load(tmp_path / f'logits{n}.npy')
    np.testing.assert_allclose(logits, expected[:n], rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def test_export_tflite_matches_jax_on_the_digits_test_set(run_dir):
  tf = pytest.importorskip('tensorflow')
  workdir, _ = run_dir
  assert cli.main(['export', str(workdir), '--format', 'tflite']) == 0
  meta = json.loads((workdir / 'export' / 'meta.json').read_text())
  assert meta['tflite']['input_shape'] == [1, 32, 32, 3]
  interpreter = tf.lite.Interpreter(model_path=str(workdir / 'export' / 'condensed.tflite'))
  interpreter.allocate_tensors()
  source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  dataset = data.digits()
  classifier = checkpoint.load_classifier(str(workdir / 'condensed'))
  expected = np.asarray(classifier(dataset.test_images))
  logits = []
  for image in dataset.test_images:
    interpreter.set_tensor(source['index'], image[None])
    interpreter.invoke()
    logits.append(interpreter.get_tensor(sink['index'])[0])
  logits = np.stack(logits)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


def test_predict_image_files(run_dir, tmp_path, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _ = run_dir
  dataset = data.digits()
  for i in range(3):
    Image.fromarray(dataset.test_images[i]).save(tmp_path / f'digit{i}.png')
  big = np.kron(dataset.test_images[3], np.ones((3, 3, 1), np.uint8))  # 96x96: resized
  Image.fromarray(big).save(tmp_path / 'digit3.jpg', quality=100)
  from condensenet_jax.tools import predict  # pylint: disable=g-import-not-at-top
  parsed = _parse(predict, [str(workdir), str(tmp_path), '--top-k', '3'])
  results = predict.run(parsed)
  assert [pathlib.Path(r['image']).name for r in results] == [
      'digit0.png', 'digit1.png', 'digit2.png', 'digit3.jpg']
  expected = np.asarray(checkpoint.load_classifier(str(workdir / 'condensed'))(
      dataset.test_images[:3])).argmax(-1)
  assert [r['top'][0]['label'] for r in results[:3]] == list(expected)
  for r in results:
    assert len(r['top']) == 3 and r['top'][0]['class'] == str(r['top'][0]['label'])
    probabilities = [t['probability'] for t in r['top']]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
  assert 'digit0.png: ' in capsys.readouterr().out
  for artifact in ('jax', 'tflite'):  # the exported artifacts classify the same way
    assert cli.main(['export', str(workdir), '--format', artifact]) == 0
    again = predict.run(_parse(predict, [str(workdir / 'export' / f'condensed.{artifact}'),
                                         str(tmp_path), '--top-k', '3']))
    for a, b in zip(again, results, strict=True):
      assert [t['label'] for t in a['top']][:1] == [t['label'] for t in b['top']][:1]
      assert a['top'][0]['probability'] == pytest.approx(b['top'][0]['probability'], abs=1e-4)
  (tmp_path / 'broken.png').write_bytes(b'not an image')
  message = _error(capsys, ['predict', str(workdir), str(tmp_path / 'broken.png')])
  assert 'broken.png cannot be decoded as an image' in message


def _parse(module, argv):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  module.add_arguments(parser)
  return parser.parse_args(argv)


def test_bad_paths_end_in_one_error_line(run_dir, tmp_path, capsys):
  workdir, _ = run_dir
  message = _error(capsys, ['evaluate', str(tmp_path / 'nothing')])
  assert 'is not a run directory' in message
  half = tmp_path / 'half'
  (half / 'checkpoints').mkdir(parents=True)
  assert 'has no checkpoint yet' in _error(capsys, ['evaluate', str(half)])
  assert 'has no checkpoint yet' in _error(capsys, ['inspect', str(half)])
  message = _error(capsys, ['evaluate', str(workdir), '--dataset', 'imagenet2012'])
  assert 'takes 32x32 images in 10 classes, but imagenet2012 has 224x224' in message
  assert 'holds no condensed model' in _error(capsys, ['export', str(half), '--format', 'jax'])
  damaged = tmp_path / 'damaged'
  shutil.copytree(workdir / 'checkpoints' / '23', damaged / 'checkpoints' / '23')
  shutil.rmtree(damaged / 'checkpoints' / '23' / 'state')
  assert 'checkpoints/23 cannot be read' in _error(capsys, ['evaluate', str(damaged)])
  message = _error(capsys, ['evaluate', str(workdir), '--dataset', 'no_such_dataset'])
  assert "'no_such_dataset' is not a tfds dataset" in message
  assert not (half / 'export').exists() and not (half / 'eval.json').exists()


def test_every_command_has_help(capsys):
  first, *others = cli.COMMANDS  # the module entry point once, then the same parser in-process
  out = subprocess.run([sys.executable, '-m', 'condensenet_jax', first, '--help'],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
  assert out.stdout.startswith('usage: python -m condensenet_jax ' + first)
  for command in others:
    with pytest.raises(SystemExit) as exit_:
      cli.main([command, '--help'])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith('usage: python -m condensenet_jax ' + command)


def test_flops_per_layer_add_up():
  for model in (models.CondenseNet86(), models.CondensedCondenseNet.from_model(
      models.CondenseNet86()), models.DenseNetBC100()):
    rows = flops.per_layer(model, 32)
    assert sum(r['flops'] for r in rows) == flops.count(model, 32)[0]
    assert sum(r['params'] for r in rows) == flops.count(model, 32)[1]
    assert sum(r['multiply_adds'] for r in rows) == flops.multiply_adds(model, 32)


def _tiny_run(workdir, seed=0, growth=(4, 8, 8)):
  config = digits_config.get_config()
  config.num_epochs = 1
  config.model.stages = (1, 1, 1)
  config.model.growth = growth
  config.eval_every_epochs = 0
  config.seed = seed
  return train.train_and_evaluate(config, str(workdir))


def test_training_draws_its_pictures(run_dir):
  workdir, _ = run_dir
  for name in ('curves.png', 'connectivity.png', 'kept_per_group.png'):
    assert (workdir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', name


def test_connectivity_maps_account_for_every_input():
  from condensenet_jax import condense, plots  # pylint: disable=g-import-not-at-top
  model = models.CondenseNetTiny(stages=(3, 3, 3))
  variables = models.init_variables(model, seed=0)
  masks = condense.condense_all(variables['params'], variables['masks'], model)
  maps = plots.connectivity_maps(model, masks, variables['params'])
  assert sorted(maps) == [1, 2, 3]
  for block, (kept, weight) in maps.items():
    assert kept.shape == weight.shape == (3, 3)
    growth = model.growth[block - 1]
    first = models.num_final_channels(model.stages[:block - 1], model.growth[:block - 1]) \
        if block > 1 else 2 * model.growth[0]
    for row in range(3):  # fully condensed: a quarter of every layer's connections is kept
      widths = [first] + [growth] * row
      read = sum(k * w for k, w in zip(kept[row], widths))
      assert read == pytest.approx(sum(widths) / model.condense_factor)
      assert np.isnan(kept[row, row + 2:]).all()  # later layers are not inputs
      assert (weight[row, :row + 1] >= 0).all()


def test_plot_and_compare_commands(run_dir, tmp_path, capsys):
  workdir, summary = run_dir
  out = tmp_path / 'pictures'
  assert cli.main(['plot', str(workdir), '--out', str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == ['connectivity.png', 'curves.png',
                                                    'kept_per_group.png']
  others = [_tiny_run(tmp_path / f'seed{s}', seed=s) for s in (1, 2)]
  _tiny_run(tmp_path / 'wider', growth=(8, 8, 8))
  from condensenet_jax.tools import compare  # pylint: disable=g-import-not-at-top
  runs = [str(workdir), str(tmp_path / 'seed1'), str(tmp_path / 'seed2'), str(tmp_path / 'wider')]
  rows = compare.run(_parse(compare, runs + ['--csv', str(tmp_path / 'c.csv'),
                                             '--plot', str(tmp_path / 'c.png')]))
  assert [r['seeds'] for r in rows] == [3, 1]
  accuracies = np.array([summary['accuracy']] + [o['accuracy'] for o in others])
  assert rows[0]['accuracy'] == f'{accuracies.mean():.4f} +- {accuracies.std(ddof=1):.4f}'
  assert rows[0]['flops'] == summary['flops'] and rows[1]['flops'] != summary['flops']
  assert (tmp_path / 'c.csv').read_text().splitlines()[0].startswith('group,runs,seeds,accuracy')
  assert (tmp_path / 'c.png').read_bytes()[:4] == b'\x89PNG'
  assert '| group | runs | seeds | accuracy |' in capsys.readouterr().out
  message = _error(capsys, ['compare', str(workdir), str(tmp_path / 'nothing')])
  assert 'has no summary.json' in message


@pytest.fixture
def official_converted(tmp_path):
  """The official code's converted tiny ImageNet model (tests/fixtures/tiny_imagenet_g8) as a
  .npz state dict, its architecture as JSON, its input and its logits."""
  fixture = ROOT / 'tests' / 'fixtures' / 'tiny_imagenet_g8'
  with np.load(f'{fixture}.npz') as arrays:
    state = {k.removeprefix('converted/'): arrays[k] for k in arrays.files
             if k.startswith('converted/')}
    x, logits = arrays['x_nchw'].transpose(0, 2, 3, 1), arrays['converted_logits']
  np.savez(tmp_path / 'official.npz', **state)
  return tmp_path / 'official.npz', f'{fixture}.json', x, logits


def test_official_converted_weights_through_the_tools(official_converted, capsys):
  from condensenet_jax import artifacts  # pylint: disable=g-import-not-at-top
  path, architecture, x, expected = official_converted
  (item,) = artifacts.load(str(path), model_name=architecture)
  assert item.form == 'condensed' and item.dataset == 'imagenet2012'
  logits = jax.jit(item.model.apply)(item.variables, x)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  message = _error(capsys, ['evaluate', str(path), '--model', 'CondenseNet74_C8'])
  assert f'{path} does not fit --model CondenseNet74_C8: ' in message
  assert 'check --model and --num-classes' in message
  assert 'name it with --model' in _error(capsys, ['evaluate', str(path)])


def test_evaluate_official_weights_on_an_imagenet_format_dataset(official_converted):
  """The documented command for the released ImageNet checkpoints, run on a tiny tfds dataset
  in ImageNet's format (images of any size, a 'validation' split) through the real
  evaluation pipeline."""
  from tiny_images import tiny_images  # pylint: disable=g-import-not-at-top
  path, architecture, _, _ = official_converted
  data_dir = str(path.parent / 'tfds')
  tiny_images.TinyImages(data_dir=data_dir).download_and_prepare()
  assert cli.main(['evaluate', str(path), '--model', architecture, '--dataset', 'tiny_images',
                   '--data-dir', data_dir, '--batch-size', '4']) == 0
  result = json.loads(path.with_suffix('.eval.json').read_text())['tiny_images']
  assert result['examples'] == tiny_images.NUM_VALIDATION and result['form'] == 'condensed'
  assert 0 <= result['top1'] <= result['top5'] <= 1
  model = models.CondenseNet(stages=(1, 2, 2, 1, 1), growth=(8, 8, 16, 16, 16), group_1x1=8,
                             group_3x3=8, condense_factor=8, num_classes=1000, stem='imagenet')
  assert result['flops'] == flops.count(models.CondensedCondenseNet.from_model(model), 224)[0]


def test_the_console_script_and_every_subpackage_are_installed():
  import importlib  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  module, _, function = project['project']['scripts']['condensenet'].partition(':')
  assert getattr(importlib.import_module(module), function) is cli.main
  packages = {str(p.parent.relative_to(ROOT)).replace(os.sep, '.')
              for p in (ROOT / 'condensenet_jax').rglob('__init__.py')}
  assert set(project['tool']['setuptools']['packages']) == packages

