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
