"""Small pieces several test modules share (the HF-style fixtures are in hf_fixtures.py)."""
from __future__ import annotations

import pytest
import torch

from convert.heads import aligned_attention
from store.checkpoint import model_state


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation, many times over on a busy CPU.
    A module imports this fixture to run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted_mha(base, mha, plans, logits):
    """mha loaded with GQA model base's weights, each KV head repeated for its query heads
    (MHA == GQA), then layer i's heads rewritten by plans[i] (aligned_attention). Asserts
    that mha still computes base's function (logits(model) on fixed tokens); returns mha."""
    G, S, hd = base.config.n_kv_head, mha.config.n_kv_head, base.config.head_dim
    state = model_state(base)
    for name in list(state):
        if ".k_proj." in name or ".v_proj." in name:
            heads = state[name].unflatten(0, (G, hd))  # (G, hd, ...)
            state[name] = heads.repeat_interleave(S // G, dim=0).flatten(0, 1)
    for layer, plan in enumerate(plans):
        state.update(aligned_attention(state, layer, plan, S))
    mha.load_state_dict(state, strict=False)  # lm_head is tied to the embedding
    torch.testing.assert_close(logits(mha), logits(base), atol=1e-5, rtol=1e-5)
    return mha


def compile_works() -> str | None:
    """None when torch.compile can build a CPU kernel here, else why not."""
    try:
        f = torch.compile(lambda x: torch.sin(x) * 2)
        x = torch.randn(4)
        torch.testing.assert_close(f(x), torch.sin(x) * 2)
    except Exception as e:  # no compiler, an unsupported Python, ...
        return f"torch.compile unavailable here: {type(e).__name__}: {e}"[:300]
    return None
