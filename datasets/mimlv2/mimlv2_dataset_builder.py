"""MIML (CVPR 2024) and MIMLv2 (arXiv 2508.20987) as a TFDS dataset, built without TensorFlow.

    miml-jax data build mimlv2 --config miml_part1 --manual-dir /data
    miml-jax data build mimlv2 --config annotations --manual-dir annotated/

The manual_dir holds each release in the MIML layout, one folder per config:

    MIML_Part1/imgs/<k>.jpg + MIML_Part1/masks/<k>.png   miml_part1  SPG: in-place edits (DASS)
    MIML_Part2/...                                       miml_part2  SDG: pasted donors (SACM)
    MIMLv2/...                                           mimlv2      both (CAAAv2)
    imgs/ + masks/ (the manual_dir itself)               annotations `miml-jax annotate --out`

and optionally annotation records next to imgs/: `annotations.jsonl`, or the files
`annotations-<k>-of-<n>.jsonl` that `miml-jax annotate` writes (one per process), with one
{"id": "<k>", "source": "spg" | "sdg", "qes": float} per line ("name", when given, is the file
stem the record is for; records of pairs that were not kept have no image and are ignored).
Examples keep what training and filtering need: the image file's own bytes, the soft mask
(0..255, as released), its QES (from the records, else computed from the soft mask with
miml_jax.qes) and the SPG / SDG category ("unknown" when neither the config nor the records
say).
"""

import glob
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from miml_jax.errors import UserInputError
from miml_jax.input import tfds_build

# config name -> (folder in manual_dir, category of every example or None, description)
CONFIGS = {
  "miml_part1": ("MIML_Part1", "spg", "MIML Part1: same-size pairs (SPG), DASS annotations"),
  "miml_part2": ("MIML_Part2", "sdg", "MIML Part2: different-size pairs (SDG), SACM"),
  "mimlv2": ("MIMLv2", None, "MIMLv2: CAAAv2 annotations of web pairs, SPG and SDG"),
  "annotations": (".", None, "the output of `miml-jax annotate` (CAAA auto-annotation)"),
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

  # Set by `miml-jax data build --beam-runner R`: the examples are then made by Apache Beam
  # workers (TFDS's Beam support), one pure function per image, on any runner.
  use_beam = False

  def _generate_examples(self, root):
    from miml_jax.input.sources import FolderSource  # the MIML layout's one reader

    if not os.path.isdir(root):
      raise UserInputError(f"{root}: no such folder; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    folder = FolderSource(root)
    annotations = {}
    for path in sorted(glob.glob(os.path.join(root, "annotations*.jsonl"))):
      annotations.update(_read_annotations(path))
    category = CONFIGS[self.builder_config.name][1] or "unknown"
    items = []
    for image_path, mask_path in zip(folder.images, folder.masks):
      stem = os.path.splitext(os.path.basename(image_path))[0]
      note = annotations.get(stem, {})
      items.append((stem, image_path, mask_path, note.get("qes"), note.get("source", category)))
    if self.use_beam:
      import apache_beam as beam

      # The per-example function lives in the library: Beam's worker processes import it by
      # name, and this builder module is loaded from a file path they do not know.
      return beam.Create(items) | beam.Map(tfds_build.miml_example)
    return map(tfds_build.miml_example, items)


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
        if "name" not in record and "id" not in record and "status" in record:
          continue  # annotate's record of a pair that failed before it had an id: no file.
        notes[str(record.get("name", record["id"]))] = record
      except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{path}:{number}: expected a JSON object with an 'id' ({e})") from e
      if record.get("source", "spg") not in ("spg", "sdg", "unknown"):
        raise UserInputError(f"{path}:{number}: source must be spg, sdg or unknown")
  return notes
