"""Continuation scoring against single, unpadded forward passes of context + continuation."""

import numpy as np
import torch

from quant.checks.scoring import continuation_loglikelihoods
from quant.confidence import Tempered


def _requests(tokenizer) -> list[tuple[list[int], list[int]]]:
    """Contexts of 3 to ~90 tokens (past Gemma3's 64-token sliding window), shared by 1 to 4 continuations of
    1 to 6 tokens, in an order that interleaves them."""
    words = "alpha beta gamma delta river market film score theory planet music history".split()
    contexts = [" ".join(words[(k * 5 + j) % len(words)] for j in range(n)) for k, n in enumerate((2, 20, 45, 6))]
    encode = lambda text: tokenizer(text, add_special_tokens=True)["input_ids"]  # noqa: E731
    conts = [[" the"], [" river market film", " of", " quantum theory of music history"], [" a", " b", " c", " d"],
             [" planet"]]
    out = [(encode(ctx), tokenizer(c, add_special_tokens=False)["input_ids"]) for ctx, cs in zip(contexts, conts)
           for c in cs]
    return out[::2] + out[1::2]


def test_shared_contexts_score_like_single_passes_and_run_each_context_once(tiny_model, tokenizer):
    requests = _requests(tokenizer)
    seen = []
    hook = tiny_model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    ll, greedy = continuation_loglikelihoods({"fp": tiny_model, "fp+T": Tempered("fp", 1.7)}, tokenizer, requests,
                                             batch_size=3, desc="test")
    hook.remove()
    with torch.no_grad():
        for i, (ctx, cont) in enumerate(requests):
            z = tiny_model(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
            target = torch.tensor(cont)
            for name, t in (("fp", 1.0), ("fp+T", 1.7)):
                logp = (z / t).log_softmax(-1)
                np.testing.assert_allclose(ll[name][i], float(logp.gather(-1, target[:, None]).sum()), rtol=1e-5,
                                           atol=1e-5)
                assert greedy[name][i] == bool((logp.argmax(-1) == target).all())
    # each distinct context is read once (plus padding), not once per continuation
    unshared = sum(len(c) + len(k) - 1 for c, k in requests)
    assert sum(seen) < 0.6 * unshared
