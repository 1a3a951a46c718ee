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
resolve differently. Several processes (hosts) form one mesh over all their devices after
`initialize_multihost` (`miml-jax train --multihost`); each feeds the batch rows of its own
devices (input/pipeline.py) and process 0 alone writes logs and files.
"""

import os
import sys
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from miml_jax.errors import UserInputError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
DEFAULT_FSDP_MIN_SIZE = 2**18


def initialize_multihost(
  coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
):
  """Joins this process to a multi-process JAX run; call before anything touches a device.

  With no arguments JAX finds the cluster itself (TPU pods, SLURM, Open MPI, Kubernetes, or the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables). Otherwise give all
  three, e.g. two processes on one machine: coordinator 127.0.0.1:12355, num_processes 2,
  process_id 0 and 1. CPU devices then talk through gloo collectives.
  """
  given = [coordinator, num_processes, process_id]
  if any(v is not None for v in given) and any(v is None for v in given):
    raise UserInputError(
      "multi-host: give --coordinator, --num-processes and --process-id "
      "together (or none of them, to let JAX detect the cluster)"
    )
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise UserInputError(f"multi-host: --process-id {process_id} is not in [0, {num_processes})")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Gloo announces its connections on the process's stdout (file descriptor 1), which belongs
  # to the command's `--json` output: native code's stdout now goes to stderr, and Python's
  # sys.stdout keeps the original stream.
  sys.stdout.flush()
  sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)
  jax.distributed.initialize(
    coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
  )


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
      raise UserInputError(
        f"mesh: {len(devices)} devices do not split into {dict(zip(AXES, sizes))}"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise UserInputError(
      f"mesh: {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
      f"there are {len(devices)}"
    )
  return Mesh(np.array(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` copied whole onto every device of the mesh (all processes).

  Global arrays (sharded training state) are resharded on device; arrays living on this
  process alone (e.g. weights a process loaded from a file) go through the host, every process
  giving the same values.
  """
  target = replicated(mesh)

  def put(x):
    if jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable:
      x = np.asarray(x)
    return jax.device_put(x, target)

  return jax.tree_util.tree_map(put, tree)


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
    lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp_size, min_size)), tree
  )
