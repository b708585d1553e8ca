"""``gqsa bench``: end-to-end decode speed of a checkpoint or a synthetic model; the measuring is
:mod:`gqsa.bench`'s."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import common
from .common import CLIError, add_threads


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="end-to-end decode speed: tokens/s, latency, prefill, memory; fp16 vs GQSA side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time the decode engine on a checkpoint folder (settings 'gqsa' = as stored, 'fp16' = the "
                    "same weights dequantized to dense) or on a synthetic model of a named architecture with "
                    "random weights and a random row-balanced group mask, built directly on the device "
                    "(settings fp16, bf16, tinygemm, w{bits}s{sparsity%}g{G}). One untimed warm-up generation "
                    "per batch size, then --repeats timed ones (median).",
        epilog="examples:\n  gqsa bench --synthetic llama-2-7b --settings fp16,w4s50g16,w4s30g16 --batch 1,4,16 "
               "--json runs/bench.json\n  gqsa bench --synthetic llama-2-70b-layers=8\n"
               "  gqsa bench runs/stories260K-w4s50g16 --batch 1")
    p.add_argument("folder", nargs="?", help="GQSA checkpoint folder (or use --synthetic)")
    p.add_argument("--synthetic", metavar="ARCH",
                   help="llama-2-7b | llama-3-8b | llama-2-13b | llama-2-70b | tiny, optionally ARCH-layers=N")
    p.add_argument("--settings", default=None,
                   help="comma-separated; default fp16,w4s50g16,w4s30g16 (synthetic) or gqsa,fp16 (folder); "
                        "synthetic GQSA settings are w{bits}s{sparsity%%}g{G}, with b{R} (blocks of R rows sharing "
                        "their kept groups, --allocation blockR) or c{R} (clusters of R rows, clusterR) appended, "
                        "e.g. w4s30g64c128; tinygemm: torch's int4 g128")
    p.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes (default 1,4,16)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (default 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per row (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per batch size (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts (default 0)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: kernel-time breakdown of a decode step and of the prefill at the first batch size")
    p.add_argument("--no-compile", action="store_true", help="CUDA: eager pointwise ops (norm, RoPE, SiLU)")
    p.add_argument("--no-fuse", action="store_true", help="separate q/k/v and gate/up projections")
    p.add_argument("--no-decode-kernels", action="store_true",
                   help="CUDA: no decode-step Triton kernels (RoPE+KV write, decode attention, add+RMSNorm, SiLU·up): "
                        "index_copy, SDPA and the compiled/eager pointwise ops instead")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH (or to stdout instead of the table: --json alone)")
    add_threads(p)
    p.set_defaults(func=run)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} takes comma-separated integers, e.g. 1,4,16; got '{text}'") from None
    if not values or min(values) < 1:
        raise CLIError(f"{flag} needs positive integers, got '{text}'")
    return values


def _check_memory(arch: str, settings: list[str], device) -> None:
    """One line instead of the out-of-memory killer: the largest setting's estimate against what is free."""
    from ..bench.synthetic import available_memory, memory_needed
    from ..modules import default_device

    device = default_device(device)
    free = available_memory(device)
    if free is None:
        return
    need, name = max((memory_needed(arch, s, device), s) for s in settings)
    if need > free:
        where = "a CPU computes in float32" if device.type != "cuda" else "its weights and kernel layouts"
        raise CLIError(f"--synthetic {arch} with {name} needs about {need / 1e9:.1f} GB on {device} ({where}); "
                       f"{free / 1e9:.1f} GB are free: use fewer layers ({arch.split('-layers=')[0]}-layers=N) or "
                       f"{'a GPU' if device.type != 'cuda' else 'a smaller architecture'}")


def run(args) -> int:
    if (args.folder is None) == (args.synthetic is None):
        raise CLIError("give a checkpoint FOLDER or --synthetic ARCH (one of them)")
    if args.folder is not None and not Path(args.folder).exists():  # (before torch is imported: at once)
        raise CLIError(f"{args.folder}: no such folder")

    from .. import checkpoint
    from ..bench import runner as bench

    if args.folder is not None and not checkpoint.is_gqsa_folder(args.folder):
        raise CLIError(f"{args.folder} is not a GQSA checkpoint folder (config.json without quantization_config); "
                       f"compress it first, or use --synthetic ARCH")
    batches = _int_list(args.batch, "--batch")
    common.apply_threads(args)
    for name in ("prompt_len", "repeats"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        raise CLIError("--new-tokens must be >= 2 (one prefill token and at least one decode step)")
    default = "gqsa,fp16" if args.folder else "fp16,w4s50g16,w4s30g16"
    settings = [s.strip() for s in (args.settings or default).split(",") if s.strip()]
    if not settings:
        raise CLIError("--settings is empty")
    if args.folder is None:
        from ..bench.synthetic import arch_config, parse_setting

        arch_config(args.synthetic)  # unknown names fail here, before anything is built
        for s in settings:
            parse_setting(s)
        _check_memory(args.synthetic, settings, args.device)
    else:
        bad = [s for s in settings if s not in ("gqsa", "fp16")]
        if bad:
            raise CLIError(f"a checkpoint folder is benchmarked as 'gqsa' and/or 'fp16', not {bad[0]!r}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = bench.run(settings, batches, synthetic=args.synthetic, folder=args.folder, device=args.device,
                       prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed,
                       profile=args.profile, compile_ops=False if args.no_compile else "auto",
                       fuse=False if args.no_fuse else "auto",
                       decode_kernels=False if args.no_decode_kernels else "auto", log=log)
    result["command"] = "gqsa " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    print(bench.format_table(result))
    if args.json:
        bench.write_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
