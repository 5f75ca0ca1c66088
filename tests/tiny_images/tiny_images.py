"""A tiny ImageNet-shaped tfds dataset (variable-size RGB images, 'train' and 'validation'),
generated locally, to test the tf.data pipeline without ImageNet."""

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 40
NUM_VALIDATION = 13


class TinyImages(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(NUM_TRAIN, 0),
            'validation': self._generate_examples(NUM_VALIDATION, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = rng.integers(40, 90, size=2)
      image = np.full((h, w, 3), i % 256, np.uint8)  # pixel value = example index
      yield i, {'image': image, 'label': int(i % 5)}
