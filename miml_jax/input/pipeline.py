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
padded to a multiple of 32, never cropped, for the dense tasks), grouped into batches of a fixed
number of rows per input shape (at most a budget of pixels) so each shape compiles once; an
image over the budget comes as the tiles the predictor cut it into.
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
  max_batch_pixels: int | None = None,
  row_multiple: int = 1,
  max_pending_bytes: int | None = None,
) -> Iterator[dict]:
  """Yields batches {<input fields>, 'valid' (B,) bool, 'samples', 'metas', 'parts'} grouped
  by shape.

  `prepare(sample) -> (arrays, meta)` turns a source record into the model's host inputs (a dict
  of arrays; the task's `eval_inputs`) and what its prediction needs to be mapped back; the
  default pads `image` to a multiple of `multiple`. `arrays` may also be a list of such dicts:
  the rows of one example cut into parts (tiles of an image too large for one batch); they go
  out at once, in batches of their own, before the next example is read. `samples` holds the
  source records of the valid rows (with their masks), `metas` their metas and `parts` their
  (part, number of parts), in batch order: (0, 1) for a whole example.

  Every batch of one shape has the same number of rows (the last of a shape is filled with
  copies marked invalid), so one compiled function serves each combination of input shapes:
  `batch_size`, or with `max_batch_pixels` (per device; `row_multiple` = the devices a batch is
  split over, a divisor of batch_size) row_multiple x min(batch_size / row_multiple,
  max_batch_pixels // pixels), where pixels is H x W of the shape's largest array, at least one
  row per device. The parts of one example fill batches of row_multiple x
  max(1, max_batch_pixels // pixels) rows whatever batch_size is.

  At most `max_pending` examples (default 4 batches), holding at most `max_pending_bytes`
  (their inputs and the arrays of their records; default 64 x row_multiple x max_batch_pixels
  when that is given, else unbounded), wait for their shape's batch to fill: on data where
  nearly every image has its own size (IMD2020, NIST16) the fullest (or heaviest) waiting batch
  goes out part-filled instead of the whole dataset, or a few huge images, piling up in memory.
  A larger `multiple` means fewer shapes (fewer compiles).
  """
  if prepare is None:

    def prepare(sample):
      return {"image": transforms.pad_to_multiple(sample["image"], multiple)[0]}, None

  if batch_size % row_multiple:
    raise ValueError(f"batch_size {batch_size} is not a multiple of row_multiple {row_multiple}")
  count = len(source) if limit is None else min(limit, len(source))
  max_pending = max_pending or 4 * batch_size
  if max_pending_bytes is None and max_batch_pixels is not None:
    max_pending_bytes = 64 * row_multiple * max_batch_pixels
  buckets: dict[tuple, list] = collections.defaultdict(list)
  weights: dict[tuple, int] = collections.defaultdict(int)

  def rows_for(key, parts: bool = False) -> int:
    if max_batch_pixels is None:
      return batch_size
    pixels = max(shape[0] * shape[1] if len(shape) >= 2 else 1 for _, shape in key)
    per_device = max(1, max_batch_pixels // pixels)
    return row_multiple * (per_device if parts else min(batch_size // row_multiple, per_device))

  def make_batch(rows, size):
    fill = size - len(rows)
    first = rows[0][0]
    batch = {name: np.stack([r[0][name] for r in rows] + [first[name]] * fill) for name in first}
    batch["valid"] = np.array([True] * len(rows) + [False] * fill)
    batch["samples"] = [r[1] for r in rows]
    batch["metas"] = [r[2] for r in rows]
    batch["parts"] = [r[3] for r in rows]
    return batch

  def flush(key):
    weights.pop(key, None)
    return make_batch(buckets.pop(key), rows_for(key))

  for index in range(count):
    sample = source[index]
    if sample is None:  # Left out by data.on_error='skip' (the source keeps the report).
      continue
    sample = dict(sample, index=index)
    arrays, meta = prepare(sample)
    if isinstance(arrays, list):  # The parts of one example (tiles): out at once.
      key = _shape_key(arrays[0])
      size = rows_for(key, parts=True)
      rows = [(part, sample, meta, (k, len(arrays))) for k, part in enumerate(arrays)]
      for start in range(0, len(rows), size):
        yield make_batch(rows[start : start + size], size)
      continue
    key = _shape_key(arrays)
    buckets[key].append((arrays, sample, meta, (0, 1)))
    weights[key] += _nbytes(arrays) + _nbytes(sample)
    if len(buckets[key]) == rows_for(key):
      yield flush(key)
      continue
    if sum(map(len, buckets.values())) > max_pending:
      yield flush(max(buckets, key=lambda k: len(buckets[k])))
    while max_pending_bytes is not None and buckets and sum(weights.values()) > max_pending_bytes:
      yield flush(max(weights, key=weights.get))
  for key in list(buckets):
    yield flush(key)


def _shape_key(arrays: dict) -> tuple:
  return tuple((name, array.shape) for name, array in arrays.items())


def _nbytes(arrays: dict) -> int:
  return sum(v.nbytes for v in arrays.values() if isinstance(v, np.ndarray))
