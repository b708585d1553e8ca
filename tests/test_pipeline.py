"""compress_model: the pipeline of stages around the one-shot step."""
import pytest
import torch
from torch import nn

import gqsa
from gqsa import GQSAConfig, GQSALinear
from gqsa.config import auto_batch_size
from gqsa.pipeline import compress_model, split_calibration


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is fastest on a busy machine


def tokens(n=10, t=32):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(1))


def test_split_calibration_holds_out_the_last_windows():
    x = torch.arange(20).reshape(10, 2)
    train, val = split_calibration(x, 0.1)
    assert train.shape[0] == 9 and torch.equal(val, x[9:])
    assert split_calibration(x, 0.25)[1].shape[0] == 3  # ceil
    assert split_calibration(x, 0.0)[1].shape[0] == 0
    with pytest.raises(ValueError, match="nsamples"):
        split_calibration(x[:1], 0.1)


def test_config_validation_names_the_setting():
    for bad, match in ((dict(stages="e2e"), "stages must be one of oneshot, bqpo, bqpo\\+e2e"),
                       (dict(bqpo_epochs=-1), "bqpo_epochs"), (dict(e2e_grad_accum=0), "e2e_grad_accum"),
                       (dict(bqpo_lr_weight=2.0), "bqpo_lr_weight"), (dict(val_fraction=1.0), "val_fraction"),
                       (dict(bqpo_target="x"), "bqpo_target"), (dict(bqpo_batch_size=0), "bqpo_batch_size"),
                       (dict(e2e_batch_size=2.5), "e2e_batch_size")):
        with pytest.raises(ValueError, match=match):
            GQSAConfig(**bad)
    with pytest.raises(ValueError, match="preset"):
        GQSAConfig.preset("slow")
    fast = GQSAConfig.preset("fast", e2e_epochs=7)
    assert fast.bqpo_epochs < GQSAConfig().bqpo_epochs and fast.e2e_epochs == 7
    assert GQSAConfig.from_dict(fast.to_dict()) == fast


def test_oneshot_ignores_the_work_folder(tiny_llama, tmp_path):
    compress_model(tiny_llama, GQSAConfig(stages="oneshot"), tokens(), "cpu", 4, False, workdir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_trained_stages_skip_layers_and_fill_stats(tiny_llama):
    before = tiny_llama.model.layers[0].mlp.down_proj.weight.detach().clone()
    stats = {}
    gqsa.compress(tiny_llama, GQSAConfig(skip=["mlp.down_proj"], bqpo_epochs=1, e2e_epochs=1), tokens(), "cpu", 4,
                  False, stats=stats)
    down = tiny_llama.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and torch.equal(down.weight, before)
    assert sum(isinstance(m, GQSALinear) for m in tiny_llama.modules()) == 2 * 6
    assert stats["calibration_split"] == {"train_windows": 9, "val_windows": 1}
    assert [s["block"] for s in stats["bqpo"]] == [0, 1] and stats["e2e"]["best_epoch"] in (0, 1)
    assert all(p.requires_grad for p in tiny_llama.parameters())


def test_training_batch_sizes_grow_with_the_calibration_windows():
    assert [auto_batch_size(n) for n in (1, 128, 512, 1023, 1024, 1535, 1536, 2048, 100_000)] == \
        [4, 4, 4, 4, 8, 8, 12, 16, 16]
    auto = GQSAConfig()
    assert auto.bqpo_batch_size is None and auto.e2e_batch_size is None  # chosen from the windows
    c = auto.for_windows(2048)
    assert (c.bqpo_batch_size, c.e2e_batch_size) == (16, 16) and auto.bqpo_batch_size is None
    given = GQSAConfig(bqpo_batch_size=6).for_windows(1024)
    assert (given.bqpo_batch_size, given.e2e_batch_size) == (6, 8)  # a given size is kept
    assert GQSAConfig.from_dict(c.to_dict()) == c and c.for_windows(10) == c


def test_the_stages_train_with_the_batch_size_of_the_windows(tiny_llama, monkeypatch, capsys):
    # 4 windows per 4-window step instead of 512, so that 10 windows make 8-window steps
    monkeypatch.setattr(gqsa.config, "BATCH_WINDOWS", 4)
    stats = {}
    compress_model(tiny_llama, GQSAConfig(bqpo_epochs=1, e2e_epochs=1, bqpo_patience=1), tokens(), "cpu", 4, True,
                   stats=stats)
    assert [s["steps"] for s in stats["bqpo"]] == [2, 2]  # 9 training windows in steps of 8 (of 4: 3 steps)
    assert stats["e2e"]["batch_size"] == 8
    out = capsys.readouterr()
    assert "up to 1 epochs of 8-window steps" in out.out + out.err


def test_self_calibration_samples_full_windows_from_the_model(tiny_llama, capsys):
    from gqsa import calib

    class Tok:
        bos_token_id, eos_token_id = 1, 2

    capsys.readouterr()
    a = calib.calibration_tokens("self", Tok(), nsamples=5, seqlen=12, seed=3, model=tiny_llama)
    # a progress bar over the decoding steps (one batch of 5 windows: 11 steps), with its time estimate
    assert "sampling calibration text: 100%" in capsys.readouterr().err.replace("\r", "\n")
    assert a.shape == (5, 12) and a.dtype == torch.long and (a[:, 0] == 1).all()
    assert 0 <= int(a.min()) and int(a.max()) < tiny_llama.config.vocab_size
    assert torch.equal(a, calib.self_tokens(tiny_llama, Tok(), 5, 12, seed=3, progress=False))  # seeded
    assert capsys.readouterr().err == ""
    assert not torch.equal(a, calib.self_tokens(tiny_llama, Tok(), 5, 12, seed=4))
    with pytest.raises(ValueError, match="pass model="):
        calib.calibration_tokens("self", Tok(), 5, 12)


def test_calibration_windows_that_need_more_tokens_than_the_text_warn():
    """Windows are drawn at random starts (GPTQ's sampling) and may overlap; when they need more tokens than the
    text has, one warning says by how much. Enough text: no warning."""
    import warnings

    from gqsa import calib

    ids = torch.arange(1000)
    with pytest.warns(UserWarning, match=r"calibration: 40 windows of 50 tokens need 2,000 tokens and the text has "
                                         r"1,000: the windows overlap \(each token used 2\.0×"):
        w = calib.sample_windows(ids, 40, 50)
    assert w.shape == (40, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calib.sample_windows(ids, 20, 50).shape == (20, 50)


def test_held_out_windows_come_from_text_no_training_window_covers():
    """With val_fraction the last ceil(n · val_fraction) windows (split_calibration's held-out ones) come from the
    text's last ceil(T · val_fraction) tokens and the training windows from the rest: no shared token position, even
    when the windows need more tokens than the text has (then a warning says which part overlaps itself)."""
    import warnings

    from gqsa import calib

    ids = torch.arange(1000)  # a token's value is its position
    w = calib.sample_windows(ids, 40, 20, seed=3, val_fraction=0.1)
    train, val = split_calibration(w, 0.1)
    assert train.shape == (36, 20) and val.shape == (4, 20)
    assert int(train.max()) < 900 <= int(val.min())  # the last 100 tokens hold the held-out windows, only they
    assert ((w[:, 1:] - w[:, :-1]) == 1).all()  # each window a contiguous piece of the text
    assert torch.equal(w, calib.sample_windows(ids, 40, 20, seed=3, val_fraction=0.1))  # seeded
    assert not torch.equal(w, calib.sample_windows(ids, 40, 20, seed=4, val_fraction=0.1))
    # windows drawn from the whole text (val_fraction 0: the sampling of before) do overlap their held-out split
    whole_train, whole_val = split_calibration(calib.sample_windows(ids, 40, 20, seed=3), 0.1)
    assert bool(torch.isin(whole_val, whole_train).any())
    # 3× more tokens than the text: both parts overlap themselves, never each other; one warning says so
    with pytest.warns(UserWarning, match=r"calibration: 135 training windows of 20 tokens need 2,700 tokens and the "
                                         r"first 900 tokens .* overlap \(each token used 3\.0× on average\); the 15 "
                                         r"held-out windows need 300 tokens and are drawn from the last 100: they "
                                         r"overlap one another \(3\.0×\); no held-out window overlaps a training"):
        w = calib.sample_windows(ids, 150, 20, val_fraction=0.1)
    train, val = split_calibration(w, 0.1)
    assert not bool(torch.isin(val, train).any()) and int(val.min()) >= 900
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calib.sample_windows(ids, 40, 20, val_fraction=0.1)  # enough text for both parts: no warning
    # the tail is at least one window and one token long, whatever the fraction
    w = calib.sample_windows(ids, 10, 50, val_fraction=0.01)
    assert int(w[:-1].max()) < 949 <= int(w[-1].min())


def test_a_text_too_short_to_split_says_what_to_do():
    from gqsa import calib

    with pytest.raises(ValueError, match=r"^the calibration text has 60 tokens, too few to hold out its last 0\.1 "
                                         r"for the held-out windows and train on the rest \(each part needs more "
                                         r"than seqlen=40 tokens, 82 in all\): use a longer text, a smaller --seqlen, "
                                         r"or --val-fraction 0$"):
        calib.sample_windows(torch.arange(60), 10, 40, val_fraction=0.1)
    with pytest.warns(UserWarning, match="the windows overlap"):  # without held-out windows it fits
        assert calib.sample_windows(torch.arange(60), 10, 40).shape == (10, 40)
    with pytest.raises(ValueError, match="1 calibration window.*use more --nsamples or val_fraction=0"):
        calib.sample_windows(torch.arange(600), 1, 40, val_fraction=0.1)
    assert calib.held_out_count(1, 0.0) == 0 and calib.held_out_count(10, 0.01) == 1
    assert calib.held_out_count(2048, 0.1) == 205


def test_calibration_from_a_file_holds_out_its_tail(tmp_path):
    from gqsa import calib

    class Words:  # one token per word, its value the word's position in the file
        def __call__(self, text, return_tensors, add_special_tokens):
            return type("Out", (), {"input_ids": torch.tensor([[int(x) for x in text.split()]])})()

    f = tmp_path / "c.txt"
    f.write_text(" ".join(map(str, range(500))))
    train, val = split_calibration(calib.calibration_tokens(str(f), Words(), 20, 10, 0, val_fraction=0.2), 0.2)
    assert int(train.max()) < 400 <= int(val.min()) and val.shape[0] == 4
    assert bool(torch.isin(*split_calibration(calib.calibration_tokens(str(f), Words(), 20, 10, 0), 0.2)[::-1]).any())


def test_a_run_says_its_plan_and_an_estimate_after_the_first_block(tiny_llama, capsys):
    compress_model(tiny_llama, GQSAConfig(stages="oneshot"), tokens(), "cpu", 4, progress=True)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "GQSA: 2 blocks × one-shot per block (no training); 10 calibration windows of 32 tokens; on cpu" in text
    assert "GQSA: first block took" in text and "for the other 1 blocks" in text


def test_the_plan_says_what_training_the_codes_costs_in_memory(tiny_llama):
    from gqsa.pipeline import _Plan, block_linears

    lines = []
    for lr_codes in (0.1, 0.0):
        _Plan(tiny_llama, GQSAConfig(e2e_lr_codes=lr_codes), tokens(), torch.device("cpu"), lines.append)
    kept = sum(lin.weight.numel() for _, lin in block_linears(tiny_llama)) // 2
    assert (f"then E2E-OQP: 5 epochs over the whole model distilled from the uncompressed model, codes trained "
            f"at 0.1 (about {kept * 16 / 1024:.1f} KiB of training state; --e2e-lr-codes 0 freezes them)") in lines[0]
    assert "codes " not in lines[1] and "distilled from the uncompressed model;" in lines[1]


def test_the_plan_and_stats_say_whether_the_codes_train_and_why(tiny_llama, monkeypatch, capsys):
    """e2e_lr_codes not given: frozen below config.CODES_MIN_STEPS E2E-OQP steps, trained at CODES_LR from there; the
    plan line and stats["e2e_codes"] say which and why."""
    import copy

    fresh = copy.deepcopy(tiny_llama)
    stats = {}
    compress_model(tiny_llama, GQSAConfig(bqpo_epochs=1, e2e_epochs=2), tokens(), "cpu", 4, True, stats=stats)
    out = capsys.readouterr()
    why = "auto: 6 E2E-OQP steps < 500, too few for the codes to gain"  # 9 training windows in steps of 4, 2 epochs
    assert stats["e2e_codes"] == {"lr": 0.0, "why": why}
    assert f"distilled from the uncompressed model, codes frozen ({why}); 10 calibration windows" in out.out + out.err
    monkeypatch.setattr(gqsa.config, "CODES_MIN_STEPS", 6)
    stats = {}
    compress_model(fresh, GQSAConfig(bqpo_epochs=1, e2e_epochs=2), tokens(), "cpu", 4, True, stats=stats)
    out = capsys.readouterr()
    assert stats["e2e_codes"] == {"lr": 0.1, "why": "auto: 6 E2E-OQP steps >= 6"}
    assert "codes trained at 0.1 (auto: 6 E2E-OQP steps >= 6; about" in out.out + out.err


def test_sparsity_warning_when_whole_groups_per_row_miss_the_target(tiny_llama):
    """Rows of one or two groups cannot be pruned near --sparsity: compress_model warns in one line before the work
    (the CLI prints it as ``gqsa compress: warning: …``); a group size that divides the rows finely, per-layer
    sparsities and the global ranking say nothing."""
    import copy
    import warnings

    from gqsa.pipeline import sparsity_warning

    # K = 64 (attention, gate/up): 1 group of 64 per row, always kept; K = 88 (down): 2 groups, one kept (50 %)
    line = sparsity_warning(tiny_llama, GQSAConfig(sparsity=0.3, group_size=64))
    assert line.startswith("--sparsity 0.3 in groups of 64 will remove 13% of the groups")
    assert "12 linears of 1 group per row keep 1" in line and "2 linears of 2 groups per row keep 1" in line
    assert sparsity_warning(tiny_llama, GQSAConfig(sparsity=0.5, group_size=16)) is None
    assert sparsity_warning(tiny_llama, GQSAConfig(sparsity=0.3, group_size=64, allocation="layer")) is None
    assert sparsity_warning(tiny_llama, GQSAConfig(sparsity=0.0, group_size=64)) is None
    # skipped linears do not count: without the down projections every row keeps its one group
    only_one = sparsity_warning(tiny_llama, GQSAConfig(sparsity=0.3, group_size=64, skip=["mlp.down_proj"]))
    assert "will remove 0% of the groups" in only_one and "2 groups" not in only_one
    fresh = copy.deepcopy(tiny_llama)
    with pytest.warns(UserWarning, match="will remove 13% of the groups"):
        compress_model(tiny_llama, GQSAConfig(sparsity=0.3, group_size=64, stages="oneshot"), tokens(), "cpu", 4,
                       progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress_model(fresh, GQSAConfig(sparsity=0.5, group_size=16, stages="oneshot"), tokens(), "cpu", 4,
                       progress=False)


def test_skip_warning_names_suffixes_that_match_no_linear(tiny_llama):
    """A misspelt --skip suffix would compress the layer meant to stay dense: compress_model says so in one line."""
    from gqsa.pipeline import skip_warning

    assert skip_warning(tiny_llama, GQSAConfig(skip=["mlp.down_proj", "self_attn.o_proj"])) is None
    assert skip_warning(tiny_llama, GQSAConfig()) is None
    line = skip_warning(tiny_llama, GQSAConfig(skip=["mlp.down_prj", "mlp.down_proj"]))
    assert line == ("--skip mlp.down_prj: no compressible linear's name ends with it (names look like "
                    "model.layers.1.mlp.down_proj); nothing is skipped for it")
    with pytest.warns(UserWarning, match="--skip mlp.down_prj: no compressible"):
        compress_model(tiny_llama, GQSAConfig(skip=["mlp.down_prj"], stages="oneshot"), tokens(), "cpu", 4,
                       progress=False)
    assert skip_warning(tiny_llama, GQSAConfig(skip=["down_proj"])) is None  # a suffix of a name, not a path part


def test_arguments_compress_cannot_take_are_one_clear_error(tiny_llama):
    """What a Python user may pass by mistake — float ids, one flat window, a list, ids past the vocabulary, a
    dict of settings — is one TypeError/ValueError naming the problem (each failed deep inside the model), and the
    model is untouched."""
    cfg = GQSAConfig(stages="oneshot")
    good = tokens()
    cases = [
        (cfg, good.float(), ValueError, "must be integer token ids, got torch.float32"),
        (cfg, good[0], ValueError, r"must be \[windows, tokens\] .* got shape \[32\]"),
        (cfg, good[:, :1], ValueError, r"got shape \[10, 1\]"),
        (cfg, good.tolist(), TypeError, "must be a torch.Tensor of token ids"),
        (cfg, good + 10_000, ValueError, "outside the model's vocabulary"),
        (cfg, good - 10_000, ValueError, "outside the model's vocabulary"),
        ({"bits": 4}, good, TypeError, r"config must be a GQSAConfig, got dict \(GQSAConfig\(\*\*settings\)"),
    ]
    for config, toks, exc, match in cases:
        with pytest.raises(exc, match=match):
            gqsa.compress(tiny_llama, config, toks, progress=False)
    assert not any(isinstance(m, GQSALinear) for m in tiny_llama.modules())


def test_a_skip_that_leaves_nothing_to_compress_is_refused(tiny_llama):
    """--skip '' (every name ends with it) or a suffix every linear shares: one clear error before any work
    (was a ZeroDivisionError in the report after the run)."""
    with pytest.raises(ValueError, match="an empty suffix matches every layer's name"):
        GQSAConfig(skip=["mlp.down_proj", " "])
    with pytest.raises(ValueError, match=r"^--skip proj skips every compressible linear \(14 of 14, e\.g\. "
                                         r"model\.layers\.1\.mlp\.down_proj\): nothing would be compressed"):
        compress_model(tiny_llama, GQSAConfig(skip=["proj"], stages="oneshot"), tokens(), "cpu", 4, progress=False)
    assert not any(isinstance(m, GQSALinear) for m in tiny_llama.modules())
