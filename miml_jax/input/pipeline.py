"""The grain training pipeline and the evaluation batcher.

Training: random access source -> per-host shard -> shuffle -> repeat -> per-sample random
augmentation (deterministic per (seed, index)) -> batch -> optional multiprocess prefetch. The
iterator's state is checkpointed with the model, so a resumed run sees exactly the batches an
uninterrupted run would have.

Evaluation: every image at its own size, padded to a multiple of 32 (never resized or cropped),
grouped into fixed-size batches per padded shape so each shape compiles once.
"""

import collections
from typing import Iterator

import grain
import numpy as np

from miml_jax.input import transforms


class _TrainTransform(grain.transforms.RandomMap):

  def __init__(self, augment: transforms.AugmentConfig):
    self.augment = augment

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image, label = transforms.train_augment(element["image"], element["mask"], rng, self.augment)
    return {"image": image, "label": label}


def train_dataset(source, *, batch_size: int, augment: transforms.AugmentConfig, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0) -> grain.IterDataset:
  """Per-host batches of {'image': uint8 (B, S, S, 3), 'label': uint8 (B, S, S)} forever."""
  dataset = grain.MapDataset.source(source).seed(seed)
  dataset = dataset[process_index::process_count]
  dataset = dataset.shuffle().repeat(None).random_map(_TrainTransform(augment))
  dataset = dataset.batch(batch_size, drop_remainder=True).to_iter_dataset()
  if num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return dataset


def eval_batches(source, batch_size: int, multiple: int = 32,
                 limit: int | None = None) -> Iterator[dict]:
  """Yields batches {'image', 'valid' (B,) bool, 'samples'} grouped by padded shape.

  `samples` holds the source records of the valid rows (with their masks), in batch order.

  Every batch has exactly `batch_size` rows (the last of a shape is filled with copies marked
  invalid), so one compiled function serves each padded shape.
  """
  count = len(source) if limit is None else min(limit, len(source))
  buckets: dict[tuple, list] = collections.defaultdict(list)

  def flush(key):
    rows = buckets.pop(key)
    images = [r[0] for r in rows]
    valid = [True] * len(rows) + [False] * (batch_size - len(rows))
    images += [images[0]] * (batch_size - len(rows))
    return {"image": np.stack(images), "valid": np.array(valid), "samples": [r[1] for r in rows]}

  for index in range(count):
    sample = dict(source[index], index=index)
    image, _ = transforms.pad_to_multiple(sample["image"], multiple)
    key = image.shape
    buckets[key].append((image, sample))
    if len(buckets[key]) == batch_size:
      yield flush(key)
  for key in list(buckets):
    yield flush(key)
