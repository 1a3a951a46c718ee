"""The single ops behind the model-level numbers of `miml-jax bench`, in each formulation.

    python benchmarks/ops.py [--reps 7] [--torch-threads 2] [--out benchmarks/results/ops.json]

Times, forward and forward + backward (gradients w.r.t. input and weights), interleaved rep by
rep in one process (median, min, max):

* the depthwise convs of the models: ConvNeXt's 7x7 (4x64x64x96, the first stage of ConvNeXt-T
  at 256 px, batch 4), VAN's 5x5 and 7x7 dilation 3 (4x64x64x64): `layers.depthwise_conv2d`
  with impl='shift' (shifted multiply-adds, custom VJP) and impl='lax'
  (`lax.conv_general_dilated`, feature_group_count=C), and torch's `F.conv2d(groups=C)`;
* UPerNet's bilinear resize 32x32 -> 64x64 of 256 channels: `layers.resize_bilinear` (gathers,
  custom VJP) against jax autodiff of the same gathers (a scatter-add backward) and torch's
  `F.interpolate`.

Prints a table and writes JSON with the machine and load average.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from miml_jax import bench
from miml_jax.models import layers


def _jax_fns(f, args):
  fwd = jax.jit(f)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a[:-1]) * a[-1]), tuple(range(len(args)))))
  cot = jnp.asarray(np.random.default_rng(1).normal(size=fwd(*args).shape), jnp.float32)
  return (lambda: jax.block_until_ready(fwd(*args))), (
    lambda: jax.block_until_ready(grad(*args, cot))
  )


def _torch_fns(f, arrays, threads):
  import torch

  torch.set_num_threads(threads)
  ts = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True) for a in arrays]

  def fwd():
    with torch.no_grad():
      f(*ts)

  def both():
    for t in ts:
      t.grad = None
    f(*ts).sum().backward()

  return fwd, both


def _depthwise(x, w, padding, dilation, impl):
  return layers.depthwise_conv2d(x, w, padding, dilation, impl)


def cases(threads, with_torch):
  rng = np.random.default_rng(0)
  out = []
  for name, (b, h, c), k, d in (
    ("convnext dw 7x7", (4, 64, 96), 7, 1),
    ("van dw 5x5", (4, 64, 64), 5, 1),
    ("van dw 7x7 d3", (4, 64, 64), 7, 3),
  ):
    x = rng.normal(size=(b, h, h, c)).astype(np.float32)
    w = (rng.normal(size=(k, k, 1, c)) / k).astype(np.float32)
    pad = (k - 1) * d // 2
    contenders = {}
    for impl in ("shift", "lax"):
      f = functools.partial(_depthwise, padding=((pad, pad), (pad, pad)), dilation=d, impl=impl)
      contenders[impl] = _jax_fns(f, (jnp.asarray(x), jnp.asarray(w)))
    if with_torch:
      import torch.nn.functional as F

      tf = functools.partial(F.conv2d, padding=pad, dilation=d, groups=c)
      contenders["torch"] = _torch_fns(
        tf, (np.transpose(x, (0, 3, 1, 2)), np.transpose(w, (3, 2, 0, 1))), threads
      )
    out.append((name, contenders))
  x = rng.normal(size=(4, 32, 32, 256)).astype(np.float32)

  def gathers(x):
    for axis in (1, 2):
      i0, i1, w1 = layers._linear_taps(32, 64, False, None)
      shape = [1, 1, 1, 1]
      shape[axis] = 64
      w = jnp.asarray(w1.reshape(shape))
      x = jnp.take(x, i0, axis=axis) * (1 - w) + jnp.take(x, i1, axis=axis) * w
    return x

  contenders = {
    "custom vjp": _jax_fns(lambda x: layers.resize_bilinear(x, (64, 64)), (jnp.asarray(x),)),
    "scatter vjp": _jax_fns(gathers, (jnp.asarray(x),)),
  }
  if with_torch:
    import torch.nn.functional as F

    contenders["torch"] = _torch_fns(
      lambda x: F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False),
      (np.transpose(x, (0, 3, 1, 2)),),
      threads,
    )
  out.append(("upernet resize 32->64 x256", contenders))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  result = {"machine": bench.machine(), "load_before": list(os.getloadavg()), "rows": []}
  for name, contenders in cases(args.torch_threads, not args.no_torch):
    for mode, idx in (("fwd", 0), ("fwd+bwd", 1)):
      fns = {k: v[idx] for k, v in contenders.items()}
      for fn in fns.values():  # warm-up: compilation, first calls
        fn()
        fn()
      times = {k: [] for k in fns}
      for _ in range(args.reps):
        for k, fn in fns.items():
          t = time.perf_counter()
          fn()
          times[k].append(time.perf_counter() - t)
      row = {"op": name, "mode": mode}
      for k, ts in times.items():
        row[k] = {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts)}
        row[k]["max_ms"] = 1e3 * max(ts)
      result["rows"].append(row)
      print(
        f"{name:<28}{mode:<9}" + "".join(f"{k} {row[k]['median_ms']:8.1f} ms  " for k in times),
        flush=True,
      )
  result["load_after"] = list(os.getloadavg())
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  sys.exit(main())
