"""``gqsa inspect``: per-layer and whole-model storage of a checkpoint folder, as a table or JSON."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .common import CLIError


def add_parser(sub):
    p = sub.add_parser("inspect", help="per-layer and whole-model storage of a GQSA checkpoint",
                       description="Validate a checkpoint folder and print, per compressed layer, its shape, "
                                   "sparsity, bits, bytes, bits/weight and the kernels it can use; then the whole model's size on disk "
                                   "vs fp16 and its bits per weight.")
    p.add_argument("folder", help="GQSA checkpoint folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    p.set_defaults(func=run)


def run(args) -> int:
    if not Path(args.folder).is_dir():  # (before torch is imported: a mistyped path fails at once)
        raise CLIError(f"{args.folder}: no such folder" if not Path(args.folder).exists()
                       else f"{args.folder}: not a folder (gqsa inspect reads a GQSA checkpoint folder)")
    from .. import checkpoint, report
    from ..kernels.block_layout import kernel_layout, resident_bytes

    packed = checkpoint.packed_layers(args.folder, verify=not args.no_verify)
    tensors = checkpoint.read_tensors(args.folder, verify=False)
    packed_names = {f"{n}.{t}" for n in packed for t in ("row_ptr", "col_idx", "qweight", "scales", "zeros", "bias")}
    dense = sum(t.numel() for n, t in tensors.items() if n not in packed_names)
    dense_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if n not in packed_names)
    rows = report.layer_rows(packed)
    for row in rows:
        row["kernel_layout"] = kernel_layout(packed[row["name"]])
    tot = report.totals(packed, dense, Path(args.folder))
    layouts = Counter(row["kernel_layout"] for row in rows)
    gpu = dense_bytes + sum(resident_bytes(r["bytes"], r["kernel_layout"]) for r in rows)
    if args.json:
        print(json.dumps({"layers": rows, "totals": {**tot, "kernel_layouts": dict(layouts),
                                                      "gpu_bytes_estimate": gpu}}, indent=2))
        return 0
    w = max(len(r["name"]) for r in rows)
    print(f"{'layer':<{w}}  {'shape':>12}  {'bits':>4}  {'G':>3}  {'sparsity':>8}  {'bytes':>10}  "
          f"{'bits/w':>7}  {'design':>7}  kernels")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<{w}}  {shape:>12}  {r['bits']:>4}  {r['group_size']:>3}  {r['sparsity']:>8.3f}  "
              f"{r['bytes']:>10}  {r['bits_per_weight']:>7.3f}  {r['design_bits_per_weight']:>7.3f}  {r['kernel_layout']}")
    print(f"\ncompressed layers: {tot['compressed_layers']}, weights {tot['compressed_weights']:,}, "
          f"sparsity {tot['sparsity']:.3f}, {tot['bits_per_weight']:.3f} bits/weight "
          f"({tot['packed_bytes']:,} bytes vs {tot['fp16_bytes_of_compressed_layers']:,} in fp16)")
    print("kernel layouts: " + ", ".join(f"{n} {name}" for name, n in sorted(layouts.items()))
          + " (blockR/clusterR: the block tensor-core kernel from batch 2; irregular: the GEMV and tile GEMM)")
    print(f"whole model on disk: {tot['safetensors_bytes']:,} bytes = {tot['size_vs_fp16']:.3f} x fp16 "
          f"({tot['model_fp16_bytes']:,} bytes; dense tensors: {dense:,} values)")
    size = f"{gpu / 2**30:.2f} GiB" if gpu >= 2**30 else f"{gpu / 2**20:.1f} MiB"
    print(f"on a GPU, with the kernels' layouts: about {gpu:,} bytes of weights ({size}: a compressed "
          "layer holds about 2.3x its bytes with row masks, up to 3.2x with block/cluster masks; the KV cache and "
          "activations come on top)")
    return 0
