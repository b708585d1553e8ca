"""Issue 12, the decode step: one device call.

1. The kernels of ``gqsa.kernels.decode_ops`` against their pure-torch twins on CUDA, at the model
   shapes (fp16 and bf16, LLaMA-2-7B heads and 8-group GQA, long caches with split-KV, kv_len not a
   multiple of the block, NaN-poisoned outputs).
2. Micro-timings (CUDA graphs, median): the decode attention kernel vs the SDPA path it replaces, and
   RoPE + cache write vs the compiled RoPE + two ``index_copy_``.
3. The engine on a small random GQA model, fp16, CUDA graphs: greedy tokens with the decode kernels vs
   without, and a long prompt (split-KV attention captured in graphs).
4. ``gqsa bench --synthetic llama-2-7b --settings fp16,w4s50g16 --batch 1,4 --new-tokens 64 --repeats 2
   --profile`` with the decode kernels off (``--no-decode-kernels``), on with RoPE + write and attention
   as two kernels (``GQSA_DECODE_UNFUSED_ROPE_ATTENTION=1``), and on (one kernel), in this process.

``PYTHONPATH=src python benchmarks/decode_step.py --out DIR`` writes ``DIR/decode_step.json`` (and the
two bench results) and prints a summary last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from gqsa.kernels import decode_ops as dk

RESULT: dict = {}
DEV = os.environ.get("DECODE_STEP_DEVICE", "cuda")  # (cpu + TRITON_INTERPRET=1: a slow smoke test of parts 1 and 3)


def rel(a, b):
    a, b = a.float(), b.float()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_kernels():
    out = []
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, dtype):
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    for dtype in (torch.float16, torch.bfloat16):
        for h, hkv in ((32, 32), (32, 8)):
            d = 128
            for bsz, t in ((1, 1), (4, 1), (2, 7)):
                L = 256
                qkv = rn(bsz, t, (h + 2 * hkv) * d, dtype=dtype)
                q, k, v = qkv.split((h * d, hkv * d, hkv * d), -1)
                ctab, stab = rn(L, d, dtype=dtype), rn(L, d, dtype=dtype)
                pos = torch.randint(0, L, (bsz, t), device=dev)
                slots = torch.randperm(L, device=dev)[:t]
                kc = torch.full((bsz, hkv, L, d), float("nan"), dtype=dtype, device=dev)
                vc, kr, vr = kc.clone(), kc.clone(), kc.clone()
                qo = dk.rope_kv_write(q, k, v, ctab, stab, kc, vc, slots, positions=pos)
                qr = dk.rope_kv_write_reference(q, k, v, ctab[pos], stab[pos], kr, vr, slots)
                out.append({"kernel": "rope_kv_write", "dtype": str(dtype)[6:], "h": h, "hkv": hkv, "b": bsz, "t": t,
                            "err_q": rel(qo, qr), "err_k": rel(kc[:, :, slots], kr[:, :, slots]),
                            "v_equal": bool(torch.equal(vc[:, :, slots], vr[:, :, slots])),
                            "others_untouched": int(kc.isnan().sum()) == bsz * hkv * (L - t) * d})
            for bsz, kv_len, slot in ((1, 128, 100), (4, 200, 199), (1, 1000, 999), (1, 4096, 4000), (4, 4096, 4095)):
                L = kv_len
                q = rn(bsz, h, 1, d, dtype=dtype)
                kc, vc = rn(bsz, hkv, L, d, dtype=dtype), rn(bsz, hkv, L, d, dtype=dtype)
                valid = torch.rand(bsz, L, generator=g, device=dev) > 0.2
                valid[:, slot] = True
                slots = torch.tensor([slot], device=dev)
                splits = dk.attention_splits(bsz, hkv, kv_len)
                o = torch.full((bsz, 1, h * d), float("nan"), dtype=dtype, device=dev)
                dk.decode_attention(q, kc, vc, valid, slots, kv_len, d ** -0.5, out=o)
                ref = dk.decode_attention_reference(q, kc, vc, valid, slots, kv_len, d ** -0.5)
                out.append({"kernel": "decode_attention", "dtype": str(dtype)[6:], "h": h, "hkv": hkv, "b": bsz,
                            "kv_len": kv_len, "splits": splits, "err": rel(o, ref)})
            for bsz, kv_len, slot in ((1, 128, 100), (4, 200, 199), (1, 1000, 999), (1, 4096, 4000)):
                L, P = kv_len, 4096
                qkv = rn(bsz, 1, (h + 2 * hkv) * d, dtype=dtype)
                q, k, v = qkv.split((h * d, hkv * d, hkv * d), -1)
                ctab, stab = rn(P, d, dtype=dtype), rn(P, d, dtype=dtype)
                pos = torch.randint(0, P, (bsz, 1), device=dev)
                kc, vc = rn(bsz, hkv, L, d, dtype=dtype), rn(bsz, hkv, L, d, dtype=dtype)
                kc[:, :, slot:] = float("nan")
                vc[:, :, slot:] = float("nan")
                kr, vr = kc.clone(), vc.clone()
                valid = torch.rand(bsz, L, generator=g, device=dev) > 0.2
                valid[:, slot] = True
                slots = torch.tensor([slot], device=dev)
                o = torch.full((bsz, 1, h * d), float("nan"), dtype=dtype, device=dev)
                dk.rope_decode_attention(q, k, v, ctab, stab, pos, kc, vc, valid, slots, kv_len, d ** -0.5, out=o)
                qr = dk.rope_kv_write_reference(q, k, v, ctab[pos], stab[pos], kr, vr, slots)
                ref = dk.decode_attention_reference(qr, kr.nan_to_num(), vr.nan_to_num(), valid, slots, kv_len,
                                                    d ** -0.5)
                out.append({"kernel": "rope_decode_attention", "dtype": str(dtype)[6:], "h": h, "hkv": hkv,
                            "b": bsz, "kv_len": kv_len, "splits": dk.attention_splits(bsz, hkv, kv_len),
                            "err": rel(o, ref), "err_k": rel(kc[:, :, slot], kr[:, :, slot]),
                            "v_equal": bool(torch.equal(vc[:, :, slot], vr[:, :, slot])),
                            "later_untouched": bool(kc[:, :, slot + 1:].isnan().all())})
        x, dx, w = rn(4, 4096, dtype=dtype), rn(4, 4096, dtype=dtype), rn(4096, dtype=dtype)
        s, y = dk.add_rms_norm(x, dx, w, 1e-5)
        sr, yr = dk.add_rms_norm_reference(x, dx, w, 1e-5)
        out.append({"kernel": "add_rms_norm", "dtype": str(dtype)[6:], "s_equal": bool(torch.equal(s, sr)),
                    "err": rel(y, yr), "y_equal": bool(torch.equal(y, yr))})
        gu = rn(4, 2 * 11008, dtype=dtype)
        out.append({"kernel": "silu_mul", "dtype": str(dtype)[6:],
                    "err": rel(dk.silu_mul(gu), dk.silu_mul_reference(gu))})
        lg = rn(4, 32000, dtype=dtype)
        st = []
        for fn in (dk.greedy_advance, dk.greedy_advance_reference):
            done = torch.tensor([False, True, False, False], device=dev)
            eos = torch.full((8,), -1, dtype=torch.long, device=dev)
            eos[0] = int(lg[2].argmax())
            o = torch.full((4, 5), -7, dtype=torch.long, device=dev)
            tok, pos = torch.zeros(4, 1, dtype=torch.long, device=dev), torch.arange(4, device=dev)[:, None]
            ctr = torch.tensor([10, 1], device=dev)
            fn(lg, done, torch.tensor(0, device=dev), eos, o, tok, pos, ctr)
            st.append((done, o, tok, pos, ctr))
        out.append({"kernel": "greedy_advance", "dtype": str(dtype)[6:],
                    "equal": all(bool(torch.equal(a, b)) for a, b in zip(*st))})
    return out


def graph_time_us(fn, n=20):
    """Median µs per call of ``fn`` replayed in a CUDA graph of n calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(n):
            fn()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        gr.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / n)
    return round(sorted(ts)[len(ts) // 2], 2)


def micro_timings():
    import torch.nn.functional as F

    from gqsa.engine import ops

    dev, dtype, d = "cuda", torch.float16, 128
    rows = []
    for bsz, h, hkv in ((1, 32, 32), (4, 32, 32), (1, 32, 8)):
        for kv_len in (128, 1024, 4096):  # attention alone (q already rotated) vs SDPA
            q = torch.randn(bsz, h, 1, d, device=dev, dtype=dtype)
            kc = torch.randn(bsz, hkv, kv_len, d, device=dev, dtype=dtype)
            vc = torch.randn_like(kc)
            valid = torch.ones(bsz, kv_len, dtype=torch.bool, device=dev)
            slots = torch.tensor([kv_len - 1], device=dev)
            mask = torch.zeros(bsz, 1, 1, kv_len, dtype=dtype, device=dev)
            gq = h // hkv

            def sdpa():
                if gq > 1:
                    o = F.scaled_dot_product_attention(q.reshape(bsz, hkv, gq, d), kc, vc, attn_mask=mask, scale=0.08)
                else:
                    o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=0.08)
                return o.reshape(bsz, h, 1, d).transpose(1, 2).reshape(bsz, 1, h * d)

            row = {"b": bsz, "h": h, "hkv": hkv, "kv_len": kv_len, "sdpa_us": graph_time_us(sdpa),
                   "splits_auto": dk.attention_splits(bsz, hkv, kv_len),
                   "kernel_auto_us": graph_time_us(lambda: dk.decode_attention(q, kc, vc, valid, slots, kv_len, 0.08))}
            if kv_len >= 1024:
                row["kernel_s1_us"] = graph_time_us(lambda: dk.decode_attention(q, kc, vc, valid, slots, kv_len, 0.08,
                                                                                splits=1))
            rows.append(row)
    # one layer's RoPE + cache write + attention at 128 slots: compiled RoPE + 2 index_copy_ + SDPA (before),
    # rope_kv_write + decode_attention, rope_decode_attention (one launch)
    fused = []
    for bsz, h, hkv in ((1, 32, 32), (4, 32, 32), (1, 32, 8)):
        L, kv_len = 256, 128
        qkv = torch.randn(bsz, 1, (h + 2 * hkv) * d, device=dev, dtype=dtype)
        q, k, v = qkv.split((h * d, hkv * d, hkv * d), -1)
        kc = torch.randn(bsz, hkv, L, d, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)
        ctab, stab = torch.randn(L, d, device=dev, dtype=dtype), torch.randn(L, d, device=dev, dtype=dtype)
        pos = torch.full((bsz, 1), 100, device=dev)
        slots = torch.tensor([100], device=dev)
        valid = torch.ones(bsz, L, dtype=torch.bool, device=dev)
        cos, sin = ctab[pos], stab[pos]
        mask = torch.zeros(bsz, 1, 1, kv_len, dtype=dtype, device=dev)
        rope = ops.compiled("rope")
        gq = h // hkv

        def before():
            qq = q.view(bsz, 1, h, d).transpose(1, 2)
            kk = k.view(bsz, 1, hkv, d).transpose(1, 2)
            vv = v.view(bsz, 1, hkv, d).transpose(1, 2)
            qq, kk = rope(qq, kk, cos, sin)
            kc.index_copy_(2, slots, kk)
            vc.index_copy_(2, slots, vv)
            kv, vv2 = kc[:, :, :kv_len], vc[:, :, :kv_len]
            if gq > 1:
                o = F.scaled_dot_product_attention(qq.reshape(bsz, hkv, gq, d), kv, vv2, attn_mask=mask, scale=0.08)
            else:
                o = F.scaled_dot_product_attention(qq, kv, vv2, attn_mask=mask, scale=0.08)
            return o.reshape(bsz, h, 1, d).transpose(1, 2).reshape(bsz, 1, h * d)

        def two():
            qo = dk.rope_kv_write(q, k, v, ctab, stab, kc, vc, slots, positions=pos)
            return dk.decode_attention(qo, kc, vc, valid, slots, kv_len, 0.08)

        fused.append({"b": bsz, "h": h, "hkv": hkv, "kv_len": kv_len,
                      "before_rope_2xindex_copy_sdpa_us": graph_time_us(before),
                      "rope_kv_write_then_attention_us": graph_time_us(two),
                      "rope_decode_attention_us": graph_time_us(
                          lambda: dk.rope_decode_attention(q, k, v, ctab, stab, pos, kc, vc, valid, slots, kv_len,
                                                           0.08))})
    # RoPE + cache write (B=1, 7B heads) vs compiled rope + two index_copy_
    bsz, h, hkv, L = 1, 32, 32, 256
    qkv = torch.randn(bsz, 1, (h + 2 * hkv) * d, device=dev, dtype=dtype)
    q, k, v = qkv.split((h * d, hkv * d, hkv * d), -1)
    kc = torch.zeros(bsz, hkv, L, d, device=dev, dtype=dtype)
    vc = torch.zeros_like(kc)
    ctab, stab = torch.randn(L, d, device=dev, dtype=dtype), torch.randn(L, d, device=dev, dtype=dtype)
    pos = torch.tensor([[17]], device=dev)
    slots = torch.tensor([17], device=dev)
    cos, sin = ctab[pos], stab[pos]
    rope = ops.compiled("rope")

    def before():
        qq = q.view(bsz, 1, h, d).transpose(1, 2)
        kk = k.view(bsz, 1, hkv, d).transpose(1, 2)
        vv = v.view(bsz, 1, hkv, d).transpose(1, 2)
        qq, kk = rope(qq, kk, cos, sin)
        kc.index_copy_(2, slots, kk)
        vc.index_copy_(2, slots, vv)
        return qq

    rope_rows = {"rope_compiled_plus_2_index_copy_us": graph_time_us(before),
                 "rope_kv_write_us": graph_time_us(lambda: dk.rope_kv_write(q, k, v, ctab, stab, kc, vc, slots,
                                                                             positions=pos))}
    x, dx, w = (torch.randn(1, 1, 4096, device=dev, dtype=dtype) for _ in range(3))
    w = w[0, 0]
    an = ops.compiled("add_rms_norm")
    gu = torch.randn(1, 1, 2 * 11008, device=dev, dtype=dtype)
    sm = ops.compiled("silu_mul")
    rope_rows.update({"add_rms_norm_compiled_us": graph_time_us(lambda: an(x, dx, w, 1e-5)),
                      "add_rms_norm_kernel_us": graph_time_us(lambda: dk.add_rms_norm(x, dx, w, 1e-5)),
                      "silu_mul_compiled_us": graph_time_us(lambda: sm(gu)),
                      "silu_mul_kernel_us": graph_time_us(lambda: dk.silu_mul(gu))})
    return {"attention": rows, "rope_write_attention": fused, "pointwise": rope_rows}


def engine_checks():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqsa.engine import Engine

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval().to(DEV, torch.float16 if DEV == "cuda" else torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 12, 9)]
    res = {}
    ref = [model.generate(torch.tensor([p], device=DEV), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    off = Engine(model, decode_kernels=False)
    on = Engine(model, decode_kernels="auto" if DEV == "cuda" else True)
    assert on.decoder.decode_kernels and not off.decoder.decode_kernels and on.cuda_graphs == (DEV == "cuda")
    for name, eng in (("off", off), ("on", on)):
        batch = eng.generate(prompts, 24).tokens
        single = [eng.generate([p], 24).tokens[0] for p in prompts]
        res[name] = {"batch_equal_hf": batch == ref, "single_equal_hf": single == ref,
                     "batch_tokens_equal_hf": sum(a == b for x, y in zip(batch, ref) for a, b in zip(x, y)),
                     "single_tokens_equal_hf": sum(a == b for x, y in zip(single, ref) for a, b in zip(x, y)),
                     "tokens": sum(len(r) for r in ref)}
    long = torch.randint(0, 512, (700,), generator=gen).tolist()
    ref_long = model.generate(torch.tensor([long], device=DEV), max_new_tokens=40, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, 700:].tolist()
    for name, eng in (("off", off), ("on", on)):
        t = eng.generate([long], 40).tokens[0]
        res[name]["long_700_prompt_tokens_equal_hf"] = sum(a == b for a, b in zip(t, ref_long))
        res[name]["long_700_prompt_first_diff"] = next((i for i, (a, b) in enumerate(zip(t, ref_long)) if a != b), None)
    res["long_splits"] = dk.attention_splits(1, 2, 768)
    # float32 on the GPU (the kernels' dots in IEEE float32): greedy tokens vs transformers
    m32 = LlamaForCausalLM(cfg).eval().to(DEV, torch.float32)
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ref32 = [m32.generate(torch.tensor([p], device=DEV), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    for name, kw in (("fp32_off", {"decode_kernels": False}), ("fp32_on", {})):
        eng = Engine(m32, **kw)
        batch = eng.generate(prompts, 24).tokens
        res[name] = {"batch_tokens_equal_hf": sum(a == b for x, y in zip(batch, ref32) for a, b in zip(x, y)),
                     "tokens": sum(len(r) for r in ref32), "decode_kernels": eng.decoder.decode_kernels}
        eng.release()
    # fp16, teacher-forced on transformers' greedy tokens: logits of one decode step per position, kernels
    # on vs off vs transformers' own forward
    from gqsa.engine import LlamaDecoder, StaticKVCache

    p = prompts[1]
    seq = torch.tensor([p + ref[1]], device=DEV)
    with torch.inference_mode():
        hf_logits = model(seq).logits[0].float()  # [T, V]
        diag = {}
        for kern in (False, True):
            dec = LlamaDecoder(model, fuse_projections=False, compile_ops=False, decode_kernels=kern)
            cache = StaticKVCache(dec.n_layers, 1, dec.n_kv, 64, dec.head_dim, next(model.parameters()).dtype, DEV)
            n0 = len(p)
            cache.valid[:, :n0] = True
            outs = [dec.forward(cache, seq[:, :n0], torch.arange(n0, device=DEV)[None], torch.arange(n0, device=DEV),
                                n0).float()]
            for i in range(n0, seq.shape[1] - 1):
                cache.valid[:, i] = True
                outs.append(dec.forward(cache, seq[:, i:i + 1], torch.tensor([[i]], device=DEV),
                                        torch.tensor([i], device=DEV), 64).float())
            lg = torch.cat(outs)  # logits predicting positions n0 .. T-1
            ref_lg = hf_logits[n0 - 1:seq.shape[1] - 1]
            top2 = ref_lg.topk(2, -1).values
            diag["on" if kern else "off"] = {
                "max_abs_diff_vs_hf": round(float((lg - ref_lg).abs().max()), 5),
                "logit_std": round(float(ref_lg.std()), 4),
                "argmax_equal": int((lg.argmax(-1) == ref_lg.argmax(-1)).sum()), "steps": int(lg.shape[0]),
                "min_top2_margin_hf": round(float((top2[:, 0] - top2[:, 1]).min()), 5)}
        res["fp16_teacher_forced"] = diag
    return res


def summarize(tag, r):
    lines = []
    for row in r["rows"]:
        lines.append(f"{tag:8s} {row['setting']:10s} B={row['batch']}: {row['decode_tokens_per_s']:8.1f} tok/s "
                     f"{row['ms_per_step']:.3f} ms/step runs {row['decode_tokens_per_s_runs']}")
    for k, p in r.get("profiles", {}).items():
        gph = p.get("graph", {})
        lines.append(f"{tag:8s} {k}: graph kernels/step {gph.get('kernels_per_step')}, "
                     f"span {gph.get('span_us_per_step')} "
                     f"us, idle {gph.get('idle_us_per_step')} us, kinds {gph.get('kernel_us_per_step')}")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/decode_step")
    ap.add_argument("--skip", default="", help="comma-separated: kernels,micro,engine,bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    from gqsa.report import environment

    RESULT["environment"] = environment(torch.device(DEV))
    RESULT["command"] = " ".join(sys.argv)

    def save():
        (out / "decode_step.json").write_text(json.dumps(RESULT, indent=2))

    for name, fn in (("kernels", check_kernels), ("micro", micro_timings), ("engine", engine_checks)):
        if name in skip:
            continue
        t0 = time.time()
        try:
            RESULT[name] = fn()
        except Exception:  # noqa: BLE001 - keep going, report
            RESULT[name] = {"error": traceback.format_exc()}
        RESULT[name + "_s"] = round(time.time() - t0, 1)
        print(f"== {name} ({RESULT[name + '_s']} s)", json.dumps(RESULT[name])[:1200], flush=True)
        save()
    summary = []
    if "bench" not in skip:
        from gqsa.bench import runner
        from gqsa.engine import llama as llama_mod

        for tag, dkern in (("off", False), ("unfused", "auto"), ("on", "auto")):
            llama_mod.FUSED_ROPE_ATTENTION = tag != "unfused"
            t0 = time.time()
            try:
                r = runner.run(["fp16", "w4s50g16"], [1, 4], synthetic="llama-2-7b", new_tokens=64, repeats=2,
                               profile=True, decode_kernels=dkern, log=lambda m: print(m, flush=True))
                r["command"] = (("GQSA_DECODE_UNFUSED_ROPE_ATTENTION=1 " if tag == "unfused" else "")
                                + "gqsa bench --synthetic llama-2-7b --settings fp16,w4s50g16 --batch 1,4 "
                                "--new-tokens 64 --repeats 2 --profile"
                                + (" --no-decode-kernels" if dkern is False else ""))
                runner.write_json(r, out / f"bench_{tag}.json")
                summary += summarize(tag, r)
            except Exception:  # noqa: BLE001
                RESULT["bench_" + tag] = {"error": traceback.format_exc()}
                print(RESULT["bench_" + tag]["error"], flush=True)
            RESULT[f"bench_{tag}_s"] = round(time.time() - t0, 1)
            save()
    print("\n=== SUMMARY")
    for k in ("kernels", "engine"):
        v = RESULT.get(k)
        if isinstance(v, list):
            bad = [r for r in v if any((isinstance(x, float) and not x < 2e-2) for x in r.values())
                   or any(x is False for x in r.values())]
            print(f"{k}: {len(v)} checks, {len(bad)} off: {bad[:4]}")
            print(f"{k}: max err", max(max((x for kk, x in r.items() if kk.startswith('err') and isinstance(x, float)),
                                           default=0) for r in v))
        else:
            print(k, json.dumps(v)[:1500])
    m = RESULT.get("micro")
    if isinstance(m, dict) and "attention" in m:
        for r in m["attention"]:
            print("attn", r)
        for r in m["rope_write_attention"]:
            print("rope+write+attn", r)
        print("pointwise", m["pointwise"])
    else:
        print("micro", json.dumps(m)[:1500])
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
