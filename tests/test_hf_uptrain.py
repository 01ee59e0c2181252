"""Bring your own MHA checkpoint (issue 11), against transformers on two tiny random HF Llama
dirs, one with a Llama-style sentencepiece model and one with a byte-level BPE tokenizer.json:
train.py init_from=<HF dir> converts to GQA, tokenizes the corpus with the source's
tokenizer and lowers val loss; the export loads in transformers (model and tokenizer),
generates the same greedy tokens and decodes ids to our text; streamed text equals
transformers' decode(prompt + new) minus decode(prompt)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

import train as train_mod  # noqa: E402
import training.start as train_start  # noqa: E402
from data.streaming import IncrementalDecoder  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from generate import GenerateConfig, run as generate_run  # noqa: E402
from store.checkpoint import load_checkpoint  # noqa: E402
from convert.heads import Conversion, convert_model  # noqa: E402
from store.hf import import_hf, main as hf_main  # noqa: E402
from model.sampling import SamplingConfig, generate  # noqa: E402
from test_train import compose_cfg, val_loss_of, write_corpus  # noqa: E402

# continuations starting with a space, a newline, a tab and multi-byte characters
STREAM_CASES = [("import os", " se\nimport sys"), ("print(x)", "\n    return x"),
                ("if x:", "\treturn 1"), ("x = '", "é日本 ✓'"), ("value =", " 🦀 Ωμέγα")]


def overrides(tmp_path: Path, hf_dir: Path) -> list[str]:
    return [f"init_from={hf_dir}", "attention=gqa", "attention.n_kv_head=2", "data=text_files",
            f"data.files=[{tmp_path / 'corpus'}]", f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_proc=1", "logger=none", "batch_size=8", "seq_len=64", "eval_batches=2",
            "max_steps=12", "eval_every=0", "optim.lr=3e-3", "sample_tokens=8",
            f"run_dir={tmp_path / 'run'}"]


def test_uptrain_hf_dir_to_gqa_and_back_to_transformers(tmp_path, hf_llama, capsys):
    kind, hf_dir, _, hf_tok = hf_llama
    write_corpus(tmp_path / "corpus")
    args = overrides(tmp_path, hf_dir)
    result = train_mod.train(compose_cfg(args), args)

    # converted on load to 2 KV heads, trained on the corpus tokenized by the source's tokenizer
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.config.n_kv_head == 2 and ckpt.config.n_head == 4
    source_files = {p.name for p in hf_dir.glob("tokenizer*")}
    for name in source_files:  # the tokenizer files travelled byte for byte
        assert (ckpt.path / name).read_bytes() == (hf_dir / name).read_bytes()
    data_cfg = compose_cfg([*args, f"data.tokenizer={hf_dir}"]).data
    prepared = train_mod.prepare_data(train_mod.as_data_config(data_cfg), progress=False)
    assert prepared.cached and prepared.meta["add_bos"] is (kind == "spm")
    converted = convert_model(import_hf(hf_dir), Conversion(2, "mean"))
    assert result.val_loss < val_loss_of(converted, prepared) - 0.5
    # resuming needs no data.tokenizer: it comes from the checkpoint (a trained one would differ)
    again = [a for a in args if not a.startswith(("init_from=", "max_steps="))]
    again += ["resume=true", "max_steps=14"]
    assert train_mod.train(compose_cfg(again), again).step == 14

    # export: transformers loads the model (2 KV heads) and the tokenizer
    out = tmp_path / "exported"
    assert hf_main(["export", f"ckpt={result.checkpoint}", f"out={out}"]) == 0
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == hf_tok.bos_token_id
    assert generation["eos_token_id"] == hf_tok.eos_token_id
    hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.num_key_value_heads == 2
    auto = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(out)

    # greedy generate: transformers' tokens == ours, printed as transformers decodes them
    prompt = "def f1"
    ids = auto(prompt)["input_ids"]  # BOS first for the Llama tokenizer
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert len(set(ref)) > 2
    ours_ids = generate(import_hf(out), ids, 16, SamplingConfig(temperature=0.0))[0].tolist()
    assert ours_ids == ids + ref
    capsys.readouterr()
    generate_run(GenerateConfig(ckpt=str(out), prompt=prompt, temperature=0, max_new_tokens=16,
                                stop_at_eos=False, device="cpu"))
    printed = capsys.readouterr().out
    assert printed == auto.decode(ids + ref, skip_special_tokens=True) + "\n"

    # any ids decode to the same text through AutoTokenizer and ours: specials, <unk>, broken
    # UTF-8 byte runs (one U+FFFD per byte) included
    rng = random.Random(0)
    for _ in range(500):
        rand = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 16))]
        assert ours.decode(rand) == auto.decode(rand, skip_special_tokens=True), rand


@pytest.mark.parametrize("prompt, continuation", STREAM_CASES)
def test_streaming_equals_transformers_decode_of_prompt_plus_new(hf_llama, prompt, continuation):
    kind, hf_dir, _, hf_tok = hf_llama
    tok = load_tokenizer(hf_dir)
    whole = [tok.bos_id] * tok.add_bos + tok.encode(prompt + continuation)
    # the prompt: the tokens that spell exactly the prompt text; the rest is generated
    cut = [k for k in range(len(whole)) if hf_tok.decode(whole[:k], skip_special_tokens=True)
           == prompt]
    prompt_ids, new = whole[:cut[-1]], whole[cut[-1]:]
    if kind == "spm" and continuation[0] == " ":  # decoded alone, the space would be lost
        assert not tok.decode(new).startswith(" ")
    decoder = IncrementalDecoder(tok, prompt_ids)
    pieces = [decoder.push(i) for i in new] + [decoder.flush()]
    expected_all = hf_tok.decode(prompt_ids + new, skip_special_tokens=True)
    expected_prompt = hf_tok.decode(prompt_ids, skip_special_tokens=True)
    assert expected_all.startswith(expected_prompt)
    assert "".join(pieces) == expected_all[len(expected_prompt):] == continuation
    assert not any("\ufffd" in p for p in pieces)  # unfinished characters were held back


def test_hf_dir_uptrain_needs_source_steps_and_its_own_tokenizer(tmp_path, hf_llama,
                                                                 spm_model_path, bpe_json_path):
    kind, hf_dir, _, _ = hf_llama
    args = [*overrides(tmp_path, hf_dir), "uptrain.alpha=0.05"]
    args.remove("max_steps=12")
    with pytest.raises(train_mod.TrainError, match=r"uptrain.source_steps=N, or set max_steps=N"):
        train_start.uptrain_config(compose_cfg(args), hf_dir, args)
    cfg = train_start.uptrain_config(compose_cfg([*args, "uptrain.source_steps=1000"]), hf_dir,
                                   [*args, "uptrain.source_steps=1000"])
    assert cfg.max_steps == 50 and cfg.data.tokenizer == str(hf_dir.resolve())

    # a data.tokenizer other than the source's is refused before any training
    write_corpus(tmp_path / "corpus")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(bpe_json_path if kind == "spm" else spm_model_path,
                    other / ("tokenizer.json" if kind == "spm" else "tokenizer.model"))
    (other / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    wrong = [*overrides(tmp_path, hf_dir), f"data.tokenizer={other}"]
    with pytest.raises(train_mod.TrainError, match="the data's tokenizer differs from"):
        train_mod.train(compose_cfg(wrong), wrong)
    assert not (tmp_path / "run" / "checkpoints").exists()
