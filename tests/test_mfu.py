"""The MFU numerator (XLA's FLOP count of a compiled step, per device) and denominator (peaks)."""

import types

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from miml_jax import mfu


def test_compiled_flops_counts_a_matmul_per_device():
  a = jnp.zeros((64, 128), jnp.float32)
  b = jnp.zeros((128, 32), jnp.float32)
  matmul = jax.jit(jnp.dot)
  assert mfu.compiled_flops(matmul.lower(a, b).compile()) == 2 * 64 * 128 * 32
  # Rows split over the two test devices: each device does half the work.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  sharded = jax.jit(
    jnp.dot, in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))
  )
  assert mfu.compiled_flops(sharded.lower(a, b).compile()) == 64 * 128 * 32


def test_peak_flops_lookup():
  device = lambda kind: types.SimpleNamespace(device_kind=kind)
  assert mfu.peak_flops_per_device(device("NVIDIA H100 80GB HBM3")) == 989e12
  assert mfu.peak_flops_per_device(device("NVIDIA H100 PCIe")) == 756e12
  assert mfu.peak_flops_per_device(device("TPU v5 lite")) == 197e12
  assert mfu.peak_flops_per_device(device("TPU v5")) == 459e12
  assert mfu.peak_flops_per_device(device("cpu")) is None
  assert mfu.peak_flops_per_device(device("cpu"), override=1e12) == 1e12
