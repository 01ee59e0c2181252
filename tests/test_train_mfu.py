"""train.py's GPU-facing options on CPU: MFU and model TFLOP/s in metrics.jsonl, the known
GPUs' peaks, compile=auto, activation checkpointing in the loop."""
from __future__ import annotations

import pytest
import torch

import train as train_mod
import training.config as train_config
from store.checkpoint import load_checkpoint
from model.summary import flops_per_token
from test_train import base, compose_cfg, records, run  # noqa: F401  (base: fixture)


def test_metrics_log_model_tflops_and_mfu_and_checkpointing_changes_no_loss(base, tmp_path):
    common = [*base, "max_steps=3", "eval_every=3", "log_every=1"]
    plain = run([*common, f"run_dir={tmp_path / 'plain'}"])
    ckpt = run([*common, f"run_dir={tmp_path / 'ckpt'}", "activation_checkpointing=true",
                "peak_tflops=0.002"])
    per_token = flops_per_token(load_checkpoint(ckpt.checkpoint).config, 64)
    for step in (1, 2, 3):
        tok_s = records(ckpt.run_dir, "tokens_per_s")[step]
        tflops = records(ckpt.run_dir, "tflops_per_device")[step]
        assert tflops == pytest.approx(per_token * tok_s / 1e12, rel=1e-6)
        assert records(ckpt.run_dir, "mfu")[step] == pytest.approx(tflops / 0.002, rel=1e-6)
        assert records(plain.run_dir, "mfu")[step] is None  # CPU, no peak_tflops: no MFU
        assert records(ckpt.run_dir, "train_loss")[step] == pytest.approx(
            records(plain.run_dir, "train_loss")[step], abs=1e-6)


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA GH200 480GB", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "no", None),  # fp32: the bf16 peak would flatter nothing
    ("Some Future GPU", "bf16", None),
])
def test_peak_tflops_of_known_gpus_by_name(monkeypatch, name, precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda")
    assert train_mod.peak_tflops(None, cuda, precision) == expected
    assert train_mod.peak_tflops(50.0, cuda, precision) == 50.0


def test_peak_tflops_on_cpu_only_when_set():
    assert train_mod.peak_tflops(None, torch.device("cpu"), "no") is None
    assert train_mod.peak_tflops(0.2, torch.device("cpu"), "no") == 0.2


@pytest.mark.parametrize("setting, cuda, cpu", [("auto", True, False), ("true", True, True),
                                                ("True", True, True), ("false", False, False)])
def test_compile_auto_means_cuda_only(base, tmp_path, setting, cuda, cpu):
    cfg = compose_cfg([*base, f"compile={setting}", f"run_dir={tmp_path}"])
    train_config.check_config(cfg)  # normalises compile=True (a bool on the command line)
    assert train_mod.use_compile(cfg, torch.device("cuda")) is cuda
    assert train_mod.use_compile(cfg, torch.device("cpu")) is cpu
