"""``gqsa report``: GQSA and the baselines side by side on one model.

Every row of the matrix is a ``gqsa compress`` command line (``--method gqsa|rtn|gptq|wanda|
sparsegpt|magnitude`` and its settings), run in-process into ``OUT/checkpoints/NAME`` through the
same code a user runs, then loaded back from the folder and evaluated: perplexity (GPTQ protocol),
zero-shot average accuracy (local task files, ``limit`` documents per task), fidelity to the
uncompressed model (KL, top-1 agreement) on the first ``kl_windows`` windows of the perplexity text,
bits per weight of the compressed linears and the model's size (compressed linears as stored,
everything else in fp16). The uncompressed model is the first row.

Each finished row is saved as ``OUT/rows/NAME.json`` together with a fingerprint of everything that
determines it (model, data, evaluation settings, the row's arguments); a rerun skips the rows whose
fingerprint matches, so an interrupted report resumes where it stopped, and changing a row's
arguments (e.g. the GQSA training stages) recomputes only that row. A compressed folder whose
evaluation was interrupted is reused too. At the end ``OUT/report.md``, ``OUT/report.json`` and
(when matplotlib is installed) ``OUT/report.png`` — perplexity against bits per weight — are written.

Training stages: GQSA rows carry ``--stages <stage>`` when ``gqsa compress`` has that option
(default ``oneshot``; ``gqsa_stage``), and ``gqsa_args`` appends any further ``gqsa compress``
arguments to every GQSA row; ``extra rows`` are any ``NAME=ARGS``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REFERENCE = "fp16"


@dataclass
class Row:
    name: str                               # file-safe id, e.g. gqsa-w4s50g16
    label: str                              # table label, e.g. "GQSA W4 S50% G16"
    args: list[str] = field(default_factory=list)  # gqsa compress arguments; [] = the uncompressed model
    family: str = "gqsa"                    # reference | gqsa | pruning | quantization

    @property
    def is_reference(self) -> bool:
        return not self.args


def default_rows() -> list[Row]:
    """fp16; GQSA W4 S30/S50/S70 at G16 and G32; SparseGPT, Wanda and magnitude 2:4; SparseGPT 4:8;
    SparseGPT 2:4 and 4:8 with int4 values (g128); GQSA W3 S0 G128; GPTQ W2/W3/W4 g128; RTN W4 g128
    (magnitude 2:4 and GPTQ W4 are the sanity checks every correct implementation passes)."""
    rows = [Row(REFERENCE, "fp16 (uncompressed)", [], "reference")]
    for g in (16, 32):
        for s in (30, 50, 70):
            rows.append(Row(f"gqsa-w4s{s}g{g}", f"GQSA W4 S{s}% G{g}",
                            ["--method", "gqsa", "--bits", "4", "--group-size", str(g), "--sparsity", f"{s / 100:g}"],
                            "gqsa"))
    for m in ("sparsegpt", "wanda", "magnitude"):
        rows.append(Row(f"{m}-2of4", f"{_TITLE[m]} 2:4", ["--method", m, "--pattern", "2:4"], "pruning"))
    rows.append(Row("sparsegpt-4of8", "SparseGPT 4:8", ["--method", "sparsegpt", "--pattern", "4:8"], "pruning"))
    # the equal-size competitors of W4 S50: n:m pruning with int4 values (Sparse-Marlin's 2:4 + int4 format)
    for nm in ("2:4", "4:8"):
        rows.append(Row(f"sparsegpt-{nm.replace(':', 'of')}-w4g128", f"SparseGPT {nm} + W4 g128",
                        ["--method", "sparsegpt", "--pattern", nm, "--prune-bits", "4", "--group-size", "128"],
                        "pruning+quantization"))
    rows.append(Row("gqsa-w3s0g128", "GQSA W3 S0% G128",
                    ["--method", "gqsa", "--bits", "3", "--group-size", "128", "--sparsity", "0"], "gqsa"))
    for b in (2, 3, 4):
        rows.append(Row(f"gptq-w{b}g128", f"GPTQ W{b} g128",
                        ["--method", "gptq", "--bits", str(b), "--group-size", "128"], "quantization"))
    rows.append(Row("rtn-w4g128", "RTN W4 g128", ["--method", "rtn", "--bits", "4", "--group-size", "128"],
                    "quantization"))
    return rows


_TITLE = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "Magnitude", "gptq": "GPTQ", "rtn": "RTN",
          "gqsa": "GQSA"}


def parse_row(spec: str) -> Row:
    """``NAME=ARGS`` (ARGS: ``gqsa compress`` arguments) → a :class:`Row`; the method decides the family."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise ValueError(f"row '{spec}' is not NAME=ARGS (e.g. 'gqsa-w4s50g16-bqpo=--method gqsa --stages bqpo')")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"row name '{name}' may hold only letters, digits, '-', '_' and '.'")
    args = shlex.split(rest)
    method = args[args.index("--method") + 1] if "--method" in args[:-1] else "gqsa"
    family = {"gqsa": "gqsa", "rtn": "quantization", "gptq": "quantization"}.get(method, "pruning")
    if family == "pruning" and "--prune-bits" in args:
        family = "pruning+quantization"
    return Row(name, auto_label(args) or name, args, family)


def auto_label(args: list[str]) -> str | None:
    """A table label from ``gqsa compress`` arguments (None when they do not parse)."""
    from .cli import build_parser

    try:
        a = build_parser().parse_args(["compress", "MODEL", "--calib", "C", "--out", "O", *args])
    except SystemExit:
        return None
    defaults = build_parser().parse_args(["compress", "MODEL", "--calib", "C", "--out", "O"])
    if a.method == "gqsa":
        label = (f"GQSA W{a.bits} {a.target_bits:g} bits/w G{a.group_size}" if getattr(a, "target_bits", None)
                 else f"GQSA W{a.bits} S{a.sparsity * 100:g}% G{a.group_size}")
        for opt in ("stages", "saliency", "allocation", "mask", "quant_init", "nsamples", "preset"):
            if getattr(a, opt, None) != getattr(defaults, opt, None) and opt != "stages":
                label += f" {opt.replace('_', '-')} {getattr(a, opt)}"
        if "--stages" in args:
            label += f" [{a.stages}]"
        return label
    if a.method in ("rtn", "gptq"):
        return f"{_TITLE[a.method]} W{a.bits} g{a.group_size}" + (" act-order" if a.act_order else "")
    quant = f" + W{a.prune_bits} g{a.group_size}" if getattr(a, "prune_bits", None) else ""
    if a.pattern == "unstructured":
        return f"{_TITLE[a.method]} unstructured {a.sparsity * 100:g}%{quant}"
    return f"{_TITLE[a.method]} {a.pattern}{quant}"


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _compress_options() -> set[str]:
    from .cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices["compress"]._option_string_actions)


def row_args(row: Row, gqsa_stage: str = "oneshot", gqsa_args: list[str] | None = None) -> list[str]:
    """The row's ``gqsa compress`` arguments with the GQSA stage settings applied."""
    args = list(row.args)
    if row.family != "gqsa":
        return args
    if "--stages" not in args:
        if "--stages" in _compress_options():
            args += ["--stages", gqsa_stage]
        elif gqsa_stage != "oneshot":
            raise ValueError(f"this gqsa has no training stages yet (gqsa compress has no --stages): "
                             f"cannot run GQSA rows with stage '{gqsa_stage}'")
    return args + list(gqsa_args or [])


def _model_size(model) -> tuple[int, int]:
    """(parameters, bytes in fp16) of an uncompressed model (tied tensors once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n, 2 * n


def _sizes_from_report(rep: dict) -> dict:
    t = rep.get("totals", {})
    if "model_bytes" in t:
        model_bytes = t["model_bytes"]
    else:  # GQSA's own report: packed linears + every other parameter in fp16
        model_bytes = t.get("packed_bytes", 0) + 2 * t.get("dense_params_uncompressed", 0)
    return {"bits_per_weight": t.get("bits_per_weight"), "model_bytes": model_bytes, "sparsity": t.get("sparsity"),
            "compressed_weights": t.get("compressed_weights")}


def _compress(row_argv: list[str], model: str, tokenizer, calib: str, out: Path, common: dict, device) -> None:
    from .cli import build_parser

    argv = ["compress", model, "--calib", calib, "--out", str(out), "--overwrite",
            "--nsamples", str(common["nsamples"]), "--seqlen", str(common["seqlen"]), "--seed", str(common["seed"]),
            "--batch-size", str(common["calib_batch_size"])]
    if tokenizer:
        argv += ["--tokenizer", str(tokenizer)]
    if device is not None:
        argv += ["--device", str(device)]
    args = build_parser().parse_args(argv + row_argv)
    rc = args.func(args)
    if rc:
        raise RuntimeError(f"gqsa compress {' '.join(row_argv)} exited with status {rc}")


def _load(folder: Path, device, dtype):
    from . import checkpoint
    from .cli import _is_gqsa_folder
    from .models import load_model

    if _is_gqsa_folder(folder):
        model, _ = checkpoint.load(folder, device=device, dtype=dtype)
    else:
        model, _ = load_model(folder, dtype=dtype, device=device)
    return model


def _evaluate(model, reference, tok, settings: dict, is_reference: bool, log) -> dict:
    from .eval.fidelity import evaluate_fidelity
    from .eval.ppl import perplexity
    from .eval.zeroshot import evaluate_zeroshot

    out = {}
    t0 = time.time()
    r = perplexity(model, tok, settings["eval_text"], context=settings["context"],
                   batch_size=settings["eval_batch_size"], max_windows=settings["max_windows"],
                   progress=settings["progress"])
    out["ppl"] = r
    log(f"  perplexity {r['ppl']:.3f} ({r['windows']} windows of {r['context']}, {r['seconds']:.0f} s)")
    if settings["tasks"]:
        z = evaluate_zeroshot(model, tok, settings["tasks"], tasks_dir=settings["tasks_dir"], limit=settings["limit"],
                     batch_size=settings["zeroshot_batch_size"], progress=settings["progress"])
        out["zeroshot"] = z
        log(f"  zero-shot avg acc {z['avg_acc']:.4f} (" +
            ", ".join(f"{k} {v['acc']:.3f}" for k, v in z["tasks"].items()) + ")")
    if settings["kl_windows"]:
        if is_reference:
            out["fidelity"] = {"kl": 0.0, "top1_agreement": 1.0}
        else:
            f = evaluate_fidelity(model, reference, tok, settings["eval_text"], context=settings["context"],
                         batch_size=settings["eval_batch_size"], max_windows=settings["kl_windows"],
                         progress=settings["progress"])
            out["fidelity"] = f
            log(f"  KL {f['kl']:.5f} nats/token, top-1 agreement {f['top1_agreement']:.4f} ({f['windows']} windows)")
    out["eval_seconds"] = round(time.time() - t0, 1)
    return out


def run_report(model: str, calib: str, eval_text: str, out, *, tokenizer: str | None = None,
               rows: list[Row] | None = None, context: int | None = None, nsamples: int = 128,
               seqlen: int | None = None, seed: int = 0, calib_batch_size: int = 8, eval_batch_size: int = 4,
               tasks=None, tasks_dir=None, limit: int | None = 100, kl_windows: int = 32,
               max_windows: int | None = None, device=None, dtype: torch.dtype = torch.float32,
               gqsa_stage: str = "oneshot", gqsa_args: list[str] | None = None, keep_checkpoints: bool = False,
               command: str | None = None, progress: bool = True, log=print) -> dict:
    """Run (or resume) the matrix and write ``report.md``/``report.json``/``report.png`` under ``out``;
    returns the report dict."""
    from . import report as report_mod
    from .eval.ppl import model_context
    from .eval.zeroshot import DEFAULT_TASKS
    from .models import load_model

    out = Path(out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    rows = rows if rows is not None else default_rows()
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique: {names}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference, tok = load_model(model, tokenizer, dtype=dtype, device=dev)
    context = context or model_context(reference)
    settings = {
        "model": str(model), "tokenizer": str(tokenizer) if tokenizer else None, "calib": str(calib),
        "nsamples": nsamples, "seqlen": seqlen or context, "seed": seed, "calib_batch_size": calib_batch_size,
        "eval_text": str(eval_text), "context": context, "max_windows": max_windows,
        "tasks": list(DEFAULT_TASKS if tasks is None else tasks), "tasks_dir": str(tasks_dir) if tasks_dir else None,
        "limit": limit, "kl_windows": kl_windows, "dtype": str(dtype),
    }
    run_settings = dict(settings, eval_batch_size=eval_batch_size, zeroshot_batch_size=16, progress=progress)
    n_params, fp16_bytes = _model_size(reference)
    results = []
    environment = report_mod.environment()

    def render(done_rows):
        report = {"settings": settings, "command": command, "parameters": n_params, "device": str(dev),
                  "environment": environment, "rows": done_rows}
        _write_json(out / "report.json", report)
        (out / "report.md").write_text(markdown(report))
        report["plotted"] = plot(report, out / "report.png")
        return report

    for row in rows:
        argv = row_args(row, gqsa_stage, gqsa_args)
        fp = _fingerprint({"settings": settings, "args": argv})
        state = out / "rows" / f"{row.name}.json"
        if state.is_file():
            try:
                done = json.loads(state.read_text())
            except ValueError:
                done = {}
            if done.get("fingerprint") == fp:
                log(f"[{row.name}] done before, kept ({state})")
                done.update(label=row.label, family=row.family)  # presentation only
                results.append(done)
                continue
        log(f"[{row.name}] {row.label}: gqsa compress {shlex.join(argv) if argv else '(none: uncompressed)'}")
        t0 = time.time()
        res = {"name": row.name, "label": row.label, "family": row.family, "args": argv, "fingerprint": fp}
        if row.is_reference:
            model_obj = reference
            res.update(method="none", stage=None, setting="uncompressed", bits_per_weight=16.0,
                       model_bytes=fp16_bytes, sparsity=0.0, compress_seconds=0.0)
        else:
            ckpt = out / "checkpoints" / row.name
            marker = out / "checkpoints" / f"{row.name}.done.json"
            reuse = ckpt.is_dir() and marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fp
            if reuse:
                log(f"  reusing the compressed folder {ckpt}")
            else:
                marker.unlink(missing_ok=True)
                _compress(argv, model, tokenizer, calib, ckpt, settings, device)
                _write_json(marker, {"fingerprint": fp, "args": argv})
            rep = json.loads((ckpt / "gqsa_report.json").read_text())
            res.update(method=rep.get("method"), stage=rep.get("stage") or rep.get("config", {}).get("stages"),
                       setting=rep.get("setting"), compress_seconds=rep.get("seconds"),
                       compress_config=rep.get("config"), **_sizes_from_report(rep))
            model_obj = _load(ckpt, dev, dtype)
        res.update(_evaluate(model_obj, reference, tok, run_settings, row.is_reference, log))
        res["seconds"] = round(time.time() - t0, 1)
        res["device"] = str(dev)
        res["environment"] = environment
        _write_json(state, res)
        if not row.is_reference:
            del model_obj
            if not keep_checkpoints:
                shutil.rmtree(out / "checkpoints" / row.name, ignore_errors=True)
                (out / "checkpoints" / f"{row.name}.done.json").unlink(missing_ok=True)
        results.append(res)
        render(results)  # an interrupted run still leaves the table of the rows finished so far
    report = render(results)
    log(f"wrote {out / 'report.md'}" + (f" and {out / 'report.png'}" if report["plotted"] else
                                          " (no plot: matplotlib is not installed)"))
    return report


# ----------------------------------------------------------------------------- rendering


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


def rows_from_cli(only: list[str] | None, extra: list[str] | None) -> list[Row]:
    rows = default_rows()
    if only:
        known = {r.name: r for r in rows}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"unknown row(s) {', '.join(unknown)}; default rows: {', '.join(known)}")
        rows = [known[n] for n in only]
    rows += [parse_row(spec) for spec in extra or []]
    return rows


def to_dict(row: Row) -> dict:
    return asdict(row)
