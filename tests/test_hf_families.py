"""GPT-2 and GPT-NeoX (Pythia) interop against transformers itself: imported logits and
greedy generations equal transformers', the KV cache equals the full forward, export loads
back in the family's own class, import -> export -> import is lossless, and K/V pooling
(biases included) keeps the logits when the heads of each group are identical."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,  # noqa: E402
                          GPTNeoXForCausalLM)

from store.checkpoint import CheckpointError, model_state  # noqa: E402
from convert.heads import Conversion, convert_model  # noqa: E402
from store.hf import export_hf, import_hf, is_hf_model, main  # noqa: E402
from model.sampling import SamplingConfig, decode_step, generate, new_cache, prefill  # noqa: E402

VOCAB = 97
CASES = {  # name: (transformers class, config kwargs)
    "gpt2-tied": (GPT2LMHeadModel, GPT2Config, dict(activation_function="gelu_new")),
    "gpt2-untied-exact-gelu": (GPT2LMHeadModel, GPT2Config,
                               dict(activation_function="gelu", tie_word_embeddings=False)),
    "neox-parallel": (GPTNeoXForCausalLM, GPTNeoXConfig, dict(use_parallel_residual=True)),
    "neox-sequential-tied": (GPTNeoXForCausalLM, GPTNeoXConfig,
                             dict(use_parallel_residual=False, tie_word_embeddings=True)),
}
SHAPES = {  # 4 heads of 16 dims; NeoX rotates a quarter of each head (rotary_pct 0.25)
    GPT2Config: dict(n_embd=64, n_layer=2, n_head=4, n_positions=64),
    GPTNeoXConfig: dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=160, max_position_embeddings=64, rotary_pct=0.25,
                        rotary_emb_base=500.0),
}


def tiny_hf(tmp_path, case, seed=0):
    """A random tiny transformers model of the case, saved locally (no Hub)."""
    model_cls, config_cls, kwargs = CASES[case]
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                     attn_implementation="eager", **SHAPES[config_cls], **kwargs)
    hf = model_cls(cfg).eval()
    for p in hf.parameters():  # norms away from 1, biases away from 0: a swap would show
        torch.nn.init.normal_(p, mean=0.0 if p.dim() > 1 else 1.0, std=0.2)
    path = tmp_path / case
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module", params=list(CASES))
def imported(request, tmp_path_factory):
    hf, path = tiny_hf(tmp_path_factory.mktemp("hf"), request.param)
    return request.param, hf, path, import_hf(path)


TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def hf_logits(hf, tokens=TOKENS):
    with torch.no_grad():
        return hf(tokens).logits


def test_imported_logits_equal_transformers(imported):
    case, hf, path, ours = imported
    assert is_hf_model(path)
    if case.startswith("neox"):
        assert ours.config.rotary_dim == 4 and ours.config.rope_theta == 500.0
        assert ours.config.parallel_residual == hf.config.use_parallel_residual
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(hf), atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_transformers_generate(imported):
    _, hf, _, ours = imported
    prompt = TOKENS[:, :6]
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    assert torch.equal(generate(ours, prompt, 20, SamplingConfig(temperature=0)), theirs)


def test_generate_py_takes_the_hf_dir(imported, capsys):
    """generate.py ckpt=<GPT-2 or NeoX dir>: no tokenizer here, so ids in and ids out."""
    from generate import GenerateConfig, run
    _, hf, path, _ = imported
    prompt = TOKENS[0, :6]
    theirs = hf.generate(prompt[None], max_new_tokens=10, do_sample=False)[0]
    capsys.readouterr()
    run(GenerateConfig(ckpt=str(path), prompt_ids=prompt.tolist(), temperature=0,
                       max_new_tokens=10, device="cpu", dtype="float32"))
    assert capsys.readouterr().out.split() == [str(i) for i in theirs.tolist()]


def test_cached_decode_equals_the_full_forward(imported):
    ours = imported[3]
    with torch.no_grad():
        full = ours(TOKENS)  # (B, T, V)
        cache = new_cache(ours, 2, TOKENS.shape[1])
        steps = [prefill(ours, TOKENS[:, :5], cache)]
        for t in range(5, TOKENS.shape[1]):
            steps.append(decode_step(ours, TOKENS[:, t], torch.tensor([t]), cache, t + 1))
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 4:-1], atol=1e-5, rtol=1e-5)


def test_export_loads_in_its_own_family_and_round_trips(imported, tmp_path):
    case, hf, _, ours = imported
    out = export_hf(ours, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(hf).__name__]
    reloaded = type(hf).from_pretrained(out, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(reloaded), hf_logits(hf), atol=1e-5, rtol=1e-5)
    again = import_hf(out)
    assert again.config == ours.config
    assert model_state(again).keys() == model_state(ours).keys()
    for name, tensor in model_state(ours).items():
        assert torch.equal(model_state(again)[name], tensor), name


@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["GQA-2", "MQA"])
def test_pooling_identical_heads_and_biases_keeps_the_logits(imported, n_kv_head, tmp_path):
    ours = copy.deepcopy(imported[3])
    cfg = ours.config
    group = cfg.n_head // n_kv_head
    with torch.no_grad():
        for block in ours.blocks:  # copy each group's first K/V head (rows and bias) over the group
            for proj in (block.attn.k_proj, block.attn.v_proj):
                for p in (proj.weight, proj.bias):
                    heads = p.view(n_kv_head, group, cfg.head_dim, -1)
                    heads.copy_(heads[:, :1].expand_as(heads).clone())
        before = ours(TOKENS)
        gqa = convert_model(ours, Conversion(n_kv_head))
        assert gqa.blocks[0].attn.k_proj.bias.shape == (n_kv_head * cfg.head_dim,)
        torch.testing.assert_close(gqa(TOKENS), before, atol=1e-5, rtol=1e-5)
    # transformers has no GQA GPT-2/NeoX: export refuses in one line and writes nothing
    with pytest.raises(CheckpointError, match="use this gqalab checkpoint with generate.py") as e:
        export_hf(gqa, tmp_path / "gqa")
    assert "\n" not in str(e.value) and not (tmp_path / "gqa").exists()


def test_legacy_gpt2_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """openai-community/gpt2's own files: no "transformer." prefix, causal-mask buffers."""
    from safetensors.torch import load_file, save_file
    hf, path = tiny_hf(tmp_path, "gpt2-tied")
    state = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)})
    save_file(state, path / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(import_hf(path)(TOKENS), hf_logits(hf), atol=1e-4, rtol=1e-4)


def test_other_families_and_features_are_refused_in_one_line(tmp_path, capsys):
    _, path = tiny_hf(tmp_path, "gpt2-tied")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(
        {**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    assert is_hf_model(path)
    capsys.readouterr()  # transformers' save progress bar
    assert main(["import", f"hf={path}", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "Llama, GPT-2, GPT-NeoX" in err and "MistralForCausalLM" in err
    (path / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx=true is not supported"):
        import_hf(path)


@pytest.mark.parametrize("switches, message", [
    # what LlamaForCausalLM cannot express (its biases it can: tests/test_hf.py)
    (dict(mlp="gelu"), "Llama: mlp='gelu' where it has 'swiglu'"),
    (dict(rotary_dim=4, attn_bias=True), "Llama: rotary_dim=4 where it has 16"),
    (dict(parallel_residual=True, n_kv_head=2), "Llama: parallel_residual=True"),
    (dict(norm="layernorm", n_kv_head=2), "no GPT-NeoX class with grouped K/V heads"),
    (dict(norm="layernorm", positions="learned"), "activation_function='swiglu'"),  # GPT-2
    (dict(norm="layernorm", mlp="gelu", head_dim=8), "GPT-NeoX: head_dim"),
])
def test_export_refuses_configs_no_family_holds_exactly(tmp_path, switches, message):
    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=4, d_model=64,
                                    **switches))
    with pytest.raises(CheckpointError) as e:
        export_hf(model, tmp_path / "out")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
