"""`miml-jax bench`: train-step and inference throughput of the models, PyTorch side by side.

For each model (ConvNeXt-T + UPerNet, ConvNeXt-B + UPerNet, APSC-Net), resolution (its standard
one and a small one), dtype (float32, bfloat16) and mode (train: forward + backward + AdamW;
infer: forward in eval mode) it times, on random inputs:

* miml-jax: the flax modules of `miml_jax/models` under `jax.jit` (parameters and optimiser
  state donated), `block_until_ready` after each call;
* PyTorch eager and `torch.compile` of the restatements of the official modules in
  `miml_jax/torch_reference.py` (the ones the parity tests check the flax modules against), with
  `torch.set_num_threads(--torch-threads)`.

Rules of the measurement:

* Warm-up (compilation; the first calls) is excluded and reported apart (`compile_s`); one more
  untimed round of every contender runs once all of them are built.
* Each contender runs in a process of its own (its own heap: see `_Contender`), and they run
  interleaved, one at a time, rep by rep (jax, torch eager, torch.compile, jax, ...), so that
  load from other processes on a shared machine hits all of them alike; the ratios are per
  rep, then the median is taken. Median, min and max are reported. Each call is timed in its
  own process. Contenders that do not fit in memory together (the next one estimated at the
  largest live one's peak) are timed in turns instead: the row's 'waves' lists them.
* The JSON records the machine (CPU, cores, CPU affinity, load average before and after),
  library versions, thread settings and the depthwise-conv formulation in use.
* FLOPs are XLA's cost analysis of the compiled program (so both sides are credited the same
  FLOPs); achieved FLOP/s = FLOPs / median step time; MFU where the device's peak is known
  (`miml_jax/mfu.py`). The run also measures a ceiling, which stands in for the peak where none
  is known (CPUs): the FLOP/s of a large square matmul in each library, the faster one kept
  (`dot_ceiling`); each row then gives every contender's share of it and the speed-up over
  torch that running the row's FLOPs at the ceiling would give (`ceiling_speedup_vs_*`): what
  any implementation could reach. Peak memory: XLA's buffer assignment (arguments + outputs +
  temporaries) for jax, `torch.cuda.max_memory_allocated` for torch on CUDA; and every
  contender's peak resident host memory after its warm-up (`host_peak_bytes`).

It also times QES (`miml_jax/qes.py`) on device against NumPy on the same soft masks.

torch is not a dependency of miml-jax: install the `bench` extra (`pip install ".[bench]"`) or
pass `--torch none`.
"""

import dataclasses
import functools
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

from miml_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class ModelCase:
  """A benchmarked model: backbone dims / depths, head kind and width, sizes and batches."""

  name: str
  dims: tuple[int, ...]
  depths: tuple[int, ...]
  head: str  # 'upernet' or 'apsc'
  channels: int
  sizes: tuple[int, int]  # (standard, small)
  train_batch: int
  infer_batch: int


MODELS = {
  "convnext_t_upernet": ModelCase(
    "convnext_t_upernet", (96, 192, 384, 768), (3, 3, 9, 3), "upernet", 256, (256, 128), 4, 4
  ),
  # Train batch 2: at batch 1 the pooled 1x1 maps of the PPM / image head give BatchNorm a
  # single value per channel, which torch refuses in train mode (and which has no variance).
  "convnext_b_upernet": ModelCase(
    "convnext_b_upernet", (128, 256, 512, 1024), (3, 3, 27, 3), "upernet", 512, (512, 256), 2, 1
  ),
  "apsc_net": ModelCase(
    "apsc_net", (128, 256, 512, 1024), (3, 3, 27, 3), "apsc", 512, (512, 256), 2, 1
  ),
  # Toy sizes, to check that the command runs (tests/test_bench.py).
  "tiny_upernet": ModelCase(
    "tiny_upernet", (8, 16, 24, 32), (1, 1, 1, 1), "upernet", 16, (64, 32), 2, 2
  ),
  "tiny_apsc": ModelCase("tiny_apsc", (8, 16, 24, 32), (1, 1, 1, 1), "apsc", 16, (64, 32), 2, 2),
}
NUM_CLASSES = 2


def _apsc_head_config(case: ModelCase):
  from miml_jax.models import apsc_net

  if case.channels >= 512:
    return apsc_net.APSCHeadConfig()  # the official head
  c = case.channels
  return apsc_net.APSCHeadConfig(
    channels=c,
    feat0_channels=c // 2,
    c1_channels=c // 4,
    aspp_dilations=(1, 2, 3),
    kernel_size=5,
    kernel_gen_size=16,
    kernel_gen_dims=(4, 8),
    image_head_dims=(c, c, c),
  )


# ---- miml-jax side ---------------------------------------------------------------------------


def _flax_model(case: ModelCase, dtype):
  import flax.linen as nn

  from miml_jax.models import apsc_net, convnext, upernet

  class Net(nn.Module):
    """ConvNeXt (no drop path, like the torch reference) + UPerHead or APSCHead."""

    @nn.compact
    def __call__(self, x, train):
      feats = convnext.ConvNeXt(
        dims=case.dims,
        depths=case.depths,
        layer_scale_init_value=1.0,
        dtype=dtype,
        name="backbone",
      )(x, train)
      if case.head == "upernet":
        # dropout=0: the torch reference UPerHead has no Dropout2d before conv_seg.
        logits = upernet.UPerHead(
          channels=case.channels,
          num_classes=NUM_CLASSES,
          dropout=0.0,
          dtype=dtype,
          name="decode_head",
        )(feats, train)
        return {"logits": logits, "aux": (), "image_logits": None}
      return apsc_net.APSCHead(_apsc_head_config(case), dtype, name="decode_head")(feats, train)

  return Net()


def _jax_loss(out, labels, image_labels):
  import jax
  import jax.numpy as jnp

  def ce(logits, y):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

  loss = ce(out["logits"], labels)
  for a in out["aux"]:
    loss = loss + 0.4 * ce(a, labels)
  if out["image_logits"] is not None:
    loss = loss + ce(out["image_logits"], image_labels)
  return loss


def _jax_contender(case, size, batch, dtype_name, mode):
  """(compile_s, step function, info) of the flax model; step() runs one call to completion."""
  import jax
  import jax.numpy as jnp
  import optax

  from miml_jax import mfu
  from miml_jax.models import layers

  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  model = _flax_model(case, dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (batch, size // 4, size // 4)), jnp.int32)
  image_labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (batch,)), jnp.int32)
  variables = jax.jit(functools.partial(model.init, train=False))(
    {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x
  )
  params, stats = variables["params"], variables.get("batch_stats", {})
  if mode == "train":
    tx = optax.adamw(1e-4, weight_decay=0.05)
    opt_state = tx.init(params)

    # The inputs are arguments, not closure constants, which XLA would try to constant-fold.
    def step(params, stats, opt_state, key, x, labels, image_labels):
      def loss_fn(p):
        out, new = model.apply(
          {"params": p, "batch_stats": stats},
          x,
          train=True,
          rngs={"dropout": key},
          mutable=["batch_stats"],
        )
        return _jax_loss(out, labels, image_labels), new["batch_stats"]

      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), stats, opt_state, loss

    state = [params, stats, opt_state, jax.random.PRNGKey(2)]
    data = (x, labels, image_labels)
    t = time.perf_counter()
    compiled = (
      jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=layers.compiler_options())
      .lower(*state, *data)
      .compile()
    )
    compile_s = time.perf_counter() - t

    def run():
      state[0], state[1], state[2], loss = compiled(*state, *data)
      jax.block_until_ready(loss)

  else:

    def infer(variables, x):
      return model.apply(variables, x, train=False)["logits"]

    frozen = {"params": params, "batch_stats": stats}
    t = time.perf_counter()
    compiled = jax.jit(infer, compiler_options=layers.compiler_options()).lower(frozen, x).compile()
    compile_s = time.perf_counter() - t

    def run():
      jax.block_until_ready(compiled(frozen, x))

  t = time.perf_counter()
  run()  # the first call (allocations, thread pools) is warm-up too
  compile_s += time.perf_counter() - t
  info = {"flops": mfu.compiled_flops(compiled), "peak_memory_bytes": _xla_memory(compiled)}
  info["peak_flops"] = mfu.peak_flops_per_device(jax.devices()[0])
  return compile_s, run, info


def _xla_memory(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if m is None:
    return None
  total = 0
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
    total += int(getattr(m, key, 0) or 0)
  return total - int(getattr(m, "alias_size_in_bytes", 0) or 0)


# ---- PyTorch side ----------------------------------------------------------------------------


def _torch_reference():
  try:
    from miml_jax import torch_reference
  except ImportError as e:
    raise UserInputError(
      f"--torch: needs torch (pip install '.[bench]'): {e}; or pass --torch none"
    ) from e
  return torch_reference


def _torch_model(case: ModelCase):
  import torch

  ref = _torch_reference()

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = ref.TConvNeXt(3, case.dims, case.depths)
      if case.head == "upernet":
        self.decode_head = ref.TUPerHead(case.dims, case.channels, (1, 2, 3, 6), NUM_CLASSES)
      else:
        h = _apsc_head_config(case)
        self.decode_head = ref.TAPSCHead(
          case.dims,
          h.channels,
          h.pool_scales,
          h.feat0_channels,
          h.c1_channels,
          h.aspp_dilations,
          h.kernel_size,
          h.kernel_gen_size,
          h.kernel_gen_dims,
          h.image_head_dims,
          passes=h.rectify_passes,
        )

    def forward(self, x):
      feats = self.backbone(x)
      if case.head == "upernet":
        return self.decode_head(feats), [], None
      return self.decode_head(feats)

  return Net()


def _torch_contender(case, size, batch, dtype_name, mode, compiled: bool, threads: int):
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  net = _torch_model(case)
  g = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, size, size, generator=g)
  labels = torch.randint(0, NUM_CLASSES, (batch, size // 4, size // 4), generator=g)
  image_labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")
  if mode == "train":
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)

    def fwd_loss():
      with autocast:
        logits, aux, image_logits = net(x)
      loss = F.cross_entropy(logits.float(), labels)
      for a in aux:
        loss = loss + 0.4 * F.cross_entropy(a.float(), labels)
      if image_logits is not None:
        loss = loss + F.cross_entropy(image_logits.float(), image_labels)
      return loss

    body = torch.compile(fwd_loss, dynamic=False) if compiled else fwd_loss

    def run():
      opt.zero_grad(set_to_none=True)
      body().backward()
      opt.step()

  else:
    net.eval()

    def fwd():
      with torch.no_grad(), autocast:
        return net(x)[0]

    body = torch.compile(fwd, dynamic=False) if compiled else fwd

    def run():
      body()

  t = time.perf_counter()
  run()
  run()  # torch.compile may recompile on the second call (grad mode, guards)
  compile_s = time.perf_counter() - t
  return compile_s, run, {}


# ---- the machine's matmul ceiling --------------------------------------------------------------
#
# CPUs have no tabulated peak (mfu.py), so each run measures a ceiling: the FLOP/s of one large
# square matmul, the best of the reps, in each library (jax as the library's layers run it: float32,
# or bfloat16 operands summed in float32; torch in the dtype). The faster of the two is the row's
# ceiling: a step of F FLOPs cannot run much faster than F / ceiling on this machine, whatever
# implements it, so torch's step time over F / ceiling bounds the speed-up over torch that any
# implementation of the same FLOPs could show here. (A conv through Winograd or FFT does fewer
# multiplications than XLA counts and could pass it.)


def _jax_dot_contender(n: int, dtype_name: str):
  import jax
  import jax.numpy as jnp

  from miml_jax.models import layers

  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(n, n)), dtype) for _ in range(2))
  dot = jax.jit(
    lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
    compiler_options=layers.compiler_options(),
  )
  t = time.perf_counter()
  jax.block_until_ready(dot(a, b))
  return time.perf_counter() - t, lambda: jax.block_until_ready(dot(a, b)), {}


def _torch_dot_contender(n: int, dtype_name: str, threads: int):
  import torch

  torch.set_num_threads(threads)
  dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
  g = torch.Generator().manual_seed(0)
  a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
  t = time.perf_counter()
  a @ b
  return time.perf_counter() - t, lambda: a @ b, {}


def dot_ceiling(dtype_name: str, n: int, reps: int, torch: bool, threads: int, log) -> dict:
  """The best FLOP/s of an n x n x n matmul in jax (and torch), interleaved like the rows.
  A torch that fails (as in `measure`) is recorded as `torch_error`; the ceiling is then jax's."""
  specs = {"jax": ("jax_dot", (n, dtype_name))}
  if torch:
    specs["torch"] = ("torch_dot", (n, dtype_name, threads))
  out, live = {"n": n, "dtype": dtype_name}, {}
  try:
    for name, (kind, args) in specs.items():
      side = _Contender(kind, args)
      if side.error:
        side.close()
        if name == "jax":
          raise UserInputError(f"bench: the {n}-square {dtype_name} matmul in jax: {side.error}")
        out[f"{name}_error"] = side.error
        continue
      live[name] = side
    times = _interleave(live, reps, log)
  finally:
    for side in live.values():
      side.close()
  for name, ts in times.items():
    out[f"{name}_flops"] = 2.0 * n**3 / min(ts)
  out["ceiling_flops"] = max(out[f"{name}_flops"] for name in times)
  return out


# ---- the measurement -------------------------------------------------------------------------


def _summary(times: list[float], batch: int) -> dict:
  med = statistics.median(times)
  return {
    "step_s_median": med,
    "step_s_min": min(times),
    "step_s_max": max(times),
    "spread": (max(times) - min(times)) / med if med else None,
    "images_per_s": batch / med,
    "reps": len(times),
  }


def _contender_process(conn, kind: str, args: tuple):
  """A contender's own process: build it, report, then time one call per request."""
  from miml_jax import host_memory

  host_memory.keep_freed_memory()
  try:
    build = {
      "jax": _jax_contender,
      "torch": _torch_contender,
      "jax_dot": _jax_dot_contender,
      "torch_dot": _torch_dot_contender,
    }[kind]
    compile_s, run, info = build(*args)
  except Exception as e:
    conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))
    return
  # The process's peak resident memory so far (build and warm-up: the steady state's peak).
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  info["host_peak_bytes"] = peak if sys.platform == "darwin" else peak * 1024  # Linux: KiB.
  conn.send(("ready", compile_s, info))
  while conn.recv() == "run":
    t = time.perf_counter()
    run()
    conn.send(time.perf_counter() - t)


class _Contender:
  """One contender (jax, torch eager, torch.compile) in a process of its own.

  In one process, torch's allocations between jax's steps fragment the heap that
  `host_memory` keeps, and some of jax's steps then fault fresh pages in (APSC-Net inference:
  one step in four 1.46 s instead of 1.1 s, 64 K faults). Apart, each keeps its own heap, and
  the memory of a row is returned when the row ends. Only one process computes at a time."""

  def __init__(self, kind: str, args: tuple):
    ctx = multiprocessing.get_context("spawn")  # jax and torch do not survive fork
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_contender_process, args=(child, kind, args), daemon=True)
    self._proc.start()
    child.close()
    self.kind, self.error, self.compile_s, self.info = kind, None, None, {}
    msg = self._recv()
    if msg[0] == "error":
      self.error = msg[1]
    else:
      _, self.compile_s, self.info = msg

  def _died(self) -> UserInputError:
    self._proc.join(5)
    return UserInputError(
      f"bench: the {self.kind} contender's process died (exit code {self._proc.exitcode};"
      " out of memory?)"
    )

  def _recv(self):
    try:
      return self._conn.recv()
    except EOFError:
      raise self._died() from None

  def __call__(self) -> float:
    """Seconds of one call, timed in the contender's process."""
    try:
      self._conn.send("run")
    except OSError:  # The process is gone (a broken pipe).
      raise self._died() from None
    return self._recv()

  def close(self):
    if self._proc.is_alive():
      try:
        self._conn.send("stop")
      except OSError:
        pass
      self._proc.join(30)
      if self._proc.is_alive():
        self._proc.kill()
    self._conn.close()


def _interleave(contenders: dict, reps: int, log) -> dict[str, list[float]]:
  # One untimed round once every contender exists, then the timed reps, rep by rep.
  for side in contenders.values():
    side()
  times = {k: [] for k in contenders}
  for rep in range(reps):
    for k, side in contenders.items():
      times[k].append(side())
    log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
  return times


def _available_memory_bytes() -> int | None:
  """The kernel's estimate of the memory a new process can take (Linux), else None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _room_for_another(contenders: dict) -> bool:
  """Whether one more contender, estimated at the largest live one's peak plus a quarter,
  fits beside the live ones."""
  available = _available_memory_bytes()
  need = max(side.info["host_peak_bytes"] for side in contenders.values())
  return available is None or available > 1.25 * need


def measure(case, size, dtype_name, mode, *, reps, torch_modes, threads, log, ceiling=None) -> dict:
  """One row: jax and each torch mode at (case, size, dtype, mode), interleaved rep by rep.
  `ceiling`: the dtype's `dot_ceiling`, for the fractions of it (none without).

  Contenders that do not fit in memory together are timed in turns ('waves' in the row): when
  the next one would not fit beside the live ones, those are timed and closed first."""
  batch = case.train_batch if mode == "train" else case.infer_batch
  row = {
    "model": case.name,
    "mode": mode,
    "size": size,
    "batch": batch,
    "dtype": dtype_name,
  }
  specs = [("jax", "jax", (case, size, batch, dtype_name, mode))]
  for tm in torch_modes:
    specs.append(
      (f"torch_{tm}", "torch", (case, size, batch, dtype_name, mode, tm == "compile", threads))
    )
  times, waves, live = {}, [], {}

  def time_live():
    times.update(_interleave(live, reps, log))
    waves.append(list(live))
    for side in live.values():
      side.close()
    live.clear()

  try:
    for name, kind, args in specs:
      if live and not _room_for_another(live):
        log(f"  {name} does not fit in memory beside {', '.join(live)}: timing those first")
        time_live()
      side = _Contender(kind, args)
      if side.error:
        side.close()
        if kind == "jax":
          raise UserInputError(f"{case.name} {mode} {size}px {dtype_name}: {side.error}")
        row[name] = {"error": side.error}  # torch.compile needs a working C++ toolchain.
        continue
      live[name] = side
      row[name] = {"compile_s": side.compile_s, **side.info}
    time_live()
  finally:
    for side in live.values():
      side.close()
  if len(waves) > 1:
    row["waves"] = waves
  for k, ts in times.items():
    row[k].update(_summary(ts, batch))
    row[k]["times_s"] = ts
  flops = row["jax"].get("flops")
  if flops:
    for k in times:
      row[k]["achieved_tflops"] = flops / row[k]["step_s_median"] / 1e12
    peak = row["jax"].get("peak_flops")
    row["jax"]["mfu"] = flops / row["jax"]["step_s_median"] / peak if peak else None
  if flops and ceiling:
    row["ceiling_flops"] = ceiling["ceiling_flops"]
    at_ceiling_s = flops / ceiling["ceiling_flops"]
    for k in times:
      row[k]["fraction_of_ceiling"] = at_ceiling_s / row[k]["step_s_median"]
      if k != "jax":
        # The best speed-up over this contender that the same FLOPs allow on this machine.
        row[f"ceiling_speedup_vs_{k}"] = row[k]["step_s_median"] / at_ceiling_s
  for k in times:
    if k != "jax":
      # Per rep (the interleaved pairs share the machine's load), then the median.
      ratios = [t / j for t, j in zip(times[k], times["jax"])]
      row[f"speedup_vs_{k}"] = {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
      }
  return row


def qes_benchmark(size: int, count: int, reps: int) -> dict:
  """QES of `count` soft masks of size x size: jitted batch on device vs NumPy, same masks."""
  import jax
  import jax.numpy as jnp

  from miml_jax import qes

  rng = np.random.default_rng(0)
  masks = rng.random((count, size, size), dtype=np.float32)
  dev = jnp.asarray(masks)
  fn = jax.jit(jax.vmap(qes.qes))
  jax.block_until_ready(fn(dev))

  def numpy_qes():
    conf = (masks > qes.DEFAULT_HIGH).sum(axis=(1, 2))
    region = (masks > qes.DEFAULT_LOW).sum(axis=(1, 2))
    return conf / (region + qes.DEFAULT_EPS)

  jt, nt = [], []
  for _ in range(reps):
    t = time.perf_counter()
    got = jax.block_until_ready(fn(dev))
    jt.append(time.perf_counter() - t)
    t = time.perf_counter()
    ref = numpy_qes()
    nt.append(time.perf_counter() - t)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)
  return {
    "masks": count,
    "size": size,
    "jax_s_median": statistics.median(jt),
    "numpy_s_median": statistics.median(nt),
    "speedup_vs_numpy": statistics.median(nt) / statistics.median(jt),
  }


def machine() -> dict:
  import jax

  from miml_jax.models import layers

  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return None

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  dev = jax.devices()[0]
  return {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax_backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "versions": {n: version(n) for n in ("jax", "jaxlib", "flax", "optax", "torch", "numpy")},
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "depthwise_impl": layers.depthwise_impl() if hasattr(layers, "depthwise_impl") else None,
    "compiler_options": layers.compiler_options() if hasattr(layers, "compiler_options") else None,
  }


def _loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def run(
  models: list[str],
  sizes: list[str],
  dtypes: list[str],
  modes: list[str],
  reps: int,
  torch_modes: list[str],
  threads: int,
  qes_masks: int,
  ceiling_size: int = 0,
  log=print,
) -> dict:
  for m in models:
    if m not in MODELS:
      raise UserInputError(f"--models: unknown model {m!r}; choose from {sorted(MODELS)}")
  for s in sizes:
    if s not in ("standard", "small") and not s.isdigit():
      raise UserInputError(f"--sizes: {s!r} is not standard, small or a number of pixels")
  for d in dtypes:
    if d not in ("float32", "bfloat16"):
      raise UserInputError(f"--dtypes: {d!r} is not float32 or bfloat16")
  for m in modes:
    if m not in ("train", "infer"):
      raise UserInputError(f"--modes: {m!r} is not train or infer")
  for t in torch_modes:
    if t not in ("eager", "compile"):
      raise UserInputError(f"--torch: {t!r} is not eager, compile or none")
  if reps < 1:
    raise UserInputError(f"--reps: {reps} must be >= 1")
  if ceiling_size < 0:
    raise UserInputError(f"--ceiling-size: {ceiling_size} must be >= 0 (0: skip)")
  result: dict[str, Any] = {"machine": machine(), "load_before": _loadavg()}
  result["torch_threads"] = threads if torch_modes else None
  started = time.perf_counter()
  ceilings = {}
  for dtype_name in dtypes if ceiling_size else ():
    log(f"matmul ceiling: {ceiling_size}-square {dtype_name}")
    ceilings[dtype_name] = dot_ceiling(
      dtype_name, ceiling_size, max(reps, 3), bool(torch_modes), threads, log
    )
  result["dot_ceiling"] = ceilings
  rows = []
  for name in models:
    case = MODELS[name]
    for s in sizes:
      size = case.sizes[0] if s == "standard" else case.sizes[1] if s == "small" else int(s)
      for dtype_name in dtypes:
        for mode in modes:
          log(
            f"{name} {mode} {size}px {dtype_name} batch "
            f"{case.train_batch if mode == 'train' else case.infer_batch}"
          )
          rows.append(
            measure(
              case,
              size,
              dtype_name,
              mode,
              reps=reps,
              torch_modes=torch_modes,
              threads=threads,
              log=log,
              ceiling=ceilings.get(dtype_name),
            )
          )
  result["rows"] = rows
  if qes_masks:
    result["qes"] = qes_benchmark(512, qes_masks, max(reps, 3))
  result["load_after"] = _loadavg()
  result["wall_s"] = time.perf_counter() - started
  cpus = result["machine"]["cpu_count"] or 1
  load = max((result["load_before"] or [0.0]) + (result["load_after"] or [0.0]))
  result["contention"] = f"load average up to {load:.1f} on {cpus} CPUs" + (
    " (shared machine: absolute times are noisy, the interleaved ratios less so)"
    if load > 0.5 * cpus
    else ""
  )
  return result


def table(result: dict) -> str:
  """The rows as a fixed-width text table."""
  lines = [
    f"{'model':<20}{'mode':<6}{'px':>5}{'b':>3} {'dtype':<9}{'jax img/s':>10}{'eager':>9}"
    f"{'compile':>9}{'x eager':>9}{'x comp':>8}{'GFLOP':>8}{'TFLOP/s':>8}{'ceil%':>6}"
    f"{'max x':>7}{'jit s':>7}"
  ]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  for r in result["rows"]:
    j = r["jax"]
    e = r.get("torch_eager", {})
    c = r.get("torch_compile", {})
    lines.append(
      f"{r['model']:<20}{r['mode']:<6}{r['size']:>5}{r['batch']:>3} {r['dtype']:<9}"
      f"{j['images_per_s']:>10.3f}{fmt(e.get('images_per_s'), '.3f'):>9}"
      f"{fmt(c.get('images_per_s'), '.3f'):>9}"
      f"{fmt(r.get('speedup_vs_torch_eager', {}).get('median'), '.2f'):>9}"
      f"{fmt(r.get('speedup_vs_torch_compile', {}).get('median'), '.2f'):>8}"
      f"{fmt(j['flops'] / 1e9 if j.get('flops') else None, '.1f'):>8}"
      f"{fmt(j.get('achieved_tflops'), '.3f'):>8}"
      f"{fmt(100 * j['fraction_of_ceiling'] if 'fraction_of_ceiling' in j else None, '.0f'):>6}"
      f"{fmt(r.get('ceiling_speedup_vs_torch_eager'), '.2f'):>7}{j['compile_s']:>7.1f}"
      + (
        "  (in turns: " + " | ".join(", ".join(w) for w in r["waves"]) + ")" if "waves" in r else ""
      )
    )
  for c in result.get("dot_ceiling", {}).values():
    lines.append(
      f"matmul ceiling, {c['n']}-square {c['dtype']}: "
      + ", ".join(
        f"{k[:-6]} {c[k] / 1e12:.3f} TFLOP/s"
        for k in c
        if k.endswith("_flops") and k != "ceiling_flops"
      )
      + " (ceil%: miml-jax's share of the faster; max x: torch eager's step over the FLOPs"
      " at that rate, the most any implementation could gain here)"
    )
  if "qes" in result:
    q = result["qes"]
    lines.append(
      f"QES of {q['masks']} masks {q['size']}px: jax {q['jax_s_median'] * 1e3:.1f} ms, "
      f"NumPy {q['numpy_s_median'] * 1e3:.1f} ms ({q['speedup_vs_numpy']:.1f}x)"
    )
  lines.append(result["contention"])
  return "\n".join(lines)


def write_json(result: dict, path: str):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, default=float)


# What `miml-jax bench` runs without --models / --sizes / ... (each flag overrides its entry).
PRESETS = {
  "full": dict(
    models=["convnext_t_upernet", "convnext_b_upernet", "apsc_net"],
    sizes=["standard", "small"],
    dtypes=["float32", "bfloat16"],
    modes=["train", "infer"],
    torch=["eager", "compile"],
    reps=5,
    qes_masks=64,
    ceiling_size=4096,
  ),
  "quick": dict(
    models=["convnext_t_upernet", "convnext_b_upernet", "apsc_net"],
    sizes=["small"],
    dtypes=["float32"],
    modes=["train", "infer"],
    torch=["eager", "compile"],
    reps=3,
    qes_masks=16,
    ceiling_size=4096,
  ),
  "tiny": dict(
    models=["tiny_upernet", "tiny_apsc"],
    sizes=["small"],
    dtypes=["float32"],
    modes=["train", "infer"],
    torch=["eager"],
    reps=1,
    qes_masks=2,
    ceiling_size=256,
  ),
}
