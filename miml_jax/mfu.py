"""Model FLOPs utilisation: the FLOPs one training step performs, over what the devices could do.

FLOPs per step come from XLA's cost analysis of the compiled step, so they count what the
partitioned program does on one device (forward, backward and optimiser; convolutions and
matmuls dominate). MFU = flops_per_device_per_step * steps_per_sec / peak_flops_per_device.

Peak: each device's dense bf16 peak (the usual convention: an fp32 run therefore reports a low
MFU), looked up from its `device_kind`, or `train.peak_flops_per_device` when set (> 0). A device
absent from the table (CPU, say) gets no MFU; the achieved TFLOP/s is logged regardless.
"""

import jax

# (substring of jax Device.device_kind, dense bf16 FLOP/s per device); more specific first.
PEAK_BF16_FLOPS = (
  ("H100 PCIe", 756e12),
  ("H100", 989e12),
  ("H200", 989e12),
  ("B200", 2250e12),
  ("A100", 312e12),
  ("TPU v6 lite", 918e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5", 459e12),  # v5p
  ("TPU v4", 275e12),
)


def peak_flops_per_device(device: jax.Device, override: float = 0.0) -> float | None:
  if override and override > 0:
    return float(override)
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_BF16_FLOPS:
    if name in kind:
      return flops
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled (jax.stages.Compiled) function on one device, if XLA says."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Some backends do not implement cost analysis.
    return None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None
