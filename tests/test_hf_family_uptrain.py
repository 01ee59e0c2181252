"""GPT-2 and GPT-NeoX dirs with their tokenizers (issue 12), against transformers: GPT-2's
vocab.json + merges.txt (no tokenizer.json) and NeoX's tokenizer.json give the ids and text
AutoTokenizer gives; train.py init_from=<dir> converts to GQA-2 and lowers val loss on a
corpus tokenized by the source's tokenizer, whose files travel with the checkpoint; and
generate.py ckpt=<dir> prompt="..." prints transformers' decode of its greedy tokens."""
from __future__ import annotations

import json
import pickle
import random

import pytest
import torch

pytest.importorskip("transformers")

import train as train_mod  # noqa: E402
from data.tokenizer import load_tokenizer, tokenizer_files  # noqa: E402
from generate import GenerateConfig, run as generate_run  # noqa: E402
from hf_fixtures import CORPUS  # noqa: E402
from store.checkpoint import load_checkpoint  # noqa: E402
from convert.heads import Conversion, convert_model  # noqa: E402
from store.hf import import_hf, main as hf_main  # noqa: E402
from test_hf_uptrain import overrides  # noqa: E402
from test_train import compose_cfg, val_loss_of, write_corpus  # noqa: E402

MODEL_FILES = {"gpt2": {"vocab.json", "merges.txt"}, "neox": {"tokenizer.json"}}


def test_tokenizer_equals_transformers(hf_family):
    family, hf_dir, hf, auto = hf_family
    assert MODEL_FILES[family] <= set(tokenizer_files(hf_dir))
    assert not (hf_dir / "tokenizer.json").exists() or family == "neox"
    ours = pickle.loads(pickle.dumps(load_tokenizer(hf_dir)))  # as datasets' workers get it
    assert (ours.bos_id, ours.eos_id) == (auto.bos_token_id, auto.eos_token_id)
    assert ours.bos_id == ours.eos_id == auto.convert_tokens_to_ids("<|endoftext|>")
    assert not ours.add_bos and ours.vocab_size == hf.config.vocab_size
    for text in [*CORPUS[:5], " leading space", "a<|endoftext|>b"]:
        assert ours.encode(text) == auto(text)["input_ids"], text
    rng = random.Random(0)
    for _ in range(300):  # <|endoftext|> dropped, broken UTF-8 as transformers shows it
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True), ids


def test_import_and_export_carry_the_tokenizer_files(hf_family, tmp_path):
    family, hf_dir, _, auto = hf_family
    assert hf_main(["import", f"hf={hf_dir}", f"out={tmp_path / 'ckpt'}"]) == 0
    assert hf_main(["export", f"ckpt={tmp_path / 'ckpt'}", f"out={tmp_path / 'out'}"]) == 0
    for name in MODEL_FILES[family]:
        for out in (tmp_path / "ckpt", tmp_path / "out"):
            assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == auto.eos_token_id
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in CORPUS[:5]:
        ids = auto(text)["input_ids"]
        assert again(text)["input_ids"] == ids and again.decode(ids) == text


def test_uptrain_family_dir_to_gqa_lowers_val_loss(tmp_path, hf_family):
    family, hf_dir, _, _ = hf_family
    write_corpus(tmp_path / "corpus")
    args = overrides(tmp_path, hf_dir)
    result = train_mod.train(compose_cfg(args), args)

    ckpt = load_checkpoint(result.checkpoint)
    assert (ckpt.config.n_head, ckpt.config.n_kv_head) == (4, 2)
    assert ckpt.config.positions == ("learned" if family == "gpt2" else "rope")
    for name in MODEL_FILES[family]:  # the tokenizer's files travelled byte for byte
        assert (ckpt.path / name).read_bytes() == (hf_dir / name).read_bytes()
    assert load_tokenizer(ckpt.path).sha256() == load_tokenizer(hf_dir).sha256()
    data_cfg = compose_cfg([*args, f"data.tokenizer={hf_dir}"]).data
    prepared = train_mod.prepare_data(train_mod.as_data_config(data_cfg), progress=False)
    assert prepared.cached  # the run tokenized the corpus with the source's tokenizer
    converted = convert_model(import_hf(hf_dir), Conversion(2, "mean"))
    assert result.val_loss < val_loss_of(converted, prepared) - 0.5


def test_generate_py_text_prompt_prints_transformers_decode(hf_family, capsys):
    _, hf_dir, hf, auto = hf_family
    prompt = "def f1"
    ids = auto(prompt)["input_ids"]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert len(set(ref)) > 2
    capsys.readouterr()
    generate_run(GenerateConfig(ckpt=str(hf_dir), prompt=prompt, temperature=0,
                                max_new_tokens=16, stop_at_eos=False, device="cpu",
                                dtype="float32"))
    assert capsys.readouterr().out == auto.decode(ids + ref, skip_special_tokens=True) + "\n"
