"""The reused-buffer softmax statistics against float64 log_softmax, value for value."""

import pytest
import torch

from quant.confidence.softmax import SoftmaxScratch


def _reference(z: torch.Tensor, temperature: float, target: torch.Tensor, q_logp: torch.Tensor | None):
    logp = torch.log_softmax(z.double() / temperature, -1)
    p = logp.exp()
    kl = None if q_logp is None else (q_logp.exp() * (q_logp - logp)).sum(-1)
    return p.max(-1).values, p.argmax(-1), (p * p).sum(-1), -logp.gather(-1, target[:, None])[:, 0], kl, logp


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_stats_match_float64(temperature):
    g = torch.Generator().manual_seed(0)
    ref_z = torch.randn(33, 5000, generator=g) * 4
    other_z = ref_z + 0.3 * torch.randn(33, 5000, generator=g)  # a close model, as a quantized variant is
    target = torch.randint(0, 5000, (33,), generator=g)
    scratch = SoftmaxScratch()
    q_logp = None
    for z, keep in ((ref_z, True), (other_z, False)):
        s = scratch.stats(z, temperature, target, keep_reference=keep)
        conf, pred, sum_sq, nll, kl, logp = _reference(z, temperature, target, q_logp)
        q_logp = logp if keep else q_logp
        torch.testing.assert_close(s.conf.double(), conf, rtol=1e-5, atol=1e-7)
        assert torch.equal(s.pred, pred)
        torch.testing.assert_close(s.sum_sq.double(), sum_sq, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s.nll.double(), nll, rtol=1e-5, atol=1e-5)
        if keep:
            assert torch.equal(s.kl, torch.zeros(33))  # the reference against itself: exactly 0
        else:
            assert kl.min() > 1e-3  # a real divergence, so the tolerance below means something
            torch.testing.assert_close(s.kl.double(), kl, rtol=1e-4, atol=1e-6)


def test_no_reference_no_kl():
    z = torch.randn(4, 10)
    s = SoftmaxScratch().stats(z)
    assert s.kl is None and s.nll is None
    torch.testing.assert_close(s.conf, torch.softmax(z, -1).max(-1).values)
