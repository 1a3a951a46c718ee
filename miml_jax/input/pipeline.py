"""The grain training pipeline and the evaluation batcher.

Training: random access source -> shuffle (a new permutation each epoch) -> repeat -> per-sample
random augmentation (deterministic per (seed, global index)) -> batch -> this process's share ->
optional multiprocess prefetch. Every stage is index-addressable, so the stream is a pure function
of (seed, global index):

* Global batch g is elements [g*B, (g+1)*B) of that stream, whatever the number of processes:
  the stream is cut into local batches of B/P and process p takes local batches g*P + p. Its
  rows land on its own devices, in process order, when the trainer assembles the global array
  (jax.make_array_from_process_local_data). Sharding the source per host before shuffling, the
  usual recipe, would make the data depend on the host count.
* The iterator's state is the step: a run resumed at step s starts at global batch s and sees
  exactly the batches an uninterrupted run would have, on any number of processes or workers
  (grain's own per-process iterator state could only be restored on the same process count).

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
    # What data.on_error='skip' replaced to produce this example ('' if nothing): the trainer
    # counts and reports it.
    return {"image": image, "label": label, "skipped": element.get("skipped", "")}


def train_dataset(source, *, batch_size: int, augment: transforms.AugmentConfig, seed: int,
                  process_index: int = 0, process_count: int = 1, start_step: int = 0,
                  num_workers: int = 0, read_threads: int = 16,
                  prefetch_batches: int = 16) -> grain.IterDataset:
  """This process's rows of global batches start_step, start_step + 1, ... forever.

  batch_size is the global batch B; each element is {'image': uint8 (B/P, S, S, 3),
  'label': uint8 (B/P, S, S), 'skipped': str (B/P,)} for P processes. `read_threads` batches
  are made at once, and at most `prefetch_batches` wait ready (per worker): that bounds host
  memory to about prefetch_batches x one local batch (grain's default buffer is 500 batches,
  100+ GB for a 256 x 512^2 batch).
  """
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} does not split over {process_count} processes")
  dataset = grain.MapDataset.source(source).seed(seed)
  dataset = dataset.shuffle().repeat(None).random_map(_TrainTransform(augment))
  dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
  dataset = dataset[start_step * process_count + process_index::process_count]
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=max(prefetch_batches, 1)))
  if num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return dataset


def eval_batches(source, batch_size: int, multiple: int = 32,
                 limit: int | None = None, max_pending: int | None = None) -> Iterator[dict]:
  """Yields batches {'image', 'valid' (B,) bool, 'samples'} grouped by padded shape.

  `samples` holds the source records of the valid rows (with their masks), in batch order.

  Every batch has exactly `batch_size` rows (the last of a shape is filled with copies marked
  invalid), so one compiled function serves each padded shape. At most `max_pending` examples
  (default 4 batches) wait for their shape's batch to fill: on data where nearly every image has
  its own size (IMD2020, NIST16) the fullest waiting batch goes out part-filled instead of the
  whole dataset piling up in memory. A larger `multiple` means fewer shapes (fewer compiles).
  """
  count = len(source) if limit is None else min(limit, len(source))
  max_pending = max_pending or 4 * batch_size
  buckets: dict[tuple, list] = collections.defaultdict(list)

  def flush(key):
    rows = buckets.pop(key)
    images = [r[0] for r in rows]
    valid = [True] * len(rows) + [False] * (batch_size - len(rows))
    images += [images[0]] * (batch_size - len(rows))
    return {"image": np.stack(images), "valid": np.array(valid), "samples": [r[1] for r in rows]}

  for index in range(count):
    sample = source[index]
    if sample is None:  # Left out by data.on_error='skip' (the source keeps the report).
      continue
    sample = dict(sample, index=index)
    image, _ = transforms.pad_to_multiple(sample["image"], multiple)
    key = image.shape
    buckets[key].append((image, sample))
    if len(buckets[key]) == batch_size:
      yield flush(key)
    elif sum(map(len, buckets.values())) > max_pending:
      yield flush(max(buckets, key=lambda k: len(buckets[k])))
  for key in list(buckets):
    yield flush(key)
