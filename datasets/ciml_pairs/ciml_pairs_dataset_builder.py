"""Web forgery pairs in the CAAA input layout, the raw material of category-aware
auto-annotation (docs/methods.md, Not yet built), as a TFDS dataset built without TensorFlow.

    miml-jax data build ciml_pairs --manual-dir /data/web_pairs

manual_dir/<pair_id>/0.<ext> is the authentic image, <pair_id>/1.<ext> the forged one, and an
optional <pair_id>/mask.<ext> a hand-made mask of the forgery. Both images are kept as their
files' bytes; `same_size` is the first hint CAAA's pair classifier gets (same-size pairs are
mostly in-place edits, SPG; the others pasted donors, SDG).
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from miml_jax import io
from miml_jax.errors import UserInputError


class Builder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Authentic and forged image bytes, optional mask, same_size."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "manual_dir holds one folder per pair: <pair_id>/0.<ext> "
    "(authentic), <pair_id>/1.<ext> (forged), optionally "
    "<pair_id>/mask.<ext>"
  )

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "authentic": tfds.features.Tensor(shape=(), dtype=np.object_),  # file bytes
          "forged": tfds.features.Tensor(shape=(), dtype=np.object_),  # file bytes
          "mask": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG, b"" if none
          "has_mask": np.bool_,
          "same_size": np.bool_,
          "id": tfds.features.Text(),
        }
      )
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root):
    pairs = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
    if not pairs:
      raise UserInputError(f"{root}: no pair folders; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    for pair in pairs:
      folder = os.path.join(root, pair)
      files = {
        os.path.splitext(name)[0]: os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(io.IMAGE_EXTENSIONS)
      }
      for role, what in (("0", "authentic"), ("1", "forged")):
        if role not in files:
          raise UserInputError(f"{folder}: no {role}.<ext> ({what} image)")
      authentic_bytes, forged_bytes = io.read_bytes(files["0"]), io.read_bytes(files["1"])
      authentic = io.decode_image(authentic_bytes, files["0"])
      forged = io.decode_image(forged_bytes, files["1"])
      mask = b""
      if "mask" in files:
        mask_array = io.read_mask(files["mask"])
        io.check_same_size(forged, mask_array, files["1"], files["mask"])
        mask = io.encode_image(mask_array, ".png")
      yield (
        pair,
        {
          "authentic": authentic_bytes,
          "forged": forged_bytes,
          "mask": mask,
          "has_mask": bool(mask),
          "same_size": authentic.shape == forged.shape,
          "id": pair,
        },
      )
