"""HF Llama interop against transformers itself: logits and greedy generations after
import, logits after export (biased and converted models included), a lossless round trip,
refusal of unsafe or unsupported inputs, and the command."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from store.checkpoint import CheckpointError, load_checkpoint, model_state  # noqa: E402
from convert.heads import Conversion, convert_model  # noqa: E402
from store.hf import export_hf, import_hf, is_hf_model, main  # noqa: E402
from model.sampling import SamplingConfig, generate  # noqa: E402

BIASES = dict(attention_bias=True, mlp_bias=True)  # q, k, v, o; gate, up, down
CASES = {  # name: (num_key_value_heads, tie_word_embeddings, other LlamaConfig settings)
    "MHA-untied": (4, False, {}),
    "GQA-tied": (2, True, {}),
    "MQA-untied": (1, False, {}),
    "MQA-tied": (1, True, {}),
    "MHA-biases": (4, False, BIASES),
    "GQA-attention-bias-tied": (2, True, dict(attention_bias=True)),
}


def tiny_hf_llama(tmp_path, n_kv_head, tied, seed=0, rope_theta=500.0, **settings):
    """A random tiny LlamaForCausalLM saved locally (no Hub)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_head, head_dim=16,
                      max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                      bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no early stop
                      attn_implementation="eager", **settings)
    hf = LlamaForCausalLM(cfg).eval()
    for name, p in hf.named_parameters():  # norms away from 1, biases from 0: a swap would show
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.2)
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    return hf, path


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_import_matches_hf_logits_and_round_trips(tmp_path, case):
    n_kv, tied, settings = CASES[case]
    hf, path = tiny_hf_llama(tmp_path, n_kv, tied, **settings)
    assert is_hf_model(path)
    ours = import_hf(path)
    assert ours.config.n_kv_head == n_kv and ours.config.tie_embeddings == tied
    assert ours.config.rope_theta == 500.0
    assert (ours.config.attn_bias, ours.config.mlp_bias) == (
        hf.config.attention_bias, hf.config.mlp_bias)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)
    theirs = hf.generate(tokens[:, :6], max_new_tokens=16, do_sample=False)
    assert torch.equal(generate(ours, tokens[:, :6], 16, SamplingConfig(temperature=0)), theirs)

    # export -> transformers loads it with our n_kv_head and gives the same logits
    out = export_hf(ours, tmp_path / "exported")
    exported = json.loads((out / "config.json").read_text())
    assert exported["num_key_value_heads"] == n_kv and exported["tie_word_embeddings"] == tied
    assert (exported["attention_bias"], exported["mlp_bias"]) == (
        hf.config.attention_bias, hf.config.mlp_bias)
    reloaded = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.num_key_value_heads == n_kv
    torch.testing.assert_close(hf_logits(reloaded, tokens), hf_logits(hf, tokens),
                               atol=1e-5, rtol=1e-5)

    assert_reimports_exactly(out, ours)


def assert_reimports_exactly(exported, ours):
    """import -> export -> import is bit-exact: the same config and every tensor equal."""
    again = import_hf(exported)
    assert again.config == ours.config
    assert model_state(again).keys() == model_state(ours).keys()
    for name, tensor in model_state(ours).items():
        assert torch.equal(model_state(again)[name], tensor), name


@pytest.mark.parametrize("n_kv_head, group, align", [
    (2, "contiguous", "none"), (2, "similar", "procrustes"), (1, "contiguous", "procrustes")],
    ids=["GQA-2-mean", "GQA-2-similar-procrustes", "MQA-procrustes"])
def test_converted_llama_with_biases_exports_to_transformers(tmp_path, n_kv_head, group, align):
    """An MHA Llama with every bias, converted by us (K/V biases pooled; with procrustes
    rotated with their heads and the Q biases following), loads in LlamaForCausalLM as
    GQA/MQA with biases and gives our logits."""
    _, path = tiny_hf_llama(tmp_path, 4, False, **BIASES)
    tokens = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(1))
    ours = convert_model(import_hf(path), Conversion(n_kv_head, "mean", group=group, align=align),
                         tokens[:6])
    out = export_hf(ours, tmp_path / "converted")
    reloaded = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.num_key_value_heads == n_kv_head
    assert reloaded.model.layers[1].self_attn.v_proj.bias.shape == (n_kv_head * 16,)
    assert reloaded.model.layers[1].mlp.down_proj.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(reloaded, tokens[6:]), ours(tokens[6:]),
                                   atol=1e-5, rtol=1e-5)
    assert_reimports_exactly(out, ours)


def test_bf16_import_stays_bf16_and_equals_the_fp32_import_cast(tmp_path):
    hf, path = tiny_hf_llama(tmp_path, 2, True)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ours = import_hf(tmp_path / "bf16")
    tensors = list(ours.parameters()) + list(ours.buffers())
    assert {t.dtype for t in tensors} == {torch.bfloat16}
    assert not any(t.is_meta for t in tensors)
    assert ours.lm_head.weight is ours.embed.weight  # tied: one tensor, re-tied after load
    reference = import_hf(path).to(torch.bfloat16)  # the fp32 import, then cast
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(tokens), reference(tokens))
    as_fp32 = import_hf(tmp_path / "bf16", dtype=torch.float32)
    assert as_fp32.embed.weight.dtype == torch.float32
    assert torch.equal(as_fp32.rope_cos, import_hf(path).rope_cos)  # not rounded through bf16

    assert main(["import", f"hf={tmp_path / 'bf16'}", f"out={tmp_path / 'ckpt'}"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "ckpt" / "model.safetensors").values()} \
        == {torch.bfloat16}


def test_command_import_then_export_keeps_tokenizer(tmp_path, spm_model_path):
    hf, path = tiny_hf_llama(tmp_path, 2, False)
    shutil.copyfile(spm_model_path, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    assert main(["import", f"hf={path}", f"out={tmp_path / 'ckpt'}"]) == 0
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.n_kv_head == 2
    for name in ("tokenizer.model", "tokenizer_config.json"):  # travelled byte for byte
        assert (ckpt.path / name).read_bytes() == (path / name).read_bytes()
    assert main(["import", f"hf={path}", f"out={tmp_path / 'ckpt'}"]) == 2  # exists: refused
    assert main(["export", f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'tok'}"]) == 0
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == spm_model_path.read_bytes()
    # without a tokenizer the weights still go: ids in, ids out
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        ckpt.path.joinpath(name).unlink()
    assert main(["export", f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'back'}"]) == 0
    assert not (tmp_path / "back" / "tokenizer_config.json").exists()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.arange(10)[None]
    torch.testing.assert_close(hf_logits(reloaded, tokens), hf_logits(hf, tokens),
                               atol=1e-4, rtol=1e-4)


def test_every_tokenizer_file_travels_through_import_and_export(tmp_path, spm_model_path,
                                                                 bpe_json_path):
    """A Llama dir shipping tokenizer.json and tokenizer.model: import and export keep both,
    byte for byte, and each dir still loads the tokenizer.json one."""
    from data.tokenizer import load_tokenizer
    _, path = tiny_hf_llama(tmp_path, 2, False)
    shutil.copyfile(spm_model_path, path / "tokenizer.model")
    shutil.copyfile(bpe_json_path, path / "tokenizer.json")
    assert main(["import", f"hf={path}", f"out={tmp_path / 'ckpt'}"]) == 0
    assert main(["export", f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'back'}"]) == 0
    for out in (tmp_path / "ckpt", tmp_path / "back"):
        for name in ("tokenizer.model", "tokenizer.json"):
            assert (out / name).read_bytes() == (path / name).read_bytes()
        assert load_tokenizer(out).sha256() == load_tokenizer(bpe_json_path).sha256()


@pytest.mark.parametrize("legacy", [False, True])  # legacy: torch < 1.6's pre-zip format
def test_pickle_bin_loads_weights_only_and_refuses_code(tmp_path, legacy):
    hf, path = tiny_hf_llama(tmp_path, 4, True)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    ours = import_hf(path)
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)

    class RunsCode:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": RunsCode()}, path / "pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="unreadable as plain weights"):
        import_hf(path)


def test_sharded_safetensors(tmp_path):
    hf, path = tiny_hf_llama(tmp_path, 2, False)
    (path / "model.safetensors").unlink()
    hf.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(import_hf(path)(tokens), hf_logits(hf, tokens),
                                   atol=1e-4, rtol=1e-4)


def test_sharded_pickle_bin(tmp_path):  # OpenLLaMA and Sheared-LLaMA ship only these
    hf, path = tiny_hf_llama(tmp_path, 2, False)
    (path / "model.safetensors").unlink()
    state = hf.state_dict()
    names, weight_map = list(state), {}
    for k, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save({name: state[name] for name in part}, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(import_hf(path)(tokens), hf_logits(hf, tokens),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope scaling"),
    ({"attention_bias": True}, r"weights do not match its config \(missing .*q_proj.bias"),
    ({"num_key_value_heads": 3}, "not divisible"),
])
def test_unsupported_configs_are_refused(tmp_path, change, message):
    _, path = tiny_hf_llama(tmp_path, 4, False)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message):
        import_hf(path)


def test_missing_dir_and_bad_args(tmp_path, capsys):
    assert main(["import", f"hf={tmp_path / 'nope'}", f"out={tmp_path / 'x'}"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["export", "ckpt=a"]) == 2
    assert "missing out=" in capsys.readouterr().err
    assert main(["export", "ckpt=a", "out=b", "colour=red"]) == 2
    assert "unknown key colour: the keys here are action, hf, ckpt" in capsys.readouterr().err
    assert main(["export", "ckpt=a", "out=b", "overwrite=ture"]) == 2  # a typo is not "false"
    assert "overwrite=ture: Value 'ture' is not a valid bool" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_chat_template_travels_through_import_and_export(tmp_path):
    """chat_template.jinja (transformers' own file) reaches the gqalab checkpoint and the
    export, and transformers reads the same template back from the export."""
    from transformers import AutoTokenizer

    from data.chat import chat_template
    from hf_fixtures import SMOLLM2_TEMPLATE, chat_tokenizer
    _, path = tiny_hf_llama(tmp_path, 2, False)
    chat_tokenizer(path, SMOLLM2_TEMPLATE)
    assert (path / "chat_template.jinja").is_file()
    assert main(["import", f"hf={path}", f"out={tmp_path / 'ckpt'}"]) == 0
    assert main(["export", f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'back'}"]) == 0
    for out in (tmp_path / "ckpt", tmp_path / "back"):
        assert chat_template(out) == SMOLLM2_TEMPLATE
    assert AutoTokenizer.from_pretrained(tmp_path / "back").chat_template == SMOLLM2_TEMPLATE
