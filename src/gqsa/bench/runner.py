"""End-to-end decode benchmark (``gqsa bench``): the same :class:`~gqsa.engine.Engine` on dense and
GQSA versions of one model, batch by batch.

For each setting the model is built (a synthetic architecture, :mod:`gqsa.bench.synthetic`) or
loaded (a checkpoint folder: ``gqsa`` = the folder as is, ``fp16`` = the same weights dequantized to
dense), then for each batch size: random prompts of ``prompt_len`` tokens, one untimed generation
(warm-up: kernel compilation, CUDA-graph capture), then ``repeats`` timed generations of
``new_tokens`` tokens with no end-of-sequence stop. Reported per (setting, batch): decode tokens/s
(batch × steps / decode time, median run), latency per step, prefill time (the median run's: on CUDA, a
prefill of at most ``engine.PREFILL_GRAPH_TOKENS`` tokens is replayed from a CUDA graph from the second timed
run on, as the engine does for a shape it has seen; ``benchmarks/prefill.py`` compares prefills), peak device memory,
model size. ``profile=True`` adds, per setting at batch 1, a torch.profiler breakdown of one decode
step's device time by kernel kind and the idle time between kernels of a replayed graph, and of one
prefill's kernel time against its wall time.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from ..engine import Engine
from ..modules import default_device, replace_submodule
from ..report import environment
from .synthetic import Setting, build_synthetic, parse_setting, weight_bytes


def dense_from_gqsa(model, dtype):
    """Replace every GQSALinear by an nn.Linear holding its dequantized weight (the same model, dense)."""
    from torch import nn

    from ..nn import GQSALinear

    for name, m in list(model.named_modules()):
        if isinstance(m, GQSALinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=dtype)
            lin.weight = nn.Parameter(m.dequantize(dtype), requires_grad=False)
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
            replace_submodule(model, name, lin)
    return model


def load_folder(folder, setting: str, device):
    from ..checkpoint import load

    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    model, _ = load(folder, device=device, dtype=dtype)
    if setting in ("fp16", "dense"):
        dense_from_gqsa(model, dtype)
    elif setting != "gqsa":
        raise ValueError(f"a checkpoint folder is benchmarked as 'gqsa' (as stored) or 'fp16' (dequantized to "
                         f"dense), not '{setting}'")
    return model


def _kind(name: str) -> str:
    n = name.lower()
    if "block_dequant_kernel" in n:
        return "gqsa_block_pre"
    if "block_kernel" in n:
        return "gqsa_block"
    if "_gemv_kernel" in n or "_gemv2_kernel" in n or "_gemv2p_kernel" in n:  # v1, v2, v2 pipelined
        return "gqsa_gemv"
    if "_gemm_kernel" in n:
        return "gqsa_gemm"
    if "_expand_kernel" in n:
        return "gqsa_expand"
    if "int4" in n or "tinygemm" in n:
        return "tinygemm"
    # the decode-step pieces (gqsa.kernels.decode_ops, or torch's / torch.compile's kernels for them)
    if "_decode_attn_kernel" in n or "_attn_merge_kernel" in n:
        return "attention"
    if "_rope_kv_kernel" in n:
        return "rope_kv_write"
    if "index_copy" in n or "indexcopy" in n:
        return "kv_write"
    if "_add_rms_norm_kernel" in n or (n.startswith("triton_") and "rsqrt" in n):
        return "norm"
    if "_silu_mul_kernel" in n or (n.startswith("triton_") and "silu" in n):
        return "silu_mul"
    if n.startswith("triton_") and ("cat" in n or "neg" in n):
        return "rope"
    if any(s in n for s in ("attention", "fmha", "flash", "sdpa", "softmax")):
        return "attention"
    if any(s in n for s in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas")):
        return "cublas"
    return "other"


def _device_events(prof):
    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            tr = e.time_range
            out.append((e.name, tr.start, tr.end))
    return out


def _time_by_kind(events) -> dict:
    """Device time (µs) of ``(name, start, end)`` events summed by :func:`_kind`."""
    by: dict = {}
    for name, a, b in events:
        by[_kind(name)] = by.get(_kind(name), 0.0) + (b - a)
    return by


def kernel_breakdown(fn) -> tuple[dict, object, float]:
    """Profile one call of ``fn`` (synchronized): ``({"kernels", "kernel_sum_ms", "kernel_ms"}, fn's result,
    wall seconds)``, the device kernels' time summed by kind (:func:`_kind`), ms. Kernels replayed from a
    CUDA graph are counted too."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ev = _device_events(prof)
    by = _time_by_kind(ev)
    return ({"kernels": len(ev), "kernel_sum_ms": round(sum(b - a for _, a, b in ev) / 1e3, 2),
             "kernel_ms": {k: round(v / 1e3, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}}, out, wall)


def profile_prefill(engine: Engine, prompts) -> dict:
    """Kernel-time breakdown of one prefill (a generation of 1 token: the prefill alone; until
    2026-12-01 it was 2 tokens, so earlier profiles include one decode step), against its wall time:
    where ``kernel_sum_ms`` is well below ``wall_ms`` the prefill waits on the CPU (kernel launches),
    not on the GPU. The prefill is eager (the engine's prefill graphs off for it)."""
    graphs, engine.prefill_graphs = engine.prefill_graphs, False
    try:
        engine.generate(prompts, 1)  # warm
        kernels, out, wall = kernel_breakdown(lambda: engine.generate(prompts, 1))
    finally:
        engine.prefill_graphs = graphs
    return {"wall_ms": round(1e3 * wall, 2), "prefill_ms": round(1e3 * out.prefill_s, 2), **kernels}


def profile_decode(engine: Engine, prompts, new_tokens: int, steps: int = 8) -> dict:
    """Kernel-time breakdown of decode steps: eager steps (one launch per op, attributable) and
    replayed CUDA graphs (what the benchmark times: kernel time vs. step time = launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    out = engine.generate(prompts, new_tokens)  # the session is warm, graphs captured
    kv_len = out.timings["cache_len"]
    res = {}
    with torch.inference_mode():
        for mode in ("eager", "graph"):
            if mode == "graph" and not engine.cuda_graphs:
                continue
            step = engine.rewound_decode_step(kv_len, steps, graph=mode == "graph")
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
            ev = _device_events(prof)
            by = _time_by_kind(ev)
            kernels = [e for e in ev if not any(m in e[0].lower() for m in ("memcpy", "memset"))]
            span = (max(b for _, _, b in ev) - min(a for _, a, _ in ev)) if ev else 0.0
            busy = sum(b - a for _, a, b in ev)
            names = {}
            for name, a, b in ev:
                c = names.setdefault(name[:90], [0, 0.0])
                c[0] += 1
                c[1] += b - a
            top = sorted(names.items(), key=lambda kv: -kv[1][1])[:30]
            res.setdefault("top_kernels_" + mode, [
                {"name": k, "calls_per_step": round(c / steps, 2), "us_per_step": round(t / steps, 1)}
                for k, (c, t) in top])
            res[mode] = {"kernels_per_step": len(kernels) / steps,
                         "kernel_us_per_step": {k: round(v / steps, 1) for k, v in sorted(by.items())},
                         "kernel_sum_us_per_step": round(busy / steps, 1),
                         "span_us_per_step": round(span / steps, 1),
                         "idle_us_per_step": round((span - busy) / steps, 1)}
        # lm_head alone (cuBLAS GEMV of the dense output layer, or the GQSA one), CUDA events over 50 calls
        x = torch.randn(len(prompts), 1, engine.model.config.hidden_size, device=engine.device, dtype=engine.dtype)
        head = engine.model.lm_head
        for _ in range(3):
            head(x)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(50):
            head(x)
        b.record()
        torch.cuda.synchronize()
        res["lm_head_us"] = round(1e3 * a.elapsed_time(b) / 50, 1)
    return res


def tokens_digest(tokens: list[list[int]]) -> str:
    """A short fingerprint of generated tokens (to compare runs of the same model and prompts)."""
    return hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:12]


def run(settings: list[str], batches: list[int], synthetic: str | None = None, folder=None, device=None,
        prompt_len: int = 32, new_tokens: int = 128, repeats: int = 3, seed: int = 0, profile: bool = False,
        compile_ops="auto", fuse="auto", cuda_graphs="auto", decode_kernels="auto", log=print) -> dict:
    """Benchmark every setting × batch; returns ``{"environment", "config", "rows", "profiles"}``."""
    if (synthetic is None) == (folder is None):
        raise ValueError("benchmark either a checkpoint folder or --synthetic ARCH, not both/neither")
    device = default_device(device)
    cuda = device.type == "cuda"
    if prompt_len < 1 or new_tokens < 2 or repeats < 1 or not batches or min(batches) < 1:
        raise ValueError("need prompt_len >= 1, new_tokens >= 2, repeats >= 1 and batch sizes >= 1")
    parsed = [s if folder is not None else parse_setting(s) for s in settings]
    rows, profiles = [], {}
    for setting in parsed:
        label = setting if isinstance(setting, str) else setting.name
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if folder is not None:
            model = load_folder(folder, setting, device)
        else:
            model = build_synthetic(synthetic, setting, device, seed=seed)
            if not cuda and isinstance(setting, Setting) and setting.kind != "tinygemm":
                model = model.float()  # CPU: float32 compute (fp16 matmuls are slow or missing there)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and prompt_len + new_tokens > limit:  # (positions it was not made for; attention past them blew up)
            raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} = {prompt_len + new_tokens} "
                             f"positions, beyond the model's context of {limit}: ask for at most {limit} in all")
        size = weight_bytes(model)
        engine = Engine(model, compile_ops=compile_ops, fuse_projections=fuse, cuda_graphs=cuda_graphs,
                        decode_kernels=decode_kernels)
        emb = model.get_input_embeddings().weight
        head_w = getattr(model.get_output_embeddings(), "weight", None)  # none when the head is quantized
        tied = head_w is not None and emb.data_ptr() == head_w.data_ptr()
        step_bytes = size - (0 if tied else emb.numel() * emb.element_size())  # weights read per decode step
        if cuda:
            torch.cuda.synchronize(device)
        build_s = time.perf_counter() - t0
        log(f"[{label}] model ready in {build_s:.1f} s, {size / 1e9:.3f} GB of weights")
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(seed)
        for bsz in batches:
            prompts = torch.randint(0, vocab, (bsz, prompt_len), generator=gen).tolist()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t1 = time.perf_counter()
            engine.generate(prompts, new_tokens)  # warm-up: compile, capture
            warm_s = time.perf_counter() - t1
            runs = [engine.generate(prompts, new_tokens) for _ in range(repeats)]
            tps = [r.decode_tokens_per_s for r in runs]
            med = sorted(runs, key=lambda r: r.decode_tokens_per_s)[len(runs) // 2]
            row = {"setting": label, "batch": bsz, "decode_tokens_per_s": round(statistics.median(tps), 2),
                   "ms_per_step": round(med.ms_per_step, 3), "prefill_ms": round(1e3 * statistics.median(
                       r.prefill_s for r in runs), 2), "decode_tokens_per_s_runs": [round(t, 2) for t in tps],
                   "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if cuda else None,
                   "model_gb": round(size / 1e9, 4), "weights_read_per_step_gb": round(step_bytes / 1e9, 4),
                   "kv_cache_gb": round(engine.cache_nbytes() / 1e9, 4),
                   "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "decode_steps": med.decode_steps, "cuda_graphs": med.cuda_graphs,
                   "compute_dtype": str(engine.dtype).removeprefix("torch."),
                   "decode_kernels": engine.decoder.decode_kernels,
                   "warmup_s": round(warm_s, 2), "build_s": round(build_s, 2),
                   "tokens_sha1": tokens_digest(med.tokens), "tokens_equal_across_runs": all(
                       r.tokens == runs[0].tokens for r in runs)}
            rows.append(row)
            log(f"[{label}] batch {bsz}: {row['decode_tokens_per_s']:.1f} tokens/s, {row['ms_per_step']:.3f} ms/step, "
                f"prefill {row['prefill_ms']:.1f} ms (runs {row['decode_tokens_per_s_runs']})")
            if profile and cuda and bsz == batches[0]:
                profiles[f"{label}/b{bsz}"] = p = profile_decode(engine, prompts, new_tokens)
                log(f"[{label}] profile b{bsz}: {json.dumps(p)}")
                profiles[f"{label}/b{bsz}/prefill"] = p = profile_prefill(engine, prompts)
                log(f"[{label}] prefill profile b{bsz}: {json.dumps(p)}")
        engine.release()
        del engine, model
    base = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["setting"] in ("fp16", "dense", "bf16")}
    for r in rows:
        if r["batch"] in base:
            r["speedup_vs_fp16"] = round(r["decode_tokens_per_s"] / base[r["batch"]], 3)
    return {"environment": environment(device),
            "config": {"synthetic": synthetic, "folder": str(folder) if folder else None, "settings": settings,
                       "batches": batches, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                       "seed": seed, "compile_ops": compile_ops, "fuse_projections": fuse, "cuda_graphs": cuda_graphs,
                       "decode_kernels": decode_kernels},
            "rows": rows, "profiles": profiles}


def format_table(result: dict) -> str:
    cols = [("setting", "setting", "{}"), ("batch", "B", "{}"), ("decode_tokens_per_s", "tokens/s", "{:.1f}"),
            ("ms_per_step", "ms/token", "{:.3f}"), ("speedup_vs_fp16", "x fp16", "{:.2f}"),
            ("prefill_ms", "prefill ms", "{:.1f}"), ("peak_memory_gb", "peak GB", "{:.2f}"),
            ("model_gb", "model GB", "{:.3f}")]
    lines = [[h for _, h, _ in cols]]
    for r in result["rows"]:
        lines.append([("-" if r.get(k) is None else f.format(r[k])) for k, _, f in cols])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def write_json(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
