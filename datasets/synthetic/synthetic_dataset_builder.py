"""The embedded procedural forgery set (miml_jax/input/synthetic.py) as a TFDS dataset, so it can
go through the same path as every downloaded dataset (`tfds:synthetic/default`).

    miml-jax data build synthetic --config default --manual-dir .

Nothing is downloaded (manual_dir is unused). Images and masks are stored as PNG, losslessly: a
built example decodes to exactly the arrays of `data.train=synthetic`. Configs: `default` (the
source's own sizes, 4096 train / 128 validation at 128 x 128) and `tiny` (16 / 8 at 64 x 64,
for tests).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from miml_jax import io


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  num_train: int = 4096
  num_validation: int = 128
  image_size: int = 128
  seed: int = 0


class Builder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "The embedded synthetic forgeries."}
  BUILDER_CONFIGS = [
    SyntheticConfig(name="default", description="4096 / 128 examples at 128 x 128"),
    SyntheticConfig(
      name="tiny",
      description="16 / 8 examples at 64 x 64",
      num_train=16,
      num_validation=8,
      image_size=64,
    ),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG
          "mask": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG, 0 / 255
          "id": tfds.features.Text(),
          "is_jpeg": np.bool_,
        }
      )
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
      "train": self._generate_examples("train", config.num_train),
      "validation": self._generate_examples("validation", config.num_validation),
    }

  def _generate_examples(self, split, num_examples):
    from miml_jax.input.sources import SyntheticSource

    config = self.builder_config
    source = SyntheticSource(split, num_examples, config.image_size, config.seed)
    for index in range(len(source)):
      sample = source[index]
      yield (
        sample["id"],
        {
          "image": io.encode_image(sample["image"], ".png"),
          "mask": io.encode_image(sample["mask"], ".png"),
          "id": sample["id"],
          "is_jpeg": False,
        },
      )
