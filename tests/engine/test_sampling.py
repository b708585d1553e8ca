import pytest
import torch

from gqsa.engine.sampling import SamplingParams, filter_logits, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(3, 40)
    x = filter_logits(logits, SamplingParams(temperature=1.0, top_k=5))
    kept = torch.isfinite(x)
    assert kept.sum(-1).tolist() == [5, 5, 5]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    x = filter_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.isfinite(x).tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    x = filter_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.01))
    assert torch.isfinite(x).tolist() == [[True, False, False, False]]  # the top token always stays


def test_temperature_scales_and_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(filter_logits(logits, SamplingParams(temperature=0.5)), logits / 0.5)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, SamplingParams(temperature=1.0), g) for _ in range(2000)])
    p1 = torch.softmax(logits, -1)[0, 1].item()
    assert abs(draws.float().mean().item() - p1) < 0.04


@pytest.mark.parametrize("kw, msg", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"),
                                     (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                     (dict(temperature=float("nan")), "temperature")])
def test_bad_parameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)
