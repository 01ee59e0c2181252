"""generate.py: greedy output equals transformers' generate, streamed text equals the
decode of the same ids, run-dir/HF-dir resolution, and one-line errors with exit 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from data.bpe import train_tokenizer
from data.streaming import IncrementalDecoder
from cli import UserError, quote_prompt_args
from generate import GenerateConfig, run
from store.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from store.hf import export_hf
from model.sampling import SamplingConfig, generate
from model.transformer import Transformer
from data.chat import chat_template
from experiments.smollm2 import DEFAULT_CACHE as SMOLLM2_CACHE
from hf_fixtures import SMOLLM2_TEMPLATE, chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TRICKY = "def f(x):\n\tif x:\n        return  'héllo wörld ✓ 日本語 🚀'\n\n\nprint(f(1))  # done\n"
CORPUS = [TRICKY, "import os\nimport sys\n\nclass A:\n    pass\n" * 3,
          "for i in range(10):\n    print(i, 'ok')\n" * 4]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(CORPUS, 300, path, hard_vocab_limit=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    """A tiny GQA checkpoint with its tokenizer, weights scaled so greedy picks are clear."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                      d_model=64, max_seq_len=128, init_std=0.3)
    model = Transformer(cfg).eval()
    return save_checkpoint(tmp_path_factory.mktemp("run") / "step_1", model,
                           files={"tokenizer.model": tokenizer.path})


def run_cli(capsys, **kw):
    run(GenerateConfig(**{"max_new_tokens": 24, "device": "cpu", **kw}))
    out = capsys.readouterr()
    return out.out, out.err


def test_stream_equals_nonstreamed_decode(tokenizer):
    """Incremental decoding, one id at a time, reproduces the text exactly."""
    text = TRICKY + "s = '🦀 Ωμέγα'\n"  # characters unseen in training: byte fallback
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # byte-fallback pieces must occur, or the multi-byte hold-back is not exercised
    assert any(tokenizer.sp.is_byte(i) for i in ids)
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cli_stream_matches_generate(ckpt, tokenizer, capsys, temperature):
    """Streamed stdout == non-streamed stdout == decode(generate(...)) with the same seed."""
    prompt = "def f(x):\n\t"
    streamed, err = run_cli(capsys, ckpt=str(ckpt), prompt=prompt, temperature=temperature,
                            top_k=0, seed=7, stop_at_eos=False)
    whole, _ = run_cli(capsys, ckpt=str(ckpt), prompt=prompt, temperature=temperature,
                       top_k=0, seed=7, stop_at_eos=False, stream=False)
    model = load_checkpoint(ckpt).model
    ids = generate(model, tokenizer.encode(prompt), 24, SamplingConfig(temperature, 0, 1.0),
                   generator=torch.Generator().manual_seed(7))[0].tolist()
    assert streamed == whole == tokenizer.decode(ids) + "\n"
    assert "decode:" in err and "KV cache:" in err and "MHA equivalent" in err


def test_cli_compiled_decode_prints_the_same_text(ckpt, capsys):
    args = dict(ckpt=str(ckpt), prompt="class A:\n", temperature=0.0, stop_at_eos=False)
    eager, _ = run_cli(capsys, **args)
    compiled, err = run_cli(capsys, compile=True, **args)
    assert compiled == eager
    assert "decode step compiled in" in err


def test_num_samples_prints_each_sample(ckpt, tokenizer, capsys):
    out, _ = run_cli(capsys, ckpt=str(ckpt), prompt="import", num_samples=3, seed=3,
                     stop_at_eos=False)
    ids = generate(load_checkpoint(ckpt).model, tokenizer.encode("import"), 24, SamplingConfig(0.8, 200, 1.0), num_samples=3,
                   generator=torch.Generator().manual_seed(3))
    expected = [tokenizer.decode(row) for row in ids.tolist()]
    assert out.rstrip("\n").split("\n" + "-" * 40 + "\n") == expected
    assert len(set(expected)) > 1  # the samples differ, so the split really is per sample


def test_cli_greedy_equals_transformers(tmp_path, ckpt, tokenizer, capsys):
    """Same weights: our CLI on our checkpoint and on its HF export, vs HF's greedy generate."""
    transformers = pytest.importorskip("transformers")
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    prompt = "for i in"
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert len(set(ref)) > 3  # a model stuck on one token would prove little
    ours, _ = run_cli(capsys, ckpt=str(ckpt), prompt=prompt, temperature=0, stop_at_eos=False)
    assert ours == tokenizer.decode(ids + ref) + "\n"
    # transformers reads our own tokenizer (no dummy prefix, byte fallback) from the export
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert auto(TRICKY, add_special_tokens=False)["input_ids"] == tokenizer.encode(TRICKY)
    assert auto.decode(ids + ref, skip_special_tokens=True) == tokenizer.decode(ids + ref)
    # the HF dir without a tokenizer: ids in, ids out
    (hf_dir / "tokenizer.model").unlink()
    as_ids, _ = run_cli(capsys, ckpt=str(hf_dir), prompt_ids=ids, temperature=0,
                        stop_at_eos=False)
    assert [int(t) for t in as_ids.split()] == ids + ref


def test_run_dir_uses_latest(tmp_path, ckpt, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").symlink_to(ckpt)
    a, _ = run_cli(capsys, ckpt=str(run_dir), prompt="x", temperature=0)
    b, _ = run_cli(capsys, ckpt=str(ckpt), prompt="x", temperature=0)
    assert a == b


@pytest.mark.parametrize("kw, message", [
    ({"ckpt": "/nonexistent/ckpt"}, "not found"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x " * 200}, "exceeds the model's context"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"dtype": "fp8"}, "dtype='fp8' is unknown"),
    ({"prompt_ids": [1, 99999], "prompt": ""}, "prompt_ids must lie in"),
    ({"prompt_file": "/nonexistent.txt", "prompt": ""}, "cannot read prompt_file"),
    ({"chat": True}, "chat=true needs a chat template"),
    ({"system": "Be brief."}, "system= is a chat turn: add chat=true"),
])
def test_bad_input_is_one_clear_error(ckpt, kw, message):
    with pytest.raises(UserError) as e:
        run(GenerateConfig(**{"ckpt": str(ckpt), "prompt": "x", "device": "cpu", **kw}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hf_dir_without_tokenizer_asks_for_ids(tmp_path, ckpt):
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    (hf_dir / "tokenizer.model").unlink()
    with pytest.raises(UserError, match=r"prompt_ids=\["):
        run(GenerateConfig(ckpt=str(hf_dir), prompt="x", device="cpu"))


def test_compose_rejects_typos_and_wrong_types():
    GlobalHydra.instance().clear()
    import generate  # noqa: F401  (registers the schema)
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = OmegaConf.to_object(compose("generate", ["temperature=0", "prompt_ids=[1,2]"]))
        assert cfg.temperature == 0 and cfg.prompt_ids == [1, 2]
        with pytest.raises(ConfigCompositionException):
            compose("generate", ["tempreature=0"])
        with pytest.raises(ConfigCompositionException):
            compose("generate", ["num_samples=abc"])
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("text", ["def fib(n):", "it's a\\b\\", "${oops} 'q' \"d\"", "a=1, b=[2]"])
def test_prompt_is_taken_verbatim(text):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("generate", quote_prompt_args([f"prompt={text}"]))
        assert cfg.prompt == text
        cfg = compose("generate", quote_prompt_args([f"system={text}"], "system"))
        assert cfg.system == text
    GlobalHydra.instance().clear()


def cli(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], input=stdin,
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_end_to_end_process(ckpt, tmp_path):
    """The real entry point: stdin prompt, stdout text, no files left in the cwd, and a
    bad value is one line on stderr with exit status 2."""
    before = set(os.listdir(ROOT))
    ok = cli(f"ckpt={ckpt}", "prompt_file=-", "max_new_tokens=8", "temperature=0",
             stdin="def f(x):")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("def f(x):") and "tok/s" in ok.stderr
    bad = cli(f"ckpt={ckpt}", "prompt=def fib(n):", "top_p=1.5")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: top_p must be in (0, 1] (1 = off), got 1.5"]
    assert set(os.listdir(ROOT)) == before


def test_int8_kv_cache_from_the_command_line(ckpt, tokenizer):
    """generate.py kv_cache=int8 prints generate(..., kv_cache="int8")'s greedy text and says
    what the int8 cache saves (forced: on AVX2 it gives way to the float cache, test_isa); a
    kv_cache it has not is one line, exit status 2."""
    ok = cli(f"ckpt={ckpt}", "prompt=def f(x):", "max_new_tokens=12", "temperature=0",
             "stop_at_eos=false", "kv_cache=int8", "quant_kernels=force")
    assert ok.returncode == 0, ok.stderr
    ids = generate(load_checkpoint(ckpt).model, tokenizer.encode("def f(x):"), 12,
                   SamplingConfig(temperature=0.0), kv_cache="int8")[0].tolist()
    assert ok.stdout == tokenizer.decode(ids) + "\n"
    assert ", int8 (float: " in ok.stderr, ok.stderr
    bad = cli(f"ckpt={ckpt}", "prompt=def f(x):", "kv_cache=int4")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: kv_cache=int4: Invalid value 'int4', expected one of [float, int8]"], bad.stderr


# ---------------------------------------------------------------- chat templates

CHAT_PROMPT = "class Point:"


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    """A tiny HF Llama dir with SmolLM2's ChatML template whose head rows of <|im_end|> and
    of a token greedy decoding picks a few steps into the answer are swapped: the greedy
    answer now ends with <|im_end|> there. EOS is <|endoftext|>, a different token.
    -> (dir, transformers model, tokenizer, rendered prompt ids)."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("chat_llama")
    tok = chat_tokenizer(out, SMOLLM2_TEMPLATE)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    for p in model.parameters():  # larger than the default init: clear greedy picks
        torch.nn.init.normal_(p, mean=0.0 if p.dim() > 1 else 1.0, std=0.1)
    ids = tok.apply_chat_template([dict(role="user", content=CHAT_PROMPT)],
                                  add_generation_prompt=True)["input_ids"]
    free = hf_greedy(model, ids, 16, eos=None)
    ends = (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id)
    k = next(k for k in range(4, len(free))
             if free[k] not in free[:k] and not set(ends) & set(free[:k + 1]))
    with torch.no_grad():
        head = model.lm_head.weight
        head[[free[k], ends[0]]] = head[[ends[0], free[k]]]
    model.save_pretrained(out)
    return out, model, tok, ids


def hf_greedy(model, ids, max_new_tokens, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_chat_answers_in_the_template_and_stops_at_its_end_of_turn(chat_llama, capsys):
    """chat=true: the answer to the ChatML-rendered prompt, alone, is transformers' greedy
    answer, ending where <|im_end|> comes; the same ids as plain text run on past it."""
    out, model, tok, ids = chat_llama
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ref = hf_greedy(model, ids, 24, eos=[end, tok.eos_token_id])
    assert ref[-1] == end and 4 < len(ref) < 24  # stopped mid-way, at the end of turn
    answer, err = run_cli(capsys, ckpt=str(out), chat=True, prompt=CHAT_PROMPT, temperature=0)
    assert answer == tok.decode(ref[:-1], skip_special_tokens=True) + "\n"
    assert f"prefill: {len(ids)} tokens" in err and f"decode: {len(ref)} steps" in err
    rendered = tok.apply_chat_template([dict(role="user", content=CHAT_PROMPT)], tokenize=False,
                                       add_generation_prompt=True)
    plain, err = run_cli(capsys, ckpt=str(out), prompt=rendered, temperature=0)
    assert f"prefill: {len(ids)} tokens" in err and "decode: 24 steps" in err
    assert plain.startswith(tok.decode(ids, skip_special_tokens=True) + answer.rstrip("\n"))


def test_chat_without_a_template_is_one_line_exit_2(ckpt):
    bad = cli(f"ckpt={ckpt}", "prompt=Hi, there", "chat=true", "system=Be brief, please.")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: chat=true needs a chat template: {ckpt} has no chat_template.jinja and no "
        f"chat_template in tokenizer_config.json"], bad.stderr


SMOLLM2 = Path(SMOLLM2_CACHE).expanduser() / "hf"


@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(),
                    reason="SmolLM2-135M-Instruct not on disk: python -m experiments.smollm2")
def test_smollm2_chat_answer_equals_transformers(capsys):
    """The real instruct model: its template is SmolLM2's ChatML, and chat=true's greedy
    answer equals transformers' generate on apply_chat_template's ids."""
    transformers = pytest.importorskip("transformers")
    assert chat_template(SMOLLM2) == SMOLLM2_TEMPLATE
    tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2)
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32)
    question = "What is the capital of France?"
    ids = tok.apply_chat_template([dict(role="user", content=question)],
                                  add_generation_prompt=True)["input_ids"]
    ref = hf_greedy(model.eval(), ids, 16, eos=model.generation_config.eos_token_id)
    answer, _ = run_cli(capsys, ckpt=str(SMOLLM2), chat=True, prompt=question, temperature=0,
                        max_new_tokens=16)
    assert answer == tok.decode(ref, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("latent_int8, wins", [(0.96, False), (None, False), (1.5, True)])
def test_mla_int8_cache_choice_reads_its_own_measurement(monkeypatch, latent_int8, wins):
    """kv_cache=int8 on an MLA model is judged by latent_int8's figure, never the K/V
    cache's (2.0 here): the float latent cache runs where the int8 one measured slower or
    was not measured, and the line says why; force keeps the int8 cache."""
    import generate as gen
    import model.quantized as mq
    measured = {"kv_int8": 2.0} | ({} if latent_int8 is None else {"latent_int8": latent_int8})
    monkeypatch.setattr(mq, "SPEEDUP", {"TESTCPU": measured})
    monkeypatch.setattr(mq, "CPU_CAPABILITY", "TESTCPU")
    model = Transformer(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16,
                                    max_seq_len=32, kv_rank=8, rope_dim=4))
    cfg = OmegaConf.structured(GenerateConfig(kv_cache="int8"))
    kv, lines = gen.choose_kernels(cfg, model, torch.device("cpu"))
    assert kv == ("int8" if wins else "float")
    assert mq.cpu_choice("latent_int8")[1] in lines[-1]
    cfg.quant_kernels = "force"
    assert gen.choose_kernels(cfg, model, torch.device("cpu"))[0] == "int8"
