"""MIML (CVPR 2024) and MIMLv2 (arXiv 2508.20987) as a TFDS dataset, built without TensorFlow.

    miml-jax data build mimlv2 --config miml_part1 --manual-dir /data

The manual_dir holds each release in the MIML layout, one folder per config:

    MIML_Part1/imgs/<k>.jpg + MIML_Part1/masks/<k>.png   miml_part1  SPG: in-place edits (DASS)
    MIML_Part2/...                                       miml_part2  SDG: pasted donors (SACM)
    MIMLv2/...                                           mimlv2      both (CAAAv2)
    caaa/...                                             caaa        this project's annotations

and optionally `annotations.jsonl` next to imgs/: one {"id": "<k>", "source": "spg" | "sdg",
"qes": float} per line (the CAAA writer's output). Examples keep what training and filtering
need: the image file's own bytes, the soft mask (0..255, as released), its QES (from
annotations.jsonl, else computed from the soft mask with miml_jax.qes), and the SPG / SDG
category ("unknown" when neither the config nor the annotations say).
"""

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from miml_jax import io, qes
from miml_jax.errors import UserInputError

# config name -> (folder in manual_dir, category of every example or None, description)
CONFIGS = {
  "miml_part1": ("MIML_Part1", "spg", "MIML Part1: same-size pairs (SPG), DASS annotations"),
  "miml_part2": ("MIML_Part2", "sdg", "MIML Part2: different-size pairs (SDG), SACM"),
  "mimlv2": ("MIMLv2", None, "MIMLv2: CAAAv2 annotations of web pairs, SPG and SDG"),
  "caaa": ("caaa", None, "the output of this project's CAAA auto-annotation"),
}


class Builder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images as original bytes, soft masks, QES, SPG/SDG source."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=name, description=description)
    for name, (_, _, description) in CONFIGS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put each release in the MIML layout under manual_dir: "
    + ", ".join(
      f"{folder}/imgs + {folder}/masks ({name})" for name, (folder, _, _) in CONFIGS.items()
    )
  )

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # the file's bytes
          "mask": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG, 0..255 soft
          "id": tfds.features.Text(),
          "is_jpeg": np.bool_,
          "qes": np.float32,
          "source": tfds.features.Text(),  # spg | sdg | unknown
        }
      ),
      homepage="https://github.com/qcf-568/MIML",
    )

  def _split_generators(self, dl_manager):
    folder, _, _ = CONFIGS[self.builder_config.name]
    root = os.path.join(os.fspath(dl_manager.manual_dir), folder)
    return {"train": self._generate_examples(root)}

  def _generate_examples(self, root):
    from miml_jax.input.sources import FolderSource  # the MIML layout's one reader

    if not os.path.isdir(root):
      raise UserInputError(f"{root}: no such folder; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    folder = FolderSource(root)
    annotations = _read_annotations(os.path.join(root, "annotations.jsonl"))
    category = CONFIGS[self.builder_config.name][1]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in folder.images]
    missing_qes = [m for s, m in zip(stems, folder.masks) if "qes" not in annotations.get(s, {})]
    computed = dict(zip(missing_qes, qes.qes_files(missing_qes))) if missing_qes else {}
    for stem, image_path, mask_path in zip(stems, folder.images, folder.masks):
      image_bytes = io.read_bytes(image_path)
      image = io.decode_image(image_bytes, image_path)
      mask = io.read_mask(mask_path)
      io.check_same_size(image, mask, image_path, mask_path)
      note = annotations.get(stem, {})
      yield (
        stem,
        {
          "image": image_bytes,
          "mask": io.encode_image(mask, ".png"),
          "id": stem,
          "is_jpeg": image_path.lower().endswith((".jpg", ".jpeg")),
          "qes": float(note["qes"]) if "qes" in note else float(computed[mask_path]),
          "source": note.get("source", category or "unknown"),
        },
      )


def _read_annotations(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  notes = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        notes[str(record["id"])] = record
      except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{path}:{number}: expected a JSON object with an 'id' ({e})") from e
      if record.get("source", "spg") not in ("spg", "sdg", "unknown"):
        raise UserInputError(f"{path}:{number}: source must be spg, sdg or unknown")
  return notes
