"""Peak memory of `store.hf import` and `convert` on a bf16 HF Llama, as a multiple
of the weights' bytes (issue 11, item 5: target <= 2.0x, so 7B bf16 = 13.5 GB fits 24 GB).

    python -m bench.convert_memory                      # 0.95B parameters, 1.9 GB of bf16
    python -m bench.convert_memory --d-model 1024 --ffn 2816   # 0.27B, for a quick look
    python -m bench.convert_memory --repo . --repo /tmp/base   # this code vs another checkout

A synthetic HF Llama dir (config.json + sharded model.safetensors of random bf16 tensors,
written shard by shard, no transformers init) goes in a temporary dir under /tmp, removed
at the end. Each command then runs as a fresh process and its peak RSS is the kernel's
ru_maxrss for that child (os.wait4): anonymous memory plus the file pages it mapped and
touched (safetensors loads by mmap; those pages are page cache the kernel can drop, so
the figure is an upper bound on what must fit). `python -c "import store.hf,
convert"` is measured too: the interpreter and torch alone, part of every figure.

This parent process never imports torch and stays small on purpose: a child's ru_maxrss
starts from its parent's peak (exec keeps the old mm's high-water mark), so building the
dir here would inflate every figure; a child builds it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import options

REPO = Path(__file__).resolve().parents[1]


def hf_llama_shapes(a: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """HF Llama tensor names -> shapes of an MHA model (untied head), written out from
    transformers' layout rather than from store.hf, so the bench measures any checkout."""
    d, f = a.d_model, a.ffn
    shapes = {"model.embed_tokens.weight": (a.vocab, d)}
    for i in range(a.n_layer):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (a.vocab, d)
    return shapes


def build_hf_llama(path: Path, a: argparse.Namespace) -> None:
    """config.json + model-0000k-of-0000n.safetensors + the index, one shard in memory at
    a time. Runs in a child process (see the module docstring)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shards, shard, shard_bytes = [], {}, 0
    for name, shape in hf_llama_shapes(a).items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        t.normal_(1.0 if len(shape) == 1 else 0.0, 0.02, generator=gen)
        shard[name], shard_bytes = t, shard_bytes + t.nbytes
        if shard_bytes >= a.shard_gb * 1e9:
            shards.append(shard)
            shard, shard_bytes = {}, 0
    shards.append(shard)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        total += sum(t.nbytes for t in tensors.values())
        shards[k] = None  # free this shard before the next is written
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": a.vocab, "hidden_size": a.d_model, "intermediate_size": a.ffn,
              "num_hidden_layers": a.n_layer, "num_attention_heads": a.n_head,
              "num_key_value_heads": a.n_head, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "hidden_act": "silu", "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def peak_rss(cmd: list[str], cwd: Path) -> tuple[int, float]:
    """(peak RSS bytes, wall seconds) of one fresh child; exits on its failure."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    output = child.stdout.read().decode()
    child.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{output}")
    return usage.ru_maxrss * 1024, seconds  # Linux reports KiB


def dtypes_of(safetensors_file: Path) -> set[str]:
    """The dtypes in a safetensors header (8-byte length, then JSON), read without torch."""
    with open(safetensors_file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def main() -> None:
    p = options.parser(__doc__, d_model=2048, n_layer=16, n_head=16, ffn=5632, vocab=32000)
    p.add_argument("--n-kv-head", type=int, default=4, help="convert's target")
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--repo", type=Path, action="append",
                   help="a checkout whose code is measured (repeat to compare; default: this one)")
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child's job
    a = p.parse_args()
    if a.build:
        build_hf_llama(a.build, a)
        return

    repos = [r.resolve() for r in a.repo or [REPO]]
    tmp = Path(tempfile.mkdtemp(prefix="convert_memory-", dir="/tmp"))
    try:
        hf = tmp / "hf"
        hf.mkdir()
        shape = [f"--{k.replace('_', '-')}={getattr(a, k)}"
                 for k in ("d_model", "n_layer", "n_head", "ffn", "vocab", "shard_gb")]
        subprocess.run([sys.executable, "-m", "bench.convert_memory", *shape, "--build", str(hf)],
                       cwd=REPO, check=True)
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        weights = index["metadata"]["total_size"]
        print(f"synthetic HF Llama: {weights / 2e9:.2f}B parameters, bf16, {weights / 1e9:.2f} "
              f"GB in {len(set(index['weight_map'].values()))} shards; the machine may be shared "
              f"(wall times are noisy, RSS is not)")
        for i, repo in enumerate(repos):
            print(f"code [{i}]: {repo}")
        print(f"{'step':<28} {'code':>4} {'peak RSS GB':>11} {'x weights':>9} {'wall s':>7}  output")
        for name, cmd, out in steps(hf, tmp, a.n_kv_head):
            for i, repo in enumerate(repos):  # the checkouts take turns, step by step
                rss, seconds = peak_rss(cmd(i), repo)
                written = ""
                if out is not None:
                    file = out(i) / "model.safetensors"
                    written = (f"{file.stat().st_size / 1e9:.2f} GB, "
                               f"{'/'.join(sorted(dtypes_of(file)))}")
                print(f"{name:<28} {f'[{i}]':>4} {rss / 1e9:>11.2f} {rss / weights:>9.2f} "
                      f"{seconds:>7.1f}  {written}", flush=True)
        print("target: peak RSS <= 2.0x the weights' bytes for import and convert")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def steps(hf: Path, tmp: Path, n_kv_head: int) -> list:
    """(name, code index -> command, code index -> output dir or None); each checkout
    imports and converts into its own dirs."""
    py = sys.executable
    ckpt, gqa = (lambda i: tmp / f"ckpt{i}"), (lambda i: tmp / f"gqa{i}")
    return [
        ("python + torch only", lambda i: [py, "-c", "import store.hf, convert"], None),
        ("store.hf import", lambda i: [py, "-m", "store.hf", "import", f"hf={hf}",
                                       f"out={ckpt(i)}"], ckpt),
        (f"convert n_kv_head={n_kv_head}",
         lambda i: [py, "-m", "convert", f"ckpt={ckpt(i)}", f"n_kv_head={n_kv_head}",
                    f"out={gqa(i)}"], gqa),
    ]

if __name__ == "__main__":
    main()
