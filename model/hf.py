"""HF Llama import/export: key renames and a hand-written config.json.

HF Llama stores q/k in the half-split ("rotate_half") RoPE layout, which is ours too, so
weights move by renaming keys only: no per-head row permutation (the logits-equality tests
prove it). transformers is not imported here; it is a test/bench-only dependency.

    python -m model.hf import hf=<hf llama dir> out=<our checkpoint dir>
    python -m model.hf export ckpt=<our checkpoint dir> out=<hf llama dir>
"""
from __future__ import annotations

import json
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.checkpoint import (CONFIG, TOKENIZER, WEIGHTS, CheckpointError, config_of,
                              load_checkpoint, model_from_state, model_state, replace_dir,
                              save_checkpoint, write_json)
from model.cli_args import ArgError, as_bool, parse_key_values
from model.config import ConfigError, ModelConfig
from model.transformer import Transformer

HF_INDEX = "model.safetensors.index.json"
HF_PICKLE = "pytorch_model.bin"
HF_PICKLE_INDEX = "pytorch_model.bin.index.json"

# Our block-level names -> HF Llama's, for layer i.
LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
TOP_KEYS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}


def hf_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Every one of our state-dict names -> its HF Llama name."""
    names = dict(TOP_KEYS)
    for i in range(cfg.n_layer):
        for ours, theirs in LAYER_KEYS.items():
            names[f"blocks.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def is_hf_llama(path: str | Path) -> bool:
    """A directory whose config.json says it is an HF Llama model."""
    config = Path(path) / CONFIG
    try:
        d = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and (d.get("model_type") == "llama"
                                    or "LlamaForCausalLM" in (d.get("architectures") or []))


# ---------------------------------------------------------------- config

def config_from_hf(d: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
    """An HF LlamaConfig dict -> ModelConfig; refuses features our model does not have."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = [
        (d.get("hidden_act", "silu") != "silu", f"hidden_act={d.get('hidden_act')!r}"),
        (bool(d.get("attention_bias", False)), "attention_bias=true"),
        (bool(d.get("mlp_bias", False)), "mlp_bias=true"),
        (rope_type != "default", f"rope scaling {rope_type!r}"),
    ]
    for bad, what in unsupported:
        if bad:
            raise CheckpointError(f"{source}: {what} is not supported: gqalab models are plain "
                                  f"Llama (SwiGLU, no biases, default RoPE)")
    try:
        n_head = d["num_attention_heads"]
        return ModelConfig(
            vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"],
            head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
            ffn_hidden=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            init_std=float(d.get("initializer_range", 0.02)))
    except KeyError as e:
        raise CheckpointError(f"{source} lacks {e.args[0]!r}: not a complete Llama config") from None
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype, special_ids: dict[str, int]) -> dict:
    """The config.json LlamaForCausalLM.from_pretrained reads, written by hand."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this key
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        **special_ids,
    }


def tokenizer_special_ids(tokenizer: Path | None) -> dict[str, int]:
    """bos/eos/pad ids of a sentencepiece model (absent ids, -1, are left out)."""
    if tokenizer is None:
        return {}
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: v for k, v in ids.items() if v >= 0}


# ---------------------------------------------------------------- weights

def hf_weight_files(path: Path) -> list[Path]:
    """The files holding an HF dir's weights: one file or the shards its index names,
    safetensors before pickled .bin when a dir ships both."""
    for single, index in ((WEIGHTS, HF_INDEX), (HF_PICKLE, HF_PICKLE_INDEX)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            shards = json.loads((path / index).read_text())["weight_map"].values()
            return [path / shard for shard in sorted(set(shards))]
    raise CheckpointError(f"{path} has no {WEIGHTS}, {HF_INDEX}, {HF_PICKLE} or "
                          f"{HF_PICKLE_INDEX}: not an HF model directory")


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF dir (hf_weight_files), in their stored dtype. Each file is
    memory-mapped, shard by shard: nothing is read into memory until used, so the whole
    model is never held twice."""
    state, file = {}, path
    try:
        for file in hf_weight_files(path):
            if file.suffix == ".safetensors":
                state.update(load_file(file))
            else:  # weights_only refuses any pickle that would run code
                state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file} is unreadable as plain weights (it holds objects that "
                              f"would run code): convert it to safetensors from a trusted "
                              f"environment") from None
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError,
            RuntimeError) as e:
        raise CheckpointError(f"{path}: weights are unreadable ({type(e).__name__}: {e})") from None
    return state


def import_hf(path: str | Path, dtype: torch.dtype | None = None) -> Transformer:
    """An HF LlamaForCausalLM directory -> our Transformer (cpu, eval mode) in dtype, by
    default the stored one: a bf16 model stays bf16 and is not copied (model_from_state)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} has no {CONFIG}: pass an HF Llama model directory")
    try:
        hf_config = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG} is unreadable: {e}") from None
    cfg = config_from_hf(hf_config, path / CONFIG)
    theirs = read_hf_weights(path)
    # Old exports keep rotary inv_freq buffers; they are recomputed from rope_theta.
    theirs = {k: v for k, v in theirs.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    to_ours = {hf: ours for ours, hf in hf_key_map(cfg).items()}
    unknown = sorted(k for k in theirs if k not in to_ours)
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors {unknown[:3]}: not a plain Llama model")
    return model_from_state(cfg, {to_ours[k]: v for k, v in theirs.items()}, path, dtype).eval()


def export_hf(source: str | Path | torch.nn.Module, out: str | Path,
              tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Our checkpoint dir (or a model) -> an HF Llama dir that LlamaForCausalLM loads:
    config.json, model.safetensors and tokenizer.model beside them. Written atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists: choose another output or pass overwrite")
    if isinstance(source, torch.nn.Module):
        model = source
    else:
        ckpt = load_checkpoint(source)
        model, tokenizer = ckpt.model, tokenizer or ckpt.tokenizer_path
    cfg = config_of(model)
    names = hf_key_map(cfg)
    state = {names[k]: v.cpu() for k, v in model_state(model).items()}
    dtype = next(iter(state.values())).dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        tokenizer = Path(tokenizer) if tokenizer else None
        write_json(tmp / CONFIG, config_to_hf(cfg, dtype, tokenizer_special_ids(tokenizer)))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- command

USAGE = """usage:
  python -m model.hf import hf=<HF Llama dir> out=<checkpoint dir> [overwrite=true]
  python -m model.hf export ckpt=<checkpoint dir> out=<HF Llama dir> [overwrite=true]"""


def parse_args(argv: list[str]) -> tuple[str, dict[str, str]]:
    if "-h" in argv or "--help" in argv:
        raise SystemExit(USAGE)
    if not argv or argv[0] not in ("import", "export"):
        got = f"unknown command {argv[0]!r}" if argv else "no command"
        raise ArgError(f"{got}: python -m model.hf import hf=<HF dir> out=<checkpoint dir>, "
                       f"or export ckpt=<checkpoint dir> out=<HF dir> (see --help)")
    source = "hf" if argv[0] == "import" else "ckpt"
    return argv[0], parse_key_values(argv[1:], (source, "out"), {"overwrite": "false"},
                                     "see python -m model.hf --help")


def main(argv: list[str]) -> int:
    try:
        command, args = parse_args(argv)
        overwrite = as_bool(args, "overwrite")
        if command == "import":
            model = import_hf(args["hf"])
            tok = Path(args["hf"]) / TOKENIZER
            out = save_checkpoint(args["out"], model, meta={"imported_from": args["hf"]},
                                  files={TOKENIZER: tok} if tok.is_file() else None,
                                  overwrite=overwrite)
        else:
            out = export_hf(args["ckpt"], args["out"], overwrite=overwrite)
    except SystemExit as e:  # --help
        print(e.code)
        return 0
    except (ArgError, CheckpointError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
