"""Host memory: keep freed blocks in the process for reuse (glibc's malloc, Linux).

XLA:CPU allocates each run's buffers afresh: a ConvNeXt-B + UPerNet train step at 256 px asks
for ~2.4 GB, APSC-Net's for ~5 GB. glibc serves blocks that large with mmap and returns them
with munmap when the run ends, so the next run faults every page in again (600 K - 1.4 M page
faults a step; 1-18 s of system time on the 2-core Xeon VM measured, the most with torch's
allocations in the same process). `keep_freed_memory()` tells glibc to serve them from its heap
and keep what is freed (one arena, no mmap, no trimming), so a step reuses the pages of the
last: ConvNeXt-B + UPerNet's train step on that VM made 0 page faults instead of 607 K
(benchmarks/README.md).

The price: the process keeps its peak host memory until it exits, as XLA on GPU / TPU keeps
its device memory. The CLI calls this first thing (every `miml-jax` command); a script of your
own can call it before its first jax computation. $MIML_JAX_HOST_MALLOC=system leaves glibc's
defaults alone. Elsewhere than glibc it does nothing.
"""

import ctypes
import os

from miml_jax.errors import UserInputError

ENV = "MIML_JAX_HOST_MALLOC"  # 'keep' (the default) or 'system'.
CHOICES = ("keep", "system")

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse; True when it took effect.

  Call it before the first jax computation: threads that have allocated before keep the arenas
  they had (where glibc still maps large blocks afresh).
  """
  choice = os.environ.get(ENV, "") or "keep"
  if choice not in CHOICES:
    raise UserInputError(f"${ENV}={choice!r}: choose one of {CHOICES}")
  if choice == "system":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to tune.
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # One arena: glibc's per-thread arenas map large blocks with mmap whatever M_MMAP_MAX says.
  # No mmap: large blocks come from the heap. Trim threshold -1: never give the heap back.
  return all(
    mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  )
