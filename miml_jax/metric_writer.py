"""Where a run's scalars go: `<workdir>/metrics.jsonl` and TensorBoard event files in
`<workdir>/tensorboard/`, written by process 0 only.

    tensorboard --logdir W/tensorboard

TensorBoard files are written with the `tensorboard` package's own event writer and protos,
without TensorFlow (and without tensorboardX, which imports torch whenever it is installed).
metrics.jsonl holds one JSON object per line with every value, finite or not, for scripts.

A resumed run first drops the rows a killed run logged after the checkpoint it resumes from
(those steps are trained again), and marks the restart in TensorBoard, which then discards the
orphaned points itself.
"""

import json
import math
import os
import time

import jax


class MetricWriter:
  def __init__(self, workdir: str, tensorboard: bool = True, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._events = None
    if not self.enabled:
      return
    if start_step and os.path.isfile(self.jsonl_path):
      with open(self.jsonl_path) as f:
        lines = f.read().splitlines()
      kept = [line for line in lines if line and json.loads(line)["step"] <= start_step]
      if len(kept) != len(lines):
        with open(self.jsonl_path, "w") as f:
          f.writelines(line + "\n" for line in kept)
    if tensorboard:
      from tensorboard.compat.proto import event_pb2
      from tensorboard.summary.writer.event_file_writer import EventFileWriter

      self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))
      if start_step:
        self._events.add_event(
          event_pb2.Event(
            wall_time=time.time(),
            step=start_step,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
          )
        )

  def write(self, step: int, scalars: dict):
    """Appends {'step': step, **scalars} to metrics.jsonl and each number to TensorBoard."""
    if not self.enabled:
      return
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")
    if self._events is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2

      values = [
        summary_pb2.Summary.Value(tag=name, simple_value=float(value))
        for name, value in scalars.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
      ]
      self._events.add_event(
        event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
      )

  def flush(self):
    if self._events is not None:
      self._events.flush()

  def close(self):
    if self._events is not None:
      self._events.close()
      self._events = None
