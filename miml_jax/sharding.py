"""The device mesh and the sharding rules: data parallelism and FSDP on one named mesh.

Config (the `mesh` section; defaults give pure data parallelism over every device):

    mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**18)

* `data`, `fsdp`: mesh axis sizes; one of them may be -1 (all devices not used by the other).
  The product must equal the number of devices (all processes together).
* The batch is split over both axes, ('data', 'fsdp'): FSDP is data parallelism whose replicas
  also split the weights, so every device sees its own examples.
* A parameter with at least `fsdp_min_size` elements is sharded along its largest dimension that
  the fsdp axis size divides; smaller ones (norms, biases, small kernels) stay replicated, where
  sharding would cost more in collectives than it saves in memory. The optimiser state gets the
  same rule leaf by leaf (Adam's moments have their parameter's shape), so it is sharded like
  the parameters. XLA inserts the all-gathers (forward) and reduce-scatters (backward).
* BatchNorm statistics are global over the sharded batch: jit sees one global batch, and the
  batch mean is a cross-device reduction.

The same config runs on 1 CPU, N simulated devices, a GPU node or a pod: only the axis sizes
resolve differently.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from miml_jax.errors import UserInputError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
DEFAULT_FSDP_MIN_SIZE = 2**18


def _mesh_config(config) -> dict:
  """The `mesh` section of a config as a dict ({} when there is none)."""
  return dict((config.get("mesh") if config is not None else None) or {})


def make_mesh(config, devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh of `config.mesh` over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  cfg = _mesh_config(config)
  sizes = [int(cfg.get(axis, -1 if axis == "data" else 1)) for axis in AXES]
  if sizes.count(-1) > 1:
    raise UserInputError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserInputError(f"mesh: axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % known:
      raise UserInputError(f"mesh: {len(devices)} devices do not split into "
                           f"{dict(zip(AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise UserInputError(f"mesh: {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"there are {len(devices)}")
  return Mesh(np.array(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_spec(shape, fsdp_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """FSDP rule for one array: shard its largest fsdp-divisible dimension, if it is big enough."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp_size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], -d))
  return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])


def tree_shardings(tree: Any, mesh: Mesh, config=None) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the FSDP rule."""
  min_size = int(_mesh_config(config).get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE))
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp_size, min_size)), tree)
