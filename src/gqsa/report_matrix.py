"""``gqsa report``'s matrix runner: GQSA and the baselines compressed and evaluated side by side on one model.

Every row of the matrix is a setting of ``gqsa compress`` (``--method gqsa|rtn|gptq|wanda|
sparsegpt|magnitude`` and its settings: the arguments, and the same as keyword ``options`` of
:func:`gqsa.workflow.compress_to_folder`), compressed into ``OUT/checkpoints/NAME`` by that function
(the one ``gqsa compress`` calls), then loaded back from the folder and evaluated: perplexity (GPTQ protocol),
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

Training stages: GQSA rows without ``--stages`` get ``--stages <gqsa_stage>`` (default ``oneshot``).
The command line's further GQSA arguments and extra ``NAME=ARGS`` rows are parsed by the face,
:mod:`gqsa.commands.report`. The tables and the plot: :mod:`gqsa.report_tables`.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .modules import default_device
from .report_tables import headline, markdown, pareto_front, plot  # noqa: F401  (re-exported)

REFERENCE = "fp16"


@dataclass
class Row:
    name: str                               # file-safe id, e.g. gqsa-w4s50g16
    label: str                              # table label, e.g. "GQSA W4 S50% G16"
    args: list[str] = field(default_factory=list)  # gqsa compress arguments; [] = the uncompressed model
    family: str = "gqsa"                    # reference | gqsa | pruning | quantization
    options: dict | None = None             # the same as keyword arguments of gqsa.workflow.compress_to_folder

    @property
    def is_reference(self) -> bool:
        return not self.args


def default_rows() -> list[Row]:
    """fp16; GQSA W4 S30/S50/S70 at G16 and G32, and W4 S30 G64 with ``--mask rerank4`` (the most accurate sparse
    setting at ≈ 3.2 bits/weight on both local models, benchmarks/quality.md "Session 9"); SparseGPT, Wanda and
    magnitude 2:4; SparseGPT 4:8;
    SparseGPT 2:4 and 4:8 with int4 values (g128); GQSA W3 S0 G128; GPTQ W2/W3/W4 g128; RTN W4 g128
    (magnitude 2:4 and GPTQ W4 are the sanity checks every correct implementation passes)."""
    rows = [Row(REFERENCE, "fp16 (uncompressed)", [], "reference", {})]
    for g in (16, 32):
        for s in (30, 50, 70):
            rows.append(Row(f"gqsa-w4s{s}g{g}", f"GQSA W4 S{s}% G{g}",
                            ["--method", "gqsa", "--bits", "4", "--group-size", str(g), "--sparsity", f"{s / 100:g}"],
                            "gqsa", {"method": "gqsa", "bits": 4, "group_size": g, "sparsity": s / 100}))
    rows.append(Row("gqsa-w4s30g64-rerank4", "GQSA W4 S30% G64 mask rerank4",
                    ["--method", "gqsa", "--bits", "4", "--group-size", "64", "--sparsity", "0.3", "--mask", "rerank4"],
                    "gqsa", {"method": "gqsa", "bits": 4, "group_size": 64, "sparsity": 0.3, "mask": "rerank4"}))
    for m in ("sparsegpt", "wanda", "magnitude"):
        rows.append(Row(f"{m}-2of4", f"{_TITLE[m]} 2:4", ["--method", m, "--pattern", "2:4"], "pruning",
                        {"method": m, "pattern": "2:4"}))
    rows.append(Row("sparsegpt-4of8", "SparseGPT 4:8", ["--method", "sparsegpt", "--pattern", "4:8"], "pruning",
                    {"method": "sparsegpt", "pattern": "4:8"}))
    # the equal-size competitors of W4 S50: n:m pruning with int4 values (Sparse-Marlin's 2:4 + int4 format)
    for nm in ("2:4", "4:8"):
        rows.append(Row(f"sparsegpt-{nm.replace(':', 'of')}-w4g128", f"SparseGPT {nm} + W4 g128",
                        ["--method", "sparsegpt", "--pattern", nm, "--prune-bits", "4", "--group-size", "128"],
                        "pruning+quantization", {"method": "sparsegpt", "pattern": nm, "prune_bits": 4, "group_size": 128}))
    rows.append(Row("gqsa-w3s0g128", "GQSA W3 S0% G128",
                    ["--method", "gqsa", "--bits", "3", "--group-size", "128", "--sparsity", "0"], "gqsa",
                    {"method": "gqsa", "bits": 3, "group_size": 128, "sparsity": 0.0}))
    for b in (2, 3, 4):
        rows.append(Row(f"gptq-w{b}g128", f"GPTQ W{b} g128",
                        ["--method", "gptq", "--bits", str(b), "--group-size", "128"], "quantization",
                        {"method": "gptq", "bits": b, "group_size": 128}))
    rows.append(Row("rtn-w4g128", "RTN W4 g128", ["--method", "rtn", "--bits", "4", "--group-size", "128"],
                    "quantization", {"method": "rtn", "bits": 4, "group_size": 128}))
    return rows


_TITLE = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "Magnitude", "gptq": "GPTQ", "rtn": "RTN",
          "gqsa": "GQSA"}


def family_of(args: list[str]) -> str:
    """The family of a row from its ``gqsa compress`` arguments: the method decides."""
    method = args[args.index("--method") + 1] if "--method" in args[:-1] else "gqsa"
    family = {"gqsa": "gqsa", "rtn": "quantization", "gptq": "quantization"}.get(method, "pruning")
    if family == "pruning" and "--prune-bits" in args:
        family = "pruning+quantization"
    return family


def _compress_defaults() -> dict:
    from .workflow import compress_to_folder

    return {k: p.default for k, p in inspect.signature(compress_to_folder).parameters.items()
            if p.default is not inspect.Parameter.empty}


def label(options: dict) -> str:
    """A table label from the options a row gives (keyword arguments of
    :func:`gqsa.workflow.compress_to_folder`; the others take its defaults)."""
    defaults = _compress_defaults()
    a = SimpleNamespace(**{**defaults, **options})
    if a.method == "gqsa":
        text = (f"GQSA W{a.bits} {a.target_bits:g} bits/w G{a.group_size}" if a.target_bits
                else f"GQSA W{a.bits} S{a.sparsity * 100:g}% G{a.group_size}")
        for opt in ("saliency", "allocation", "mask", "quant_init", "nsamples", "preset"):
            if getattr(a, opt) != defaults[opt]:
                text += f" {opt.replace('_', '-')} {getattr(a, opt)}"
        if "stages" in options:
            text += f" [{a.stages}]"
        return text
    if a.method in ("rtn", "gptq"):
        return f"{_TITLE[a.method]} W{a.bits} g{a.group_size}" + (" act-order" if a.act_order else "")
    quant = f" + W{a.prune_bits} g{a.group_size}" if a.prune_bits else ""
    if a.pattern == "unstructured":
        return f"{_TITLE[a.method]} unstructured {a.sparsity * 100:g}%{quant}"
    return f"{_TITLE[a.method]} {a.pattern}{quant}"


def with_stage(row: Row, stage: str = "oneshot") -> Row:
    """A GQSA row without ``--stages`` gets ``stage`` (its arguments and options); other rows are unchanged."""
    if row.family != "gqsa" or "--stages" in row.args:
        return row
    options = None if row.options is None else {**row.options, "stages": stage}
    return Row(row.name, row.label, [*row.args, "--stages", stage], row.family, options)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


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


def _compress(row: Row, model: str, tokenizer, calib: str, out: Path, common: dict, device) -> None:
    from .workflow import compress_to_folder

    if row.options is None:
        raise ValueError(f"row {row.name}: not gqsa compress arguments: {shlex.join(row.args)}")
    kw = {"nsamples": common["nsamples"], "seqlen": common["seqlen"], "seed": common["seed"],
          "batch_size": common["calib_batch_size"]}
    if tokenizer:
        kw["tokenizer"] = str(tokenizer)
    if device is not None:
        kw["device"] = str(device)
    compress_to_folder(model, str(out), **{"calib": calib, "overwrite": True, **kw, **row.options})


def _load(folder: Path, device, dtype):
    from .models.loader import load_any

    return load_any(folder, dtype=dtype, device=device)[0]


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
               gqsa_stage: str = "oneshot", keep_checkpoints: bool = False,
               command: str | None = None, progress: bool = True, log=print) -> dict:
    """Run (or resume) the matrix and write ``report.md``/``report.json``/``report.png`` under ``out``;
    returns the report dict. GQSA rows without ``--stages`` get ``gqsa_stage``."""
    from . import report as report_mod
    from .eval.ppl import model_context
    from .eval.zeroshot import DEFAULT_TASKS
    from .models import load_model

    out = Path(out)
    rows = rows if rows is not None else default_rows()
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique: {names}")
    dev = default_device(device)  # before anything is written
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
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
        row = with_stage(row, gqsa_stage)
        argv = row.args
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
                _compress(row, model, tokenizer, calib, ckpt, settings, device)
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


def to_dict(row: Row) -> dict:
    return asdict(row)
