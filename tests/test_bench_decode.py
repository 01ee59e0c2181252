"""bench/decode.py's llama.cpp row (section g) without llama-cpp-python: one line saying how
to install it, exit status 0; and `agreement`, which its table and section i's report."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.decode import LLAMA_INSTALL, agreement

ROOT = Path(__file__).resolve().parents[1]


def test_section_g_without_llama_cpp_says_how_to_install_it_and_exits_0(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"")
    cmd = [sys.executable, "-m", "bench.decode", "--section", "g", "--real-model",
           str(tmp_path / "hf"), "--gguf", str(tmp_path / "m.gguf"), "--llama-python",
           str(tmp_path / "no-venv" / "python")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("(g)")]
    expected = (f"(g) skipped: no llama_cpp in {tmp_path / 'no-venv' / 'python'}: install it "
                f"in a venv of its own, {LLAMA_INSTALL} (or pass --llama-python PATH)")
    assert lines == [expected]
    assert not proc.stderr


def test_agreement_counts_leading_equal_ids_per_row():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    ids = torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8]])  # the 4 after a difference does not count
    assert agreement(ids, ref, 4) == "6/8"
    assert agreement(ids, ref, 2) == "4/4"
