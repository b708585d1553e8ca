"""`gqsa report`'s face: rows given as `gqsa compress` arguments, their labels, stage and extra arguments."""
from __future__ import annotations

import pytest

from gqsa import cli
from gqsa import report_matrix as rm
from gqsa.commands import compress, report


def test_default_rows_as_command_line_arguments():
    rows = {r.name: r for r in rm.default_rows()}
    assert report.auto_label(rows["sparsegpt-2of4-w4g128"].args) == rows["sparsegpt-2of4-w4g128"].label
    # every row's arguments parse as a `gqsa compress` command line
    parser = cli.build_parser()
    for r in rows.values():
        if not r.is_reference:
            parser.parse_args(["compress", "m", "--calib", "c", "--out", "o", *report.row_args(r).args])
            # the row's keyword options are what its arguments give (the stage applied to GQSA rows)
            assert report.row_args(r).options == compress.given_options(report.row_args(r).args)


def test_gqsa_rows_get_the_stage_and_extra_arguments():
    row = rm.default_rows()[1]
    staged = report.row_args(row, "oneshot", ["--quant-init", "minmax"])
    assert staged.args[-4:] == ["--stages", "oneshot", "--quant-init", "minmax"]
    assert staged.options["stages"] == "oneshot" and staged.options["quant_init"] == "minmax"
    base = next(r for r in rm.default_rows() if r.name == "gptq-w2g128")
    assert report.row_args(base, "bqpo", ["--x"]).args == base.args  # baselines are never touched


def test_parse_row():
    r = report.parse_row("w4-bqpo=--method gqsa --sparsity 0.5 --stages bqpo")
    assert (r.name, r.family, r.args[-1]) == ("w4-bqpo", "gqsa", "bqpo")
    assert report.parse_row("m=--method magnitude --pattern 4:8").family == "pruning"
    assert report.parse_row("q=--method sparsegpt --prune-bits 4 --group-size 128").family == "pruning+quantization"
    assert report.parse_row("t=--target-bits 3.3 --mask iter2").label == "GQSA W4 3.3 bits/w G16 mask iter2"
    assert r.label == "GQSA W4 S50% G16 [bqpo]"
    assert report.parse_row("u=--method sparsegpt --pattern unstructured --sparsity 0.6").label == "SparseGPT unstructured 60%"
    assert report.parse_row("x=--method gptq --bits 3 --group-size 128 --act-order").label == "GPTQ W3 g128 act-order"
    for bad in ("noequals", "=--method gqsa", "a b=--bits 4"):
        with pytest.raises(ValueError):
            report.parse_row(bad)
    # refused when the rows are read, before any row runs, saying why (an unparsable row failed only when its turn
    # came; an --out in a row was ignored without a word)
    with pytest.raises(ValueError, match=r"^row x: not gqsa compress arguments \(argument --bits: invalid choice: 5"):
        report.parse_row("x=--bits 5")
    with pytest.raises(ValueError, match=r"^row y: --out is the report's to choose"):
        report.parse_row("y=--sparsity 0.3 --out elsewhere")
    with pytest.raises(ValueError, match=r"^--gqsa-args: --out is the report's to choose"):
        report.rows_from_cli(["gqsa-w4s50g16"], None, gqsa_args=["--out=elsewhere"])
    with pytest.raises(ValueError, match=r"^--gqsa-args, row gqsa-w4s50g16: not gqsa compress arguments \(argument "
                                         r"--mask: expected one argument\)"):
        report.rows_from_cli(["gqsa-w4s50g16"], None, gqsa_args=["--mask"])
