"""The trainer: one sectioned loop on jax.jit with NamedSharding (big_vision style).

    miml-jax train --config experiments/quickstart.py --workdir W

Sections: workdir and config -> mesh -> data -> model and optimiser -> restore or init ->
compiled step -> loop (progress, checkpoints, periodic evaluation) -> final evaluation and
pictures. Runs unchanged on one CPU, N local devices and several processes: the batch is split
over a ('data', 'fsdp') mesh, large parameters and their optimiser state are sharded along
'fsdp' (sharding.py), and BatchNorm statistics are global because jit sees the whole batch.
"""

import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from miml_jax import checkpoint as ckpt_lib
from miml_jax import evaluate, metric_writer, mfu, models, optim, sharding, tasks, visualize
from miml_jax.config import to_json
from miml_jax.errors import UserInputError
from miml_jax.input import pipeline, sources, transforms
from miml_jax.models import layers


def log(message: str):
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def check_output_dir(path: str, flag: str):
  """A one-line UserInputError, before anything is created, unless `path` is a directory this
  process can write into or one it can create: not a file, not under a file, not read-only."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserInputError(f"{flag} {path}: is a file, not a directory")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserInputError(f"{flag} {path}: {existing} is a file, not a directory")
  # os.access, not the mode bits: root may write into a 0o500 directory, and then so may we.
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserInputError(f"{flag} {path}: {existing} is not writable")


def _check_workdir(workdir: str, config) -> list[int] | None:
  """Returns the steps to resume from (newest last), or None; refuses a workdir that holds
  another model, and one that is a file or cannot be written."""
  check_output_dir(workdir, "--workdir")
  config_path = os.path.join(workdir, "config.json")
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  has_ckpt = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  if not has_ckpt:
    return None
  if not os.path.isfile(config_path):
    raise UserInputError(
      f"{workdir}: holds checkpoints but no config.json; refusing to write into it"
    )
  try:
    with open(config_path) as f:
      previous = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise UserInputError(
      f"{config_path}: unreadable ({ckpt_lib.short_reason(e)}); it says which model the "
      f"checkpoints beside it hold: restore it, or use a new --workdir"
    ) from e
  if ckpt_lib.describe_model(previous) != ckpt_lib.describe_model(config):
    old, new = previous.model.to_dict(), config.model.to_dict()
    diff = sorted(_diff_keys(old, new))
    raise UserInputError(
      f"{workdir}: holds a checkpoint of another model ({previous.model.name}; differs in "
      f"model.{', model.'.join(diff[:5])}); use a new --workdir or delete that one"
    )
  return ckpt_lib._steps(ckpt_dir)


def _diff_keys(a, b, prefix=""):
  keys = set(a) | set(b)
  for key in keys:
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff_keys(va, vb, f"{prefix}{key}.")
    elif json.dumps(va, default=list) != json.dumps(vb, default=list):
      yield prefix + key


def init_state(model, optimizer, config, rng):
  """A fresh (model_vars, train_vars) pair: the state the training step carries."""
  model_vars = models.init_variables(model, config, rng)
  train_vars = {
    "opt_state": optimizer.init(model_vars["params"]),
    "step": jnp.zeros([], jnp.int32),
    # A raw uint32 key, so it checkpoints as a plain array.
    "rng": jax.random.fold_in(rng, 1),
    "nan_skips": jnp.zeros([], jnp.int32),
  }
  return model_vars, train_vars


# ||params|| below this counts as this, so the update ratio of all-zero weights stays finite.
_NORM_EPS = 1e-6


def make_train_step(model, optimizer, config, mesh, state_shardings=None):
  """The compiled training step: (model_vars, train_vars, batch) -> (model_vars, train_vars, m).

  The config's task (tasks/) says what the batch holds, how it becomes the model's inputs, the
  loss, and the projection applied after each update. state_shardings: (model_vars,
  train_vars) shardings (sharding.tree_shardings); default replicated. The step donates the
  state, so its input and output shardings are the same.
  """
  task = tasks.build(config)
  # The update-ratio check guards nan_policy='skip', where absurd but finite updates would
  # otherwise be applied and checkpointed; under 'stop' a diverging run ends at its first
  # non-finite step. It is left out of the step when off: reading every weight once more changes
  # how XLA fuses the update, and so its rounding (the quickstart would no longer reproduce bit
  # for bit).
  check_ratio = config.train.nan_policy == "skip" and math.isfinite(config.train.max_update_ratio)

  def loss_fn(params, batch_stats, batch, rng):
    outputs, new_state = model.apply(
      {"params": params, "batch_stats": batch_stats},
      **task.model_inputs(batch),
      train=True,
      rngs={"dropout": rng},
      mutable=["batch_stats"],
    )
    loss, terms = task.loss(outputs, batch)
    return loss, (terms, new_state["batch_stats"])

  def step_fn(model_vars, train_vars, batch):
    rng = jax.random.fold_in(train_vars["rng"], train_vars["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (terms, batch_stats)), grads = grad_fn(
      model_vars["params"], model_vars["batch_stats"], batch, rng
    )
    updates, opt_state = optimizer.update(grads, train_vars["opt_state"], model_vars["params"])
    params = task.project(optax.apply_updates(model_vars["params"], updates))
    grad_norm = optax.tree.norm(grads)
    update_norm = optax.tree.norm(updates)
    if check_ratio:
      # The update's size against the weights': a healthy step moves them by a small fraction
      # (train.max_update_ratio's comment in config.py gives measured values); a diverging
      # learning rate moves them many times their own size while everything is still finite.
      update_ratio = update_norm / jnp.maximum(optax.tree.norm(model_vars["params"]), _NORM_EPS)
    else:
      update_ratio = jnp.zeros([], jnp.float32)
    # A step is applied only if loss, gradients and the update itself are finite (an update can
    # overflow with finite gradients) and the update is not absurd relative to the weights
    # (NaN compares False). Otherwise the state stays as it was and the step is counted.
    finite = (
      jnp.isfinite(loss)
      & jnp.isfinite(grad_norm)
      & jnp.isfinite(update_norm)
      & (update_ratio <= config.train.max_update_ratio)
    )
    # Under 'stop' the host sees the count rise and stops; under 'skip' training goes on.
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_model = keep({"params": params, "batch_stats": batch_stats}, model_vars)
    new_train = {
      "opt_state": keep(opt_state, train_vars["opt_state"]),
      "step": train_vars["step"] + 1,
      "rng": train_vars["rng"],
      "nan_skips": train_vars["nan_skips"] + (~finite).astype(jnp.int32),
    }
    lr = optim.learning_rate(train_vars["step"], 1.0, config.optim)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, **terms}
    if check_ratio:  # Only where it is computed: a column of zeros would read as a measurement.
      metrics["update_ratio"] = update_ratio
    return new_model, new_train, metrics

  replicated = sharding.replicated(mesh)
  model_sh, train_sh = state_shardings or (replicated, replicated)
  return jax.jit(
    step_fn,
    donate_argnums=(0, 1),
    in_shardings=(model_sh, train_sh, sharding.batch_sharding(mesh)),
    out_shardings=(model_sh, train_sh, replicated),
    compiler_options=layers.compiler_options(),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config`, checkpointing into `workdir`; returns the final validation metrics."""
  # ---- Workdir and config ----------------------------------------------------------------
  # Every section is checked (and optional keys filled in) before anything is created.
  config = tasks.validate_config(config)
  task = tasks.build(config)
  workdir = os.path.abspath(workdir)
  resume_steps = _check_workdir(workdir, config)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(to_json(config))

  # ---- Mesh ------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config)
  devices = mesh.devices.reshape(-1)
  global_batch = config.input.batch_size
  if global_batch % len(devices):
    raise UserInputError(
      f"--config.input.batch_size={global_batch}: must be divisible by the {len(devices)} devices"
    )
  batch_sharding = sharding.batch_sharding(mesh)

  # ---- Data ------------------------------------------------------------------------------
  train_source = sources.source_from_config(
    config.data.train, "train", config.data, for_training=True
  )
  val_source = sources.source_from_config(config.data.validation, "validation", config.data)
  # data.on_error='skip': every example skipped, with its file and reason, one line each.
  skipped_report = SkipReport(os.path.join(workdir, "skipped_examples.txt"))
  skipped_report.add(getattr(train_source, "skipped", []), "listing data.train")
  if len(train_source) < global_batch:
    raise UserInputError(
      f"data.train={config.data.train}: {len(train_source)} examples, fewer "
      f"than one batch of {global_batch}"
    )
  task.check_sample(train_source[0], f"data.train={config.data.train}")
  if isinstance(train_source, sources.MixtureSource):
    log(f"training mixture, {len(train_source)} examples per epoch: {train_source.describe()}")
  augment = transforms.AugmentConfig.from_config(config.input.augment)

  # ---- Model and optimiser ---------------------------------------------------------------
  model = models.build_model(config.model)
  init_rng = jax.random.PRNGKey(config.seed)

  abstract_params = models.abstract_variables(model, config)["params"]
  optimizer = optim.make_optimizer(config.optim, abstract_params)
  log(
    f"model {config.model.name}: {models.count_params(abstract_params) / 1e6:.2f} M "
    f"parameters; {len(devices)} device(s) {devices[0].platform} as mesh "
    f"{dict(mesh.shape)}, {jax.process_count()} process(es), global batch {global_batch}"
  )
  init_fn = functools.partial(init_state, model, optimizer, config)
  abstract_state = jax.eval_shape(init_fn, init_rng)
  state_shardings = sharding.tree_shardings(abstract_state, mesh, config)

  # ---- Restore or start ------------------------------------------------------------------
  checkpointer = ckpt_lib.Checkpointer(
    ckpt_lib.checkpoint_dir(workdir), max_to_keep=config.train.keep_checkpoints
  )
  best_metric = config.train.best_metric
  if best_metric and best_metric not in task.summary_scores:
    raise UserInputError(
      f"train.best_metric='{best_metric}': expected '' (keep no best "
      f"checkpoint) or one of {', '.join(task.summary_scores)} (task "
      f"{task.name})"
    )
  best_checkpointer = (
    ckpt_lib.Checkpointer(
      ckpt_lib.checkpoint_dir(workdir, ckpt_lib.BEST_SUBDIR),
      max_to_keep=config.train.keep_best,
      best_metric=best_metric,
    )
    if best_metric
    else None
  )
  if resume_steps is None:
    model_vars, train_vars = jax.jit(init_fn, out_shardings=state_shardings)(init_rng)
    if config.model_init:
      # Converted official weights (miml-jax convert); tensors the file lacks keep their init.
      loaded, missing = models.load(
        model, config, config.model_init, partial=True, init_variables=jax.device_get(model_vars)
      )
      model_vars = jax.device_put(loaded, state_shardings[0])
      total = len(jax.tree_util.tree_leaves(loaded))
      log(f"initialised {total - len(missing)} of {total} tensors from {config.model_init}")
  else:
    abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state,
      state_shardings,
    )
    # The newest checkpoint that reads back: a broken newer one (truncated file, zeroed
    # metadata) is named, set aside, and its steps trained again.
    resume_step, (model_vars, train_vars), broken = ckpt_lib.restore_newest_intact(
      checkpointer.directory,
      resume_steps,
      lambda step: checkpointer.restore_training(step, *abstract),
    )
    if broken:
      checkpointer.close()
      if jax.process_index() == 0:
        moved = ckpt_lib.set_aside(checkpointer.directory, broken)
        log(f"moved the unreadable checkpoint(s) to {', '.join(moved)}")
      _sync("miml_jax_set_aside")
      checkpointer = ckpt_lib.Checkpointer(
        ckpt_lib.checkpoint_dir(workdir), max_to_keep=config.train.keep_checkpoints
      )
    log(f"resumed from {checkpointer.directory}/{resume_step}")
  start = int(train_vars["step"])
  # The pipeline is a pure function of the global batch index, so resuming is starting at it.
  train_iter = iter(
    pipeline.train_dataset(
      train_source,
      batch_size=global_batch,
      transform=task.train_transform(augment),
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_step=start,
      num_workers=config.input.num_workers,
      read_threads=config.input.read_threads,
      prefetch_batches=config.input.prefetch_batches,
    )
  )

  def next_batch():
    local = next(train_iter)
    skipped_report.add(
      [r for reasons in local.pop("skipped") if reasons for r in reasons.split("\n")], "training"
    )
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

  # ---- Compiled step ---------------------------------------------------------------------
  total = config.train.steps
  batch = next_batch() if start < total else None
  if batch is not None:
    log("compiling the training step ...")
    t = time.time()
    step_fn = (
      make_train_step(model, optimizer, config, mesh, state_shardings)
      .lower(model_vars, train_vars, batch)
      .compile()
    )
    flops = mfu.compiled_flops(step_fn)
    peak = mfu.peak_flops_per_device(devices[0], config.train.peak_flops_per_device)
    log(
      f"compiled in {time.time() - t:.1f}s"
      + (f"; {flops / 1e9:.3g} GFLOP per device per step" if flops else "")
    )

  # ---- Loop ------------------------------------------------------------------------------
  # One predictor (one compiled inference function) for every evaluation of the run; it holds
  # a replicated copy of the weights only while it evaluates.
  predictor = evaluate.make_predictor(model, None, config, mesh)
  writer = metric_writer.MetricWriter(
    workdir, tensorboard=config.train.tensorboard, start_step=start
  )
  nan_skips = int(train_vars["nan_skips"])
  window_start, window_step = time.time(), start
  step = logged_step = start

  def validate(step, write_pictures):  # The weights of this moment (model_vars as it is now).
    return _evaluate(
      task,
      predictor,
      model_vars,
      config,
      val_source,
      workdir,
      step,
      writer,
      best_checkpointer,
      write_pictures,
    )

  for step in range(start + 1, total + 1):
    batch = batch if step == start + 1 else next_batch()
    model_vars, train_vars, metrics = step_fn(model_vars, train_vars, batch)
    if step % config.train.log_every == 0 or step == total:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      skips = int(train_vars["nan_skips"])
      if skips > nan_skips:
        if "update_ratio" in metrics:  # nan_policy='skip' checks the update's size too.
          why = (
            f"non-finite loss, gradients or update, or an update over "
            f"train.max_update_ratio={config.train.max_update_ratio:g} times the weights "
            f"(this step's: {metrics['update_ratio']:.3g})"
          )
        else:
          why = "non-finite loss, gradients or update"
        message = (
          f"step {step}: {skips - nan_skips} step(s) with {why}, since step {logged_step} "
          f"(not applied; {skips} in total)"
        )
        if config.train.nan_policy == "stop":
          last = checkpointer.latest_step()
          checkpointer.close()
          where = (
            f"the last checkpoint, {checkpointer.directory}/{last}, holds finite weights"
            if last is not None
            else "no checkpoint was written"
          )
          raise FloatingPointError(message + f"; stopping (train.nan_policy='stop'); {where}")
        log("warning: " + message + "; skipped (train.nan_policy='skip')")
        nan_skips = skips
      logged_step = step
      # Rates over the last window, so compilation and evaluation pauses age out.
      now = time.time()
      rate = (step - window_step) / max(now - window_start, 1e-9)
      window_start, window_step = now, step
      eta = (total - step) / max(rate, 1e-9)
      speed = {
        "steps_per_sec": rate,
        "images_per_sec": rate * global_batch,
        "step_time_sec": 1 / max(rate, 1e-9),
      }
      if flops:
        speed["tflops_per_device"] = flops * rate / 1e12
        if peak:
          speed["mfu"] = flops * rate / peak
      log(
        f"step {step}/{total}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
        f"grad_norm {metrics['grad_norm']:.3f}  {rate:.2f} steps/s  "
        f"{rate * global_batch:.1f} img/s"
        + (f"  MFU {speed['mfu']:.1%}" if "mfu" in speed else "")
        + f"  ETA {_format_seconds(eta)}"
      )
      writer.write(
        step, {**metrics, **speed, "nan_skips": skips, "data_skipped": skipped_report.total()}
      )
    if step % config.train.checkpoint_every == 0 or step == total:
      checkpointer.save(step, model_vars, config, train_vars=train_vars)
    if config.train.eval_every and step % config.train.eval_every == 0 and step != total:
      try:
        validate(step, write_pictures=False)
      except NonFiniteOutputs as e:
        if config.train.nan_policy == "stop":
          checkpointer.close()
          raise NonFiniteOutputs(f"{e}; stopping (train.nan_policy='stop')") from None
        log(f"warning: {e}; validation skipped (train.nan_policy='skip')")
      window_start = time.time()
  checkpointer.close()
  # Stop grain's prefetch workers and drop the last batch, which may alias their shared memory
  # (left to the interpreter's exit, it ends the run with a "leaked shared_memory" warning).
  train_iter.close()
  del batch

  # ---- Final evaluation and pictures -----------------------------------------------------
  try:
    result = validate(step, write_pictures=True)
  finally:
    if best_checkpointer is not None:
      best_checkpointer.close()
    writer.close()
  if jax.process_index() == 0:
    visualize.plot_history(writer.jsonl_path, os.path.join(workdir, "curves.png"), task.plot_scores)
  return result


def _evaluate(
  task,
  predictor,
  model_vars,
  config,
  source,
  workdir,
  step,
  writer,
  best_checkpointer,
  write_pictures,
):
  """Scores the validation source on every device (all processes) and logs it; keeps the best."""
  t = time.time()
  pictures = write_pictures and jax.process_index() == 0
  predictor.set_variables(model_vars)
  # A NaN / inf map is the weights' fault, said so here rather than by the metrics (which
  # would blame the data's value range).
  checked = FiniteOutputs(predictor, f"validation @ step {step}")
  try:
    # The headline only: the other conventions belong to `miml-jax eval`, not every validation.
    result = task.evaluate(checked, source, out_dir=workdir if pictures else None, conventions=())
  finally:
    predictor.set_variables(None)
  summary = result["summary"]
  log(f"validation @ step {step}: {task.summary_line(summary)}, {time.time() - t:.1f}s)")
  writer.write(step, {f"val_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
  if best_checkpointer is not None and step not in best_checkpointer.all_steps():
    metric = config.train.best_metric
    best_checkpointer.save(step, model_vars, config, metrics={metric: float(summary[metric])})
  if pictures:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump({"step": step, **result}, f, indent=2, default=float)
  return result


class NonFiniteOutputs(FloatingPointError):
  """The model's outputs are NaN or inf: its weights have diverged (exit code EXIT_NON_FINITE)."""


class FiniteOutputs:
  """A Predictor (delegated to) whose every prediction must be finite, else NonFiniteOutputs
  naming `where` (the step or checkpoint) and the example.

  A NaN 'image_score' is a model without an image head (tasks/base.py), unless an earlier
  prediction had a finite one.
  """

  def __init__(self, predictor, where: str):
    self._predictor, self.where = predictor, where
    self._image_head = None

  def __getattr__(self, name):
    return getattr(self._predictor, name)

  def predict(self, source, limit: int | None = None):
    for sample, prediction in self._predictor.predict(source, limit=limit):
      bad = []
      for key, value in prediction.items():
        array = np.asarray(value)
        if array.dtype.kind != "f":
          continue
        if key == "image_score":
          no_score = bool(np.isnan(array).all())
          if self._image_head is None:
            self._image_head = not no_score
          if no_score and not self._image_head:
            continue
        finite = np.isfinite(array)
        if not finite.all():
          bad.append(f"{key}: {array.size - int(finite.sum())} of {array.size} values NaN or inf")
      if bad:
        raise NonFiniteOutputs(
          f"{self.where}: the model's outputs are not finite ({'; '.join(bad)}, on "
          f"{sample.get('id', 'an example')}); its weights have diverged (a learning rate too "
          f"high?): this is the model's fault, not the data's"
        )
      yield sample, prediction


class SkipReport:
  """Examples data.on_error='skip' left out: appended to a file, counted over all processes."""

  def __init__(self, path: str):
    self.path, self.count = path, 0

  def add(self, messages: list[str], where: str):
    if not messages:
      return
    self.count += len(messages)
    with open(self.path, "a") as f:
      f.writelines(f"[process {jax.process_index()}, {where}] {m}\n" for m in messages)
    print(
      f"warning: skipped {len(messages)} unreadable example(s) ({where}), e.g. "
      f"{messages[0]}; see {self.path}",
      file=sys.stderr,
      flush=True,
    )

  def total(self) -> int:
    """Skips of every process so far (a collective: all processes call it together)."""
    if jax.process_count() == 1:
      return self.count
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int64(self.count))))


def _sync(name: str):
  """All processes wait here (a no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
