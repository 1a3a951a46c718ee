"""COCO images with their instance masks as a TFDS dataset, built without TensorFlow: the host
images of Object Jitter (`coco:tfds:coco_instances`) and of synthetic splicing and copy-move
(`coco_splice:tfds:coco_instances`, `coco_copymove:tfds:coco_instances`).

    miml-jax data build coco_instances --manual-dir /data/coco

manual_dir is a COCO folder in either layout miml_jax.input.coco.CocoInstances reads:
- `images/` + `annotations/instances.json`: the images' `split` field ('train2017', 'val2017',
  as in ../shared/data/coco_mini) makes the splits; without one, every image is 'train';
- the official `train2017/`, `val2017/` + `annotations/instances_{train,val}2017.json`: a split
  per annotation file there.
COCO's 'val' is stored as the split 'validation' (the name of the data role that reads it);
other names are kept. As in CocoInstances, crowd annotations are left out and so are images
with no other annotation.

Each example holds the image file's own bytes (never re-encoded), its file name (`id`, what
samples are called), COCO image id, height and width, and per instance: the mask as COCO's
compressed RLE string, its category id, annotation id and area (the mask's pixel count).

Why per-instance RLE rather than one PNG of instance ids: COCO instances overlap (a rider and
her horse; 33 of 61 coco_mini images checked have overlapping masks), which a label image cannot
hold, and the masks must come back exactly as CocoInstances decodes them so that a built dataset
and its folder give identical samples. Polygons are rasterized once, here, with CocoInstances'
own decoder; the RLE string is lossless, a few hundred bytes per object, readable by pycocotools,
and decoded only when an example is read. Examples are stored in CocoInstances' order (shuffling
is disabled and keys are the items' indices), so index i is the same image in both.
"""

import re

import numpy as np
import tensorflow_datasets as tfds

from miml_jax.errors import UserInputError
from miml_jax.input import coco

# COCO's split name -> the stored split's (the data roles are 'train' and 'validation').
SPLIT_NAMES = {"val": "validation"}


class Builder(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Image bytes and per-instance compressed RLE masks, category ids, "
    "annotation ids, areas."
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "manual_dir is a COCO folder: images/ + annotations/instances.json (images may carry a "
    "'split' field such as 'train2017'), or the official train2017/, val2017/ + "
    "annotations/instances_train2017.json, annotations/instances_val2017.json"
  )

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # the file's bytes
          "id": tfds.features.Text(),  # the image's file_name
          "image_id": np.int64,  # COCO's image id (-1 if not an integer)
          "height": np.int32,
          "width": np.int32,
          # Per instance: COCO compressed RLE (column-major runs) of the decoded mask.
          "instances": tfds.features.Tensor(shape=(None,), dtype=np.object_),
          "category_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
          "annotation_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
          "areas": tfds.features.Tensor(shape=(None,), dtype=np.int64),  # pixel counts
        }
      ),
      # Stored in key order (the reader's index), so index i is the same image as in the
      # COCO folder it was built from.
      disable_shuffling=True,
      homepage="https://cocodataset.org",
    )

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    splits = coco.find_splits(root)
    if not splits:
      raise UserInputError(
        f"{root}: no image with a (non-crowd) annotation; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    generators = {}
    for name in splits:
      stored = SPLIT_NAMES.get(name, name)
      if not re.fullmatch(r"[A-Za-z0-9_]+", stored):
        raise UserInputError(
          f"{splits[name]}: split name {name!r} cannot name a dataset split "
          f"(letters, digits and _ only)"
        )
      generators[stored] = self._generate_examples(root, name)
    return generators

  def _generate_examples(self, root, split_name):
    instances = coco.CocoInstances(root, split_name=split_name)
    for index in range(len(instances)):
      # Decoding here checks each image and mask before anything is stored.
      item, image_bytes = instances.read_with_bytes(index)
      info = instances.image_info(index)
      yield (
        index,
        {
          "image": image_bytes,
          "id": item["name"],
          "image_id": info["image_id"],
          "height": info["height"],
          "width": info["width"],
          "instances": np.array(
            [
              coco.encode_rle_string(coco.mask_to_runs(mask)).encode("ascii")
              for mask in item["instances"]
            ],
            dtype=object,
          ),
          "category_ids": item["category_ids"],
          "annotation_ids": item["annotation_ids"],
          "areas": item["areas"],
        },
      )
