"""What goes into ``gqsa_report.json`` and ``gqsa inspect``: per-layer and whole-model storage
accounting, and the environment a result was produced on."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .format import PackedLinear, design_bits_per_weight


def environment(device=None) -> dict:
    """Versions and machine a result was produced on; with ``device`` (measurements) also that device's
    details: the GPU's name, SMs and memory, or the CPU threads, the Triton version, and the kernel settings a
    timing depends on — every ``GQSA_*`` environment variable set, and the programmatic-dependent-launch policy
    in force (``GQSA_PDL`` or its default)."""
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        from importlib.metadata import version

        env["gqsa"] = version("gqsa")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        pass
    if device is not None:
        env["device"] = str(device)
        try:
            import triton

            env["triton"] = triton.__version__
        except Exception:  # pragma: no cover
            env["triton"] = None
        from .kernels import jit

        env["gqsa_settings"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("GQSA_")}
        env["pdl"] = jit.pdl_setting()
        if torch.device(device).type == "cuda":
            p = torch.cuda.get_device_properties(device)
            env.update(gpu=p.name, sms=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1))
        else:
            env["cpu_threads"] = torch.get_num_threads()
    return env


def compression_report(model, config, packed: dict[str, PackedLinear], stats: dict, tokens: torch.Tensor,
                       batch_size: int, device, seconds: float) -> dict:
    """The part of ``gqsa_report.json`` that every GQSA compression has (``gqsa.compress`` and ``gqsa
    compress``; the command adds what it knows of its sources): settings, calibration shape, stage
    statistics, time, environment and storage of ``model`` after compression."""
    dense = sum(p.numel() for p in model.parameters()) - sum(
        m.bias.numel() for m in model.modules() if hasattr(m, "packed") and m.bias is not None)
    return {
        "method": "gqsa", "stage": config.stages, "config": config.to_dict(),
        "torch_threads": torch.get_num_threads(), "stages": stats,
        "calibration": {"nsamples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]), "batch_size": batch_size,
                        **stats.get("calibration_split", {})},
        "device": str(device), "seconds": round(seconds, 1), "environment": environment(),
        "layers": layer_rows(packed), "totals": totals(packed, dense), "evaluations": [],
    }


def layer_rows(packed: dict[str, PackedLinear]) -> list[dict]:
    rows = []
    for name, p in packed.items():
        n, k = p.shape
        rows.append({"name": name, "shape": [n, k], "bits": p.bits, "group_size": p.group_size,
                     "sparsity": round(p.sparsity, 4), "bytes": p.nbytes(),
                     "bits_per_weight": round(p.bits_per_weight(), 4),
                     "design_bits_per_weight": round(
                         design_bits_per_weight(p.sparsity, p.bits, p.group_size, k, p.float_zeros), 4)})
    return rows


def totals(packed: dict[str, PackedLinear], dense_params: int, folder: Path | None = None) -> dict:
    """Whole-model accounting: compressed weights vs fp16 and the checkpoint's size on disk."""
    weights = sum(p.shape[0] * p.shape[1] for p in packed.values())
    packed_bytes = sum(p.nbytes() for p in packed.values())
    kept = sum((1 - p.sparsity) * p.shape[0] * p.shape[1] for p in packed.values())
    out = {
        "compressed_layers": len(packed),
        "compressed_weights": weights,
        "sparsity": round(1 - kept / weights, 4),
        "packed_bytes": packed_bytes,
        "bits_per_weight": round(8 * packed_bytes / weights, 4),
        "fp16_bytes_of_compressed_layers": 2 * weights,
        "dense_params_uncompressed": dense_params,
        "model_fp16_bytes": 2 * (weights + dense_params),
    }
    if folder is not None:
        size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        out["safetensors_bytes"] = size
        out["size_vs_fp16"] = round(size / out["model_fp16_bytes"], 4)
    return out
