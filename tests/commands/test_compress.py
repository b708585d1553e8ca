"""`gqsa compress`'s face: its arguments are exactly the keyword arguments of the library call."""
from __future__ import annotations

import inspect

import pytest

from gqsa import cli
from gqsa.commands import compress
from gqsa.workflow import compress_to_folder


def test_every_option_is_a_keyword_of_compress_to_folder_with_the_same_default():
    args = cli.build_parser().parse_args(["compress", "m", "--calib", "c", "--out", "o"])
    options = compress.options(args)
    params = inspect.signature(compress_to_folder).parameters
    for name, value in options.items():
        if name in params:
            default = params[name].default
            assert (list(default) if isinstance(default, tuple) else default) == value or name == "calib", name
        else:  # the preset-dependent stage options: None unless given
            assert value is None and name in compress_to_folder.__globals__["STAGE_OPTIONS"], name
    assert params["grad_checkpointing"].default is True and options["grad_checkpointing"] is True


def test_given_options_are_only_those_on_the_command_line():
    assert compress.given_options(["--bits", "3", "--no-grad-checkpointing"]) == {"bits": 3,
                                                                                 "grad_checkpointing": False}
    assert compress.given_options(["--stages", "bqpo+e2e"]) == {"stages": "bqpo+e2e"}  # given, though the default
    assert compress.given_options([]) == {}
    with pytest.raises(ValueError, match=r"^not gqsa compress arguments \(argument --bits: invalid choice: 5 "
                                         r"\(choose from 2, 3, 4, 8\)\): --bits 5$"):
        compress.given_options(["--bits", "5"])


def test_a_calibration_text_in_the_arguments_is_given():
    assert compress.given_options(["--calib", "other.txt"]) == {"calib": "other.txt"}


@pytest.mark.parametrize("stages, method, held_out", [("bqpo+e2e", "gqsa", 0.2), ("bqpo", "gqsa", 0.2),
                                                      ("oneshot", "gqsa", 0.0), ("bqpo+e2e", "gptq", 0.0)])
def test_trained_runs_draw_their_held_out_windows_apart(stories260k, asset, tmp_path, monkeypatch, stages, method,
                                                        held_out):
    """The trained stages' held-out windows come from the text's tail (calib.calibration_tokens' val_fraction);
    one-shot and the baselines hold nothing out, and sample the whole text as before."""
    from gqsa import calib

    seen = []

    def record(*args, val_fraction=0.0, **kwargs):
        seen.append(val_fraction)
        raise KeyboardInterrupt  # enough: nothing to compress

    monkeypatch.setattr(calib, "calibration_tokens", record)
    model, tok = stories260k
    with pytest.raises(KeyboardInterrupt):
        compress_to_folder(str(model), tmp_path / "out", calib=str(asset("data/wikitext2/wiki.valid.tokens")),
                           tokenizer=str(tok), stages=stages, method=method, bits=3, val_fraction=0.2, device="cpu")
    assert seen == [held_out]
