import torch
from torch import nn

from quant.calibrate import ActivationStats, collect_stats


def test_stats_equal_a_full_capture(tiny_model, tmp_path):
    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(0, tiny_model.config.vocab_size, (n,), generator=g) for n in (17, 40, 5)]
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: captured.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)]
    for s in samples:
        tiny_model(input_ids=s[None])
    for h in hooks:
        h.remove()
    stats = collect_stats(tiny_model, samples, meta={"model": "tiny"})
    assert set(stats.layers) == set(captured)
    for name, chunks in captured.items():
        x = torch.cat(chunks).double()
        s = stats.layers[name]
        assert s.tokens == 62
        torch.testing.assert_close(s.absmax, x.abs().amax(0))
        torch.testing.assert_close(s.min, x.amin(0))
        torch.testing.assert_close(s.max, x.amax(0))
        torch.testing.assert_close(s.mean_abs, x.abs().mean(0))
    stats.save(tmp_path / "stats")
    back = ActivationStats.load(tmp_path / "stats")
    assert back.meta["model"] == "tiny" and back.meta["samples"] == 3
    for name, s in stats.layers.items():
        torch.testing.assert_close(back.layers[name].absmax, s.absmax.float().double())
        assert back.layers[name].tokens == s.tokens
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind
