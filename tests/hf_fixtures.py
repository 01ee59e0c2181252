"""Tiny HF-style checkpoints and tokenizers built offline, for tests.

Builders (plain functions) and session-scoped pytest fixtures over them (tests/conftest.py
re-exports the fixtures). Each takes well under a second:
  (a) llama_spm_model: a Llama-style sentencepiece BPE model (add_dummy_prefix on, byte
      fallback, <unk>=0 <s>=1 </s>=2, no pad), as Llama-2 / OpenLLaMA ship it;
  (b) byte_bpe_tokenizer: a GPT-2-style byte-level BPE tokenizer.json trained with
      `tokenizers`, one special <|endoftext|> that is both BOS and EOS;
  (c) tiny_hf_llama: a random LlamaForCausalLM (MHA) saved with transformers beside either
      tokenizer: weights, config.json, generation_config.json and the tokenizer files
      ("spm": tokenizer.model, tokenizer_config.json, special_tokens_map.json as OpenLLaMA
      and Sheared-LLaMA ship them; "bpe": tokenizer.json and tokenizer_config.json).
  (d) tiny_hf_family: a random MHA GPT2LMHeadModel beside GPT-2's slow-tokenizer files
      only (vocab.json + merges.txt, no tokenizer.json), or a GPTNeoXForCausalLM (rotary_pct
      0.25) beside the byte-level BPE tokenizer.json.
The fixtures are shared by the whole session: copy a dir before changing it.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

CORPUS = [
    "import os\nimport sys\n\n\ndef main(argv):\n    for name in argv:\n\tprint(name, 'ok')\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "The quick brown fox jumps over the lazy dog.  Twice:  the  dog.\n",
    "# héllo wörld, naïve café ✓ 日本語 — done\nvalue = {'a': 1, 'b': [2, 3]}\n",
    "if x > 0:\n    return x * 2\nelse:\n    return -x\n",
] * 8
SPM_VOCAB, BPE_VOCAB = 400, 360


def llama_spm_model(out_dir: Path, vocab_size: int = SPM_VOCAB) -> Path:
    """tokenizer.model trained like Llama's: BPE, add_dummy_prefix, byte fallback, digits
    split, identity normalisation, ids unk 0 / bos 1 / eos 2 and no pad."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def byte_bpe_tokenizer(out_dir: Path, vocab_size: int = BPE_VOCAB) -> Path:
    """tokenizer.json of a GPT-2-style byte-level BPE (no BOS added, <|endoftext|> ends
    documents), trained with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path


def hf_tokenizer(kind: str, out_dir: Path):
    """The transformers tokenizer of kind "spm" or "bpe", its files written into out_dir."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    out_dir = Path(out_dir)
    if kind == "spm":  # no tokenizer.json: transformers converts tokenizer.model on load
        llama_spm_model(out_dir)
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special))
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True,
            "add_eos_token": False, "legacy": True}))
        return AutoTokenizer.from_pretrained(out_dir)
    if kind != "bpe":
        raise ValueError(f"kind={kind!r}: spm or bpe")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(byte_bpe_tokenizer(out_dir)),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json
    return tok


def tiny_hf_llama(out_dir: Path, kind: str = "spm", seed: int = 0, n_head: int = 4):
    """A random MHA LlamaForCausalLM beside its tokenizer, saved as an HF dir. -> (model, tok)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    out_dir = Path(out_dir)
    tok = hf_tokenizer(kind, out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160,
                      num_hidden_layers=2, num_attention_heads=n_head,
                      num_key_value_heads=n_head, head_dim=64 // n_head,
                      max_position_embeddings=256, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=None,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():  # larger than the default init: clear greedy picks
        torch.nn.init.normal_(p, mean=0.0 if p.dim() > 1 else 1.0, std=0.1)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id)
    model.save_pretrained(out_dir)
    return model, tok


def randomize(model: torch.nn.Module, std: float = 0.1) -> None:
    """Every parameter random: matrices larger than the default init (clear greedy picks),
    biases away from 0 and LayerNorm gains away from 1, each element its own draw, so a bias
    or norm mapped from the wrong tensor (or dropped) changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.dim() == 1 and name.endswith("weight")  # a LayerNorm's weight
            torch.nn.init.normal_(p, mean=1.0 if gain else 0.0, std=std)


def tiny_hf_family(out_dir: Path, family: str, seed: int = 0):
    """A random tiny "gpt2" or "neox" model and its tokenizer saved as an HF dir (see (d));
    <|endoftext|> is BOS and EOS, as in both families. -> (model, AutoTokenizer)."""
    from tokenizers import Tokenizer
    from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM)
    out_dir = Path(out_dir)
    json_path = byte_bpe_tokenizer(out_dir)
    tok = Tokenizer.from_file(str(json_path))
    ids = dict(vocab_size=tok.get_vocab_size(), bos_token_id=tok.token_to_id("<|endoftext|>"),
               eos_token_id=tok.token_to_id("<|endoftext|>"), attn_implementation="eager")
    torch.manual_seed(seed)
    if family == "gpt2":
        tok.model.save(str(out_dir))  # vocab.json + merges.txt, as GPT-2's Hub dir has them
        json_path.unlink()
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                           **ids))
    elif family == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
            max_position_embeddings=128, rotary_pct=0.25, **ids))
    else:
        raise ValueError(f"family={family!r}: gpt2 or neox")
    randomize(model)
    model.eval().save_pretrained(out_dir)
    return model, AutoTokenizer.from_pretrained(out_dir)


# ---------------------------------------------------------------- session fixtures

@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> Path:
    return llama_spm_model(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def bpe_json_path(tmp_path_factory) -> Path:
    return byte_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session", params=["spm", "bpe"])
def hf_llama(request, tmp_path_factory):
    """(kind, dir, transformers model, transformers tokenizer), once per tokenizer kind."""
    out = tmp_path_factory.mktemp(f"hf_llama_{request.param}")
    model, tok = tiny_hf_llama(out, request.param)
    return request.param, out, model, tok


@pytest.fixture(scope="session", params=["gpt2", "neox"])
def hf_family(request, tmp_path_factory):
    """(family, dir, transformers model, AutoTokenizer) of tiny_hf_family, once per family."""
    out = tmp_path_factory.mktemp(f"hf_{request.param}")
    model, tok = tiny_hf_family(out, request.param)
    return request.param, out, model, tok


# SmolLM2-Instruct's chat template (ChatML, a default system turn), as its tokenizer_config.json
# ships it: the template of the one real instruct model the project measures on.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end>"]


def chat_tokenizer(out_dir: Path, template: str, **special):
    """A transformers byte-level BPE tokenizer with ChatML's specials (and "<end>") and the
    chat template, saved into out_dir (transformers writes chat_template.jinja). EOS is
    <|endoftext|>, not a turn terminator, unless special says otherwise."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=CHAT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    special = {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", **special}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special)
    hf.save_pretrained(out_dir)
    return hf
