"""bench/gpu_check.sh on a CPU: every section runs at shrunk shapes (or says why it skips),
the CUDA-only checks are marked skip, nothing errors, and the report has the structure
docs/gpu.md describes; one section that raises does not stop the others."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]

STATUSES = {"pass", "fail", "skip", "error"}
CUDA_ONLY = {("train", "mfu_reported"), ("gqa_flash", "flash_kernel"),
             ("decode", "b1_compiled"), ("decode", "b8_compiled"),
             ("quant", "int8_compiled_equals_eager"), ("distill", "fsdp_distill")}


def test_cpu_run_of_the_script_reports_every_section_and_none_errors(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), str(out), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    problems = {k: (s.get("error"), s["checks"]) for k, s in sections.items()
                if s["status"] in ("fail", "error")}
    assert not problems and proc.returncode == 0, (problems, proc.stderr[-2000:])

    assert report["scale"] == "cpu-smoke" and report["device"]["type"] == "cpu"
    assert list(sections) == list(gpu_check.SECTIONS)
    assert report["summary"] == {k: sum(s["status"] == k for s in sections.values())
                                 for k in ("pass", "fail", "skip", "error")}
    for name, section in sections.items():
        assert section["status"] in STATUSES and section["seconds"] >= 0, name
        for check, result in section["checks"].items():
            assert result["status"] in STATUSES, (name, check)
            if (name, check) in CUDA_ONLY:
                assert result["status"] == "skip" and result["reason"], (name, check)
        if section["status"] == "skip":
            assert section.get("reason") or all(c["status"] == "skip"
                                                for c in section["checks"].values()), name
    # what runs on a CPU ran and measured something
    for name in ("train", "distill", "gqa_flash", "decode", "quant"):
        assert sections[name]["status"] == "pass", (name, sections[name])
    train = sections["train"]["figures"]
    assert train["tokens_per_s"] > 0 and train["last_loss"] < train["first_loss"]
    assert sections["fsdp"]["status"] == "skip" and "configs/accelerate/fsdp.yaml" in \
        sections["fsdp"]["figures"]["command"]
    assert sections["quant"]["checks"]["int8_logits_error"]["rel_err"] < 0.05
    assert sections["distill"]["checks"]["teacher_in_bf16"]["status"] == "pass"


def test_a_section_that_raises_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(ctx, sec):
        raise RuntimeError("boom")
    monkeypatch.setitem(gpu_check.RUNNERS, "gqa_flash", broken)
    out = tmp_path / "r.json"
    rc = gpu_check.main(["--device", "cpu", "--out", str(out), "--sections", "gqa_flash,fsdp",
                         "--work", str(tmp_path / "w")])
    sections = json.loads(out.read_text())["sections"]
    assert rc == 1
    assert sections["gqa_flash"]["status"] == "error"
    assert "RuntimeError: boom" in sections["gqa_flash"]["error"]
    assert sections["fsdp"]["status"] == "skip"


@pytest.mark.parametrize("args, message", [
    (["--sections", "train,nope"], "unknown section 'nope'"),
    (["--model-dir", "/nonexistent/model"], "has no config.json"),
    (["--out", "/nonexistent/dir/r.json"], "is not a directory"),
])
def test_bad_arguments_are_one_error_line_and_nothing_written(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", "cpu", "--work", str(tmp_path / "w"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "w").exists()
