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

Evaluation: each sample made into the model's inputs by its task (every image at its own size,
padded to a multiple of 32, never cropped, for the dense tasks), grouped into fixed-size
batches per input shape so each shape compiles once.
"""

import collections
from collections.abc import Callable, Iterator

import grain
import numpy as np

from miml_jax.input import transforms


class _TrainTransform(grain.transforms.RandomMap):
  """A task's per-example transform (tasks.Task.train_transform) as a grain random map."""

  def __init__(self, transform: Callable[[dict, np.random.Generator], dict]):
    self.transform = transform

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return self.transform(element, rng)


def train_dataset(
  source,
  *,
  batch_size: int,
  transform: Callable,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  start_step: int = 0,
  num_workers: int = 0,
  read_threads: int = 16,
  prefetch_batches: int = 16,
) -> grain.IterDataset:
  """This process's rows of global batches start_step, start_step + 1, ... forever.

  batch_size is the global batch B; `transform(element, rng)` makes one training example (a
  dict of arrays, the task's fields, plus 'skipped': what data.on_error='skip' replaced, '' if
  nothing), and each element is those fields stacked, (B/P, ...) for P processes.
  `read_threads` batches are made at once, and at most `prefetch_batches` wait ready (per
  worker): that bounds host memory to about prefetch_batches x one local batch (grain's default
  buffer is 500 batches, 100+ GB for a 256 x 512^2 batch).
  """
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} does not split over {process_count} processes")
  dataset = grain.MapDataset.source(source).seed(seed)
  dataset = dataset.shuffle().repeat(None).random_map(_TrainTransform(transform))
  dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
  dataset = dataset[start_step * process_count + process_index :: process_count]
  dataset = dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch_batches, 1))
  )
  if num_workers > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return dataset


def eval_batches(
  source,
  batch_size: int,
  multiple: int = 32,
  limit: int | None = None,
  max_pending: int | None = None,
  prepare: Callable | None = None,
) -> Iterator[dict]:
  """Yields batches {<input fields>, 'valid' (B,) bool, 'samples', 'metas'} grouped by shape.

  `prepare(sample) -> (arrays, meta)` turns a source record into the model's host inputs (a dict
  of arrays; the task's `eval_inputs`) and what its prediction needs to be mapped back; the
  default pads `image` to a multiple of `multiple`. `samples` holds the source records of the
  valid rows (with their masks) and `metas` their metas, in batch order.

  Every batch has exactly `batch_size` rows (the last of a shape is filled with copies marked
  invalid), so one compiled function serves each combination of input shapes. At most
  `max_pending` examples (default 4 batches) wait for their shape's batch to fill: on data where
  nearly every image has its own size (IMD2020, NIST16) the fullest waiting batch goes out
  part-filled instead of the whole dataset piling up in memory. A larger `multiple` means fewer
  shapes (fewer compiles).
  """
  if prepare is None:

    def prepare(sample):
      return {"image": transforms.pad_to_multiple(sample["image"], multiple)[0]}, None

  count = len(source) if limit is None else min(limit, len(source))
  max_pending = max_pending or 4 * batch_size
  buckets: dict[tuple, list] = collections.defaultdict(list)

  def flush(key):
    rows = buckets.pop(key)
    fill = batch_size - len(rows)
    batch = {
      name: np.stack([r[0][name] for r in rows] + [rows[0][0][name]] * fill) for name in rows[0][0]
    }
    batch["valid"] = np.array([True] * len(rows) + [False] * fill)
    batch["samples"] = [r[1] for r in rows]
    batch["metas"] = [r[2] for r in rows]
    return batch

  for index in range(count):
    sample = source[index]
    if sample is None:  # Left out by data.on_error='skip' (the source keeps the report).
      continue
    sample = dict(sample, index=index)
    arrays, meta = prepare(sample)
    key = tuple((name, array.shape) for name, array in arrays.items())
    buckets[key].append((arrays, sample, meta))
    if len(buckets[key]) == batch_size:
      yield flush(key)
    elif sum(map(len, buckets.values())) > max_pending:
      yield flush(max(buckets, key=lambda k: len(buckets[k])))
  for key in list(buckets):
    yield flush(key)
