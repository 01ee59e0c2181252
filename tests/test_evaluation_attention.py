"""evaluation/attention.py: the hook against transformers' output_attentions and its own
invariants, KL against an exact MHA expansion, and a figure that fits its title."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.loader import eval_batches  # noqa: E402
from evaluation.attention import attention_kl, prompt_attention  # noqa: E402
from evaluation.heatmap import panels_figure  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from store.hf import import_hf  # noqa: E402

SEQ = 32


def test_prompt_attention_is_transformers_output_attentions(hf_llama, hf_family):
    """The hook's probabilities are the ones transformers returns with output_attentions
    (the fixtures run eager attention), for Llama, GPT-2 and NeoX."""
    for _, hf_dir, hf_model, _ in (hf_llama, hf_family):
        model = import_hf(hf_dir)
        ids = [5, 17, 99, 3, 250, 41, 8]
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids]), output_attentions=True).attentions
        for layer in range(model.config.n_layer):
            ours = prompt_attention(model, ids, layer)  # (H, T, T)
            torch.testing.assert_close(ours, theirs[layer][0], atol=1e-5, rtol=1e-4)


def test_earlier_rows_do_not_change_when_the_prompt_grows():
    """The notebook's observation, why a KV cache is exact: a query attends only to keys at
    or before it, so extending the prompt adds rows and leaves the earlier ones as they were."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                    max_seq_len=SEQ)).eval()
    ids = torch.randint(0, 50, (12,)).tolist()
    for layer in range(2):
        short, long = prompt_attention(model, ids[:7], layer), prompt_attention(model, ids, layer)
        torch.testing.assert_close(long[:, :7, :7], short, atol=1e-6, rtol=0)
        assert (long[:, :7, 7:] == 0).all() and (long[:, 7:, 7:].diagonal(dim1=1, dim2=2) > 0).all()
        torch.testing.assert_close(long.sum(-1), torch.ones(4, 12))


def expanded_to_mha(gqa: Transformer) -> Transformer:
    """The exact MHA form of a GQA model: each KV head's k/v rows repeated for its group."""
    cfg = gqa.config
    mha = Transformer(cfg.with_kv_heads(cfg.n_head)).eval()
    state = gqa.state_dict()
    group, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(cfg.n_kv_head, hd, -1).repeat_interleave(group, 0).flatten(0, 1)
    mha.load_state_dict(state)
    return mha


def test_attention_kl_is_zero_for_itself_and_the_exact_mha_expansion():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=SEQ)
    gqa, other = Transformer(cfg).eval(), Transformer(cfg).eval()
    mha = expanded_to_mha(gqa)
    tokens = torch.randint(0, 50, (200,)).numpy()
    kl = lambda ref, model: attention_kl(ref, model, eval_batches(tokens, None, 16, 2),
                                            torch.device("cpu"))
    for ref, model in ((gqa, gqa), (mha, gqa), (gqa, mha)):
        table, positions = kl(ref, model)
        assert positions == (len(tokens) - 1) // 16 * 16 and table.shape == (2, 4)
        assert table.abs().max() / positions < 1e-7
    table, positions = kl(gqa, other)  # another model's heads: the table sees it
    assert (table / positions > 1e-5).all()



@pytest.mark.parametrize("n_panels", [1, 2])
def test_the_figure_holds_its_whole_title(n_panels):
    """Issue 31: a title wider than the figure ran past both edges. Wrapped, every line of
    it (a long path broken too) is drawn inside the figure, above the panels."""
    title = "attention KL to /data/ckpts/SmolLM2-135M-hf-mha-reference-uptrained-200k (nats) " * 2
    fig = panels_figure({f"/ckpts/gqa{i}": torch.rand(6, 8) for i in range(n_panels)}, title,
                        xlabel="query head", ylabel="layer", colorbar=True)
    fig.canvas.draw()
    box, page = fig.texts[0].get_window_extent(), fig.bbox  # the title: the one figure text
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1
    assert all(box.y0 >= ax.get_window_extent().y1 for ax in fig.axes)
    assert "".join(fig.get_suptitle().split()) == "".join(title.split())
