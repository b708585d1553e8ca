"""Resume: a run killed after a finished block continues from its work folder and ends bitwise as an
uninterrupted run; a work folder is never silently reused or overwritten."""
import json

import pytest
import torch

from gqsa import GQSAConfig
from gqsa.pipeline import compress_model
from gqsa.stages import workdir as wd

CFG = dict(stages="bqpo+e2e", bits=3, bqpo_epochs=2, bqpo_lr_weight=0.1, e2e_epochs=1, e2e_lr=1e-2)


class Killed(Exception):
    pass


def kill_after(block):
    def hook(i):
        if i == block:
            raise Killed(f"killed after block {i}")

    return hook


def same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for t, v in a[name].tensors().items():
            assert v.dtype == getattr(b[name], t).dtype and torch.equal(v, getattr(b[name], t)), f"{name}.{t}"


@pytest.mark.parametrize("target", ["fp", "qinput"])
def test_killed_run_resumes_to_bitwise_the_uninterrupted_result(llama_factory, calib_tokens, tmp_path, target):
    cfg = GQSAConfig(bqpo_target=target, **CFG)
    full = compress_model(llama_factory(), cfg, calib_tokens, "cpu", 4, False, workdir=tmp_path / "a")
    work = tmp_path / "b"
    with pytest.raises(Killed):
        compress_model(llama_factory(), cfg, calib_tokens, "cpu", 4, False, workdir=work, on_block_done=kill_after(0))
    assert sorted(p.name for p in work.iterdir()) == ["block_0000.safetensors", "state.json"]
    stats = {}
    resumed = compress_model(llama_factory(), cfg, calib_tokens, "cpu", 4, False, workdir=work, resume=True,
                             stats=stats)
    same(full, resumed)
    assert [s.get("resumed", False) for s in stats["bqpo"]] == [True, False]
    # every block finished: a resume reads them all back and only E2E-OQP runs again
    again = compress_model(llama_factory(), cfg, calib_tokens, "cpu", 4, False, workdir=work, resume=True)
    same(full, again)


def test_work_folder_is_not_reused_without_resume_nor_with_other_settings(llama_factory, calib_tokens, tmp_path):
    cfg = GQSAConfig(**{**CFG, "stages": "bqpo"})
    work = tmp_path / "w"
    with pytest.raises(Killed):
        compress_model(llama_factory(), cfg, calib_tokens, "cpu", 4, False, workdir=work, on_block_done=kill_after(0))
    with pytest.raises(FileExistsError, match="resume"):
        compress_model(llama_factory(), cfg, calib_tokens, "cpu", 4, False, workdir=work)
    other = GQSAConfig(**{**CFG, "stages": "bqpo", "sparsity": 0.3})
    with pytest.raises(ValueError, match="sparsity"):
        compress_model(llama_factory(), other, calib_tokens, "cpu", 4, False, workdir=work, resume=True)
    with pytest.raises(ValueError, match="calibration"):
        compress_model(llama_factory(), cfg, calib_tokens[:, :40], "cpu", 4, False, workdir=work, resume=True)
    # E2E settings (and the output layer, quantized after BQPO) do not change BQPO's blocks: resuming is allowed
    compress_model(llama_factory(), GQSAConfig(**{**CFG, "e2e_epochs": 0, "lm_head_bits": 8}), calib_tokens, "cpu", 4,
                   False, workdir=work, resume=True)
    assert json.loads((work / "state.json").read_text())["blocks"] == 2


def test_block_files_hold_packed_layers_and_stats(tmp_path):
    from gqsa import prune
    from gqsa.oneshot import pack_weight

    g = torch.Generator().manual_seed(0)
    cw = prune.compress_weight(torch.randn(24, 40, generator=g), 4, 16, 0.5, "magnitude")
    p = pack_weight(cw, (24, 40), GQSAConfig(stages="oneshot"))
    store = wd.BlockStore(tmp_path / "s", {"x": 1})
    store.save(0, {"model.layers.0.mlp.up_proj": p}, {"train_loss_before": 1.0})
    assert store.finished(3) == 1
    back, stats = store.load(0)
    same({"model.layers.0.mlp.up_proj": p}, back)
    assert stats == {"train_loss_before": 1.0}
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_resume_with_another_thread_count_warns(tmp_path):
    wd.BlockStore(tmp_path / "s", {"x": 1}, notes={"torch_threads": 2})
    with pytest.warns(UserWarning, match="torch_threads: 2 → 1"):
        wd.BlockStore(tmp_path / "s", {"x": 1}, resume=True, notes={"torch_threads": 1})
