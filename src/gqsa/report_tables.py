"""The written form of a ``gqsa report``: markdown tables, headline comparisons, the Pareto front, the plot."""
from __future__ import annotations

import math
from pathlib import Path


def _fmt(v, spec: str, missing: str = "–") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def markdown(report: dict) -> str:
    """The report as markdown: settings, the main table, per-task accuracies, headline comparisons."""
    s = report["settings"]
    rows = report["rows"]
    ref = next((r for r in rows if r["family"] == "reference"), None)
    ref_ppl = ref["ppl"]["ppl"] if ref else None
    ppl_r = rows[0]["ppl"] if rows else {}
    lines = []
    if report.get("command"):
        lines += ["```", report["command"], "```", ""]
    lines += [
        f"- model: `{s['model']}` ({report['parameters']:,} parameters); rows computed on "
        f"{', '.join(sorted({str(r.get('device', report['device'])) for r in rows})) or report['device']}, "
        f"evaluation dtype {s['dtype'].replace('torch.', '')}",
        f"- calibration: `{s['calib']}`, {s['nsamples']} windows × {s['seqlen']} tokens, seed {s['seed']}",
        f"- perplexity: `{s['eval_text']}`, GPTQ protocol, context {s['context']}"
        + (f", {ppl_r.get('windows')} windows ({ppl_r.get('tokens'):,} tokens in the text)" if ppl_r else ""),
        f"- KL(fp ‖ compressed) and top-1 agreement: first {s['kl_windows']} windows of that text"
        if s["kl_windows"] else "- KL: not measured",
        (f"- zero-shot: {', '.join(s['tasks'])} — first {s['limit']} documents of each (acc; average over the tasks)"
         if s["limit"] else f"- zero-shot: {', '.join(s['tasks'])}, all documents") if s["tasks"] else
        "- zero-shot: not measured",
        "- bits/weight: storage of the compressed linears per original weight (packed GQSA format: codes, "
        "scales, zeros, indices; sparse fp16 baselines: values + index metadata); size: the whole model with "
        "everything else in fp16",
        "- front: ★ marks the rows on the Pareto front of perplexity against bits/weight",
        "",
        "| setting | stage | bits/weight | size (MB) | perplexity | × fp | KL | top-1 agree | zero-shot avg | front |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    front = pareto_front(rows)
    for r in rows:
        ppl = r["ppl"]["ppl"]
        fid = r.get("fidelity", {})
        z = r.get("zeroshot", {})
        lines.append(
            f"| {r['label']} | {r.get('stage') or '–'} | {_fmt(r.get('bits_per_weight'), '.2f')} | "
            f"{_fmt(r['model_bytes'] / 1e6 if r.get('model_bytes') else None, '.1f')} | {ppl:.2f} | "
            f"{_fmt(ppl / ref_ppl if ref_ppl else None, '.3f')} | {_fmt(fid.get('kl'), '.4f')} | "
            f"{_fmt(fid.get('top1_agreement'), '.3f')} | {_fmt(z.get('avg_acc'), '.3f')} | "
            f"{'★' if r['name'] in front else ''} |")
    tasks = list(next((r["zeroshot"]["tasks"] for r in rows if r.get("zeroshot")), {}))
    if tasks:
        lines += ["", "Zero-shot accuracy per task (acc; LAMBADA: last-word accuracy and its perplexity):", "",
                  "| setting | " + " | ".join(tasks) + " | lambada ppl |",
                  "|---|" + "---:|" * (len(tasks) + 1)]
        for r in rows:
            t = r.get("zeroshot", {}).get("tasks", {})
            lam = t.get("lambada_openai", {}).get("ppl")
            lines.append(f"| {r['label']} | " + " | ".join(_fmt(t.get(k, {}).get("acc"), ".3f") for k in tasks)
                         + f" | {_fmt(lam, '.1f')} |")
    lines += ["", *headline(rows)]
    return "\n".join(lines) + "\n"


def headline(rows: list[dict]) -> list[str]:
    """Every GQSA W4 S50% G16 row (one-shot and trained) against 2:4 pruning and 2/3-bit GPTQ, in words."""
    ours = [r for r in rows if r["name"].startswith("gqsa-w4s50g16")]
    others = [r for r in rows if r["name"] in ("sparsegpt-2of4", "wanda-2of4", "magnitude-2of4",
                                                "sparsegpt-2of4-w4g128", "sparsegpt-4of8-w4g128")
              or r["name"].startswith(("gptq-w2", "gptq-w3"))]
    out = []
    for g in ours:
        out += [f"{g['label']} ({g['bits_per_weight']:.2f} bits/weight, perplexity {g['ppl']['ppl']:.2f}) vs:"]
        for r in others:
            better = g["ppl"]["ppl"] < r["ppl"]["ppl"]
            out.append(f"- {r['label']} ({r['bits_per_weight']:.2f} bits/weight, perplexity {r['ppl']['ppl']:.2f}): "
                       f"GQSA is {'better' if better else 'WORSE'}")
        out.append("")
    return out


def pareto_front(rows: list[dict]) -> set[str]:
    """Names of the rows no other row dominates (as small or smaller bits/weight and lower perplexity,
    or smaller bits/weight and the same perplexity)."""
    pts = [(r["name"], r.get("bits_per_weight"), r["ppl"]["ppl"]) for r in rows if r.get("bits_per_weight") is not None]
    return {n for n, b, p in pts
            if not any((b2 <= b and p2 < p) or (b2 < b and p2 <= p) for _, b2, p2 in pts)}


def plot(report: dict, path) -> bool:
    """Perplexity (log scale) against bits per weight; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    styles = {"reference": ("k", "*"), "gqsa": ("tab:blue", "o"), "pruning": ("tab:red", "s"),
              "quantization": ("tab:green", "^"), "pruning+quantization": ("tab:purple", "v")}
    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=100)
    seen, placed = set(), []
    for r in report["rows"]:
        if r.get("bits_per_weight") is None:
            continue
        family = r["family"]
        color, marker = styles.get(family, ("tab:gray", "x"))
        if family == "gqsa" and r.get("stage") not in (None, "oneshot"):
            family, marker = "gqsa (trained stages)", "D"
        label = family if family not in seen else None
        seen.add(family)
        x, y = r["bits_per_weight"], r["ppl"]["ppl"]
        ax.scatter(x, y, c=color, marker=marker, s=40, label=label, zorder=3)
        # points that nearly coincide get their labels stacked downwards
        clash = sum(1 for px, py in placed if abs(px - x) < 0.5 and abs(math.log(py / y)) < 0.08)
        placed.append((x, y))
        ax.annotate(r["label"].replace(" (uncompressed)", ""), (x, y), fontsize=7, xytext=(4, 3 - 9 * clash),
                    textcoords="offset points")
    # one line per family (by bits/weight), the Pareto front as a dashed line through ringed points
    lines: dict[tuple, list] = {}
    for r in report["rows"]:
        if r.get("bits_per_weight") is not None and r["family"] != "reference":
            trained = r["family"] == "gqsa" and r.get("stage") not in (None, "oneshot")
            lines.setdefault((r["family"], trained), []).append((r["bits_per_weight"], r["ppl"]["ppl"]))
    for (family, _), pts in lines.items():
        if len(pts) > 1:
            pts.sort()
            ax.plot(*zip(*pts), color=styles.get(family, ("tab:gray", "x"))[0], lw=0.8, alpha=0.6, zorder=2)
    front = pareto_front(report["rows"])
    fpts = sorted((r["bits_per_weight"], r["ppl"]["ppl"]) for r in report["rows"] if r["name"] in front)
    if fpts:
        ax.plot(*zip(*fpts), color="k", lw=1.0, ls=":", zorder=2, label="Pareto front")
        ax.scatter(*zip(*fpts), s=120, facecolors="none", edgecolors="k", lw=0.8, zorder=4)
    ref = next((r for r in report["rows"] if r["family"] == "reference"), None)
    if ref:
        ax.axhline(ref["ppl"]["ppl"], color="k", lw=0.6, ls="--", zorder=1)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (compressed linears)")
    s = report["settings"]
    ax.set_ylabel(f"perplexity ({Path(s['eval_text']).name}, ctx {s['context']})")
    ax.set_title(Path(s["model"]).name, fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
