"""Accelerator peak FLOP/s and prices, and the recipe's ``cost:`` block (no heavy imports: recipe/ uses it).

Peaks are dense (no sparsity) bf16 tensor-core FLOP/s per device from the vendors' data sheets (fp16 for
V100/T4, which lack bf16). Prices are indicative on-demand cloud prices per device-hour; every number can be
overridden from the command line or the recipe::

    cost:
      gpu: h100-sxm
      gpus: 16
      usd_per_gpu_hour: 2.49
      mfu: 0.45
      hardware:                       # add or replace table entries
        my-cluster-gpu: {peak_flops: 989.0e12, usd_per_gpu_hour: 1.90}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from llmfoundry_lite.errors import RecipeError, suggest


@dataclass(frozen=True)
class Accelerator:
    """One kind of device: peak dense bf16 FLOP/s and a default price per device-hour (USD)."""

    peak_flops: float
    usd_per_gpu_hour: float
    description: str = ""


# Default prices: roughly the on-demand rates of GPU clouds in 2024-25; a100-80gb is the $2.20 per GPU-hour
# behind MosaicBERT's "$20" claim. Override them: prices vary by provider and commitment.
HARDWARE: dict[str, Accelerator] = {
    "a100-40gb": Accelerator(312e12, 1.50, "NVIDIA A100 40GB"),
    "a100-80gb": Accelerator(312e12, 2.20, "NVIDIA A100 80GB"),
    "h100-sxm": Accelerator(989e12, 3.00, "NVIDIA H100 SXM5 80GB"),
    "h100-pcie": Accelerator(756e12, 2.50, "NVIDIA H100 PCIe 80GB"),
    "h100-nvl": Accelerator(835e12, 2.80, "NVIDIA H100 NVL 94GB"),
    "h200": Accelerator(989e12, 3.80, "NVIDIA H200 141GB"),
    "b200": Accelerator(2250e12, 6.00, "NVIDIA B200"),
    "l40s": Accelerator(362e12, 1.50, "NVIDIA L40S"),
    "l4": Accelerator(121e12, 0.80, "NVIDIA L4"),
    "a10": Accelerator(125e12, 1.00, "NVIDIA A10"),
    "a10g": Accelerator(70e12, 1.00, "NVIDIA A10G (AWS; no official bf16 figure, ~70 TFLOP/s)"),
    "v100": Accelerator(125e12, 0.90, "NVIDIA V100 SXM2 (fp16; no bf16)"),
    "t4": Accelerator(65e12, 0.35, "NVIDIA T4 (fp16; no bf16)"),
    "mi300x": Accelerator(1307e12, 3.00, "AMD Instinct MI300X"),
}
ALIASES = {"a100": "a100-80gb", "h100": "h100-sxm", "h200-sxm": "h200", "v100-sxm": "v100"}
# A CPU has no table peak: it is measured (2048x2048 fp32 matmul) unless the recipe or CLI gives one.
CPU = "cpu"
CPU_USD_PER_HOUR = 0.10  # a small cloud VM; only matters for `--gpu cpu` estimates


@dataclass
class CostConfig:
    """The recipe's ``cost:`` block: defaults for `llmfoundry-lite estimate` and the `cost_monitor` callback."""

    gpu: Optional[str] = None  # a HARDWARE name (or one added under `hardware`)
    gpus: Optional[int] = None  # devices the run uses (estimate only; training uses the world size)
    usd_per_gpu_hour: Optional[float] = None  # price per device-hour; default from the table
    mfu: Optional[float] = None  # assumed model FLOPs utilisation for estimates
    peak_flops: Optional[float] = None  # per-device peak FLOP/s; overrides the table (CPU: skips measuring)
    hardware: Optional[dict] = None  # name -> {peak_flops, usd_per_gpu_hour}: extends the table


@dataclass
class HardwareSpec:
    """An entry of ``cost.hardware``."""

    peak_flops: float
    usd_per_gpu_hour: Optional[float] = None
    description: Optional[str] = None


def normalize(name: str) -> str:
    """Lower-case, dashes: 'A100_80GB' -> 'a100-80gb'; aliases resolved."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    return ALIASES.get(key, key)


def parse_cost(block: Any, key: str = "cost") -> CostConfig:
    """Validate a ``cost:`` mapping (or None) into a CostConfig; errors name the key path."""
    from llmfoundry_lite import registry

    if block is None:
        return CostConfig()
    if hasattr(block, "_content"):  # DictConfig
        from omegaconf import OmegaConf

        block = OmegaConf.to_container(block, resolve=True)
    if not isinstance(block, dict):
        raise RecipeError(f"expected a mapping with keys of CostConfig, got {block!r}", key=key)
    registry.check_dataclass(CostConfig, block, key)
    cost = CostConfig(**block)
    for name, spec in (cost.hardware or {}).items():
        path = f"{key}.hardware.{name}"
        if not isinstance(spec, dict):
            raise RecipeError(f"expected {{peak_flops: ..., usd_per_gpu_hour: ...}}, got {spec!r}", key=path)
        registry.check_dataclass(HardwareSpec, spec, path)
        if spec["peak_flops"] <= 0:
            raise RecipeError(f"must be positive, got {spec['peak_flops']!r}", key=f"{path}.peak_flops")
    if cost.mfu is not None and not 0 < cost.mfu <= 1:
        raise RecipeError(f"must be in (0, 1], got {cost.mfu!r}", key=f"{key}.mfu")
    if cost.gpus is not None and cost.gpus <= 0:
        raise RecipeError(f"must be a positive integer, got {cost.gpus!r}", key=f"{key}.gpus")
    return cost


def table(extra: Optional[dict] = None) -> dict[str, Accelerator]:
    """The built-in table plus ``extra`` entries ({name: {peak_flops, usd_per_gpu_hour}}), later wins."""
    out = dict(HARDWARE)
    for name, spec in (extra or {}).items():
        base = out.get(normalize(name))
        price = spec.get("usd_per_gpu_hour")
        if price is None:
            price = base.usd_per_gpu_hour if base else 0.0
        out[normalize(name)] = Accelerator(
            float(spec["peak_flops"]), float(price), spec.get("description") or name
        )
    return out


def lookup(name: str, extra: Optional[dict] = None, key: str = "--gpu") -> Accelerator:
    """The table entry for ``name``; unknown names raise a RecipeError listing the known ones."""
    entries = table(extra)
    norm = normalize(name)
    if norm in entries:
        return entries[norm]
    raise RecipeError(
        f"unknown accelerator {name!r}{suggest(norm, list(entries))}; known: {', '.join(sorted(entries))}, cpu "
        "(add one under cost.hardware in the recipe, or pass --peak-flops)",
        key=key,
    )


def detect_kind(device_name: str) -> Optional[str]:
    """Map a CUDA device name ('NVIDIA A100-SXM4-80GB', 'NVIDIA H100 80GB HBM3') to a table name, or None."""
    n = device_name.lower()
    rules = [
        ("h200", "h200"),
        ("gh200", "h200"),
        ("h100 nvl", "h100-nvl"),
        ("h100 pcie", "h100-pcie"),
        ("h100", "h100-sxm"),
        ("b200", "b200"),
        ("l40s", "l40s"),
        ("a10g", "a10g"),
        ("v100", "v100"),
        ("t4", "t4"),
        ("mi300x", "mi300x"),
    ]
    for needle, kind in rules:
        if needle in n:
            return kind
    if "a100" in n:
        return "a100-40gb" if "40gb" in n else "a100-80gb"
    if "l4" in n.replace("l40", ""):
        return "l4"
    if "a10" in n:
        return "a10"
    return None
