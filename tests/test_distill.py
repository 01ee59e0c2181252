"""Distillation during uptraining (training/distill.py): the loss against hand-written
references, λ = 0 is plain uptraining bit for bit, the teacher is the unconverted source,
two CPU processes (DDP or FSDP2, the teacher replicated) match one, and bf16 keeps a bf16
teacher."""
from __future__ import annotations

import json

import pytest
import torch

from test_train import cli, records, run, run_two_processes, write_corpus
from test_train_fsdp import launch_fsdp
from store.checkpoint import CheckpointError, read_meta, save_checkpoint
from model.config import ConfigError
from convert.command import convert_checkpoint
from convert.heads import Conversion
from training.distill import kl_loss, mix, teacher_source
from model import ModelConfig, Transformer


def test_kl_value_and_gradient_match_hand_written_references():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    for tau in (1.0, 2.5):
        loss = kl_loss(student, teacher, tau)
        p_t = torch.softmax(teacher / tau, -1)
        p_s = torch.softmax(student / tau, -1)
        expected = tau ** 2 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-6, atol=1e-7)
        grad, = torch.autograd.grad(loss, student)
        # d/dz of τ² KL(p_t ‖ softmax(z/τ)), averaged over the 15 tokens: τ (p_s − p_t) / N
        torch.testing.assert_close(grad, (tau * (p_s - p_t) / 15).to(grad.dtype),
                                   rtol=1e-5, atol=1e-7)
    assert kl_loss(student, student.detach(), 2.0).item() == 0.0  # a student equal to its teacher
    ce, kl = torch.tensor(2.0), torch.tensor(0.5)
    assert mix(ce, kl, 0.0) == ce and mix(ce, kl, 1.0) == kl and mix(ce, kl, 0.25) == 1.625


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(overrides shared by every run, a 4-step tiny MHA checkpoint with its tokenizer)."""
    tmp = tmp_path_factory.mktemp("distill")
    write_corpus(tmp / "corpus")
    base = ["data=text_files", f"data.files=[{tmp / 'corpus'}]", "data.vocab_size=320",
            f"data.cache_dir={tmp / 'cache'}", "data.num_proc=1", "logger=none", "batch_size=8",
            "seq_len=32", "eval_batches=1", "eval_every=0", "log_every=1", "sample_tokens=4"]
    result = run([*base, "model=tiny", "max_steps=4", "optim.lr=3e-3", f"run_dir={tmp / 'mha'}"])
    return base, result.checkpoint


def uptrain(source, run_dir, *more):
    base, ckpt = source
    return run([*base, f"init_from={ckpt}", "attention=gqa", "max_steps=3", "optim.lr=1e-3",
                f"run_dir={run_dir}", *more])


def weights(result):
    return (result.checkpoint / "model.safetensors").read_bytes()


def test_lambda_zero_is_plain_uptraining_bit_for_bit(source, tmp_path, capsys):
    plain = uptrain(source, tmp_path / "plain")
    zero = uptrain(source, tmp_path / "zero", "uptrain.distill=0", "uptrain.distill_temperature=3")
    assert "distill:" not in capsys.readouterr().out  # no teacher built
    assert weights(zero) == weights(plain)
    assert records(zero.run_dir, "train_loss") == records(plain.run_dir, "train_loss")
    assert not records(zero.run_dir, "distill_kl")
    meta = read_meta(zero.checkpoint)
    assert not any(k.startswith("uptrain_distill") for k in meta)
    half = uptrain(source, tmp_path / "half", "uptrain.distill=0.5", "uptrain.distill_temperature=2")
    assert "distill: λ=0.5 τ=2.0, teacher" in capsys.readouterr().out
    assert weights(half) != weights(plain)  # the teacher's term changes the updates
    assert records(half.run_dir, "train_loss")[1] == records(plain.run_dir, "train_loss")[1]  # CE
    kl = records(half.run_dir, "distill_kl")
    assert sorted(kl) == [1, 2, 3] and all(v > 0 for v in kl.values())
    line = json.loads((half.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["teacher_s_per_step"] > 0 and line["teacher_bytes"] > 0
    assert line["teacher_logits_bytes"] == 8 * 32 * 320 * 4  # (B, T, V) fp32
    meta = read_meta(half.checkpoint)
    assert (meta["uptrain_distill"], meta["uptrain_distill_temperature"]) == (0.5, 2.0)


def test_a_student_equal_to_its_teacher_has_zero_kl(source, tmp_path):
    """Uptraining without conversion (the same KV heads): at the first step, before any
    update, student and teacher are the same model."""
    base, ckpt = source
    result = run([*base, f"init_from={ckpt}", "max_steps=2", f"run_dir={tmp_path / 'self'}",
                  "uptrain.distill=1"])
    kl = records(result.run_dir, "distill_kl")
    assert kl[1] == 0.0 and kl[2] > 0


def test_the_teacher_is_the_source_a_conversion_recorded(tmp_path):
    model = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_head=4, d_model=16, max_seq_len=8))
    src = save_checkpoint(tmp_path / "mha", model, meta={"step": 1})
    out = convert_checkpoint(src, tmp_path / "gqa", Conversion(2))
    assert teacher_source(out).path == teacher_source(src).path == src.resolve()
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight.add_(1.0)
    save_checkpoint(src, model, meta={"step": 1}, overwrite=True)
    with pytest.raises(CheckpointError, match="changed since"):
        teacher_source(out)


@pytest.mark.parametrize("override, message", [
    ("uptrain.distill=1.5", r"must lie in \[0, 1\]"),
    ("uptrain.distill_temperature=0", "must be positive"),
])
def test_bad_distill_settings_are_refused(source, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        uptrain(source, tmp_path / "bad", override)
    with pytest.raises(ConfigError, match="uptrain.distill needs init_from"):
        run([*source[0], "uptrain.distill=0.5", f"run_dir={tmp_path / 'bad'}"])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("launch", ["ddp", "fsdp"])
def test_two_cpu_processes_distill_like_one(source, tmp_path, launch):
    """DDP and FSDP2 with a replicated teacher: 2 processes x batch 4 see 1 process x
    batch 8's sequential batches; the CE and the KL records agree."""
    base, ckpt = source
    common = [*base, f"init_from={ckpt}", "attention=mqa", "max_steps=3", "batch_mode=sequential",
              "uptrain.distill=0.5", "uptrain.distill_temperature=2"]
    two_dir = tmp_path / "two"
    two_args = [*common, "batch_size=4", f"hydra.run.dir={two_dir}"]
    out = (run_two_processes(two_args, tmp_path).stdout if launch == "ddp"
           else launch_fsdp(two_args, tmp_path))
    assert out.count("distill: λ=0.5") == 1  # the startup line, from rank 0
    assert launch != "fsdp" or "FSDP2 mixed precision:" in out  # the student is sharded
    one = run([*common, f"run_dir={tmp_path / 'one'}"])
    for key in ("train_loss", "distill_kl"):
        two, single = records(two_dir, key), records(one.run_dir, key)
        assert sorted(two) == sorted(single) == [1, 2, 3]
        for step in single:
            assert two[step] == pytest.approx(single[step], rel=1e-4), (key, step)


def test_bf16_distills_with_a_bf16_teacher(source, tmp_path):
    """mixed_precision=bf16 (CPU autocast here, CUDA in bench/gpu_check.py): the teacher
    holds bf16 weights, half the fp32 run's bytes, and its logits are bf16; the losses stay
    near the fp32 run's at the same batches."""
    fp32 = uptrain(source, tmp_path / "fp32", "uptrain.distill=0.5")
    base, ckpt = source  # a subprocess: Accelerate keeps a process's first mixed precision
    proc = cli([*base, f"init_from={ckpt}", "attention=gqa", "max_steps=3", "optim.lr=1e-3",
                f"run_dir={tmp_path / 'bf16'}", "uptrain.distill=0.5", "mixed_precision=bf16"],
               cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "of torch.bfloat16 weights per process" in out
    first = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[0])
    full, half = first(fp32.run_dir), first(tmp_path / "bf16")
    assert half["teacher_bytes"] * 2 == full["teacher_bytes"]
    assert half["teacher_logits_bytes"] * 2 == full["teacher_logits_bytes"]
    for key, rel in (("train_loss", 1e-3), ("distill_kl", 2e-2)):  # measured: 4e-5, 1e-3
        assert half[key] == pytest.approx(full[key], rel=rel), key


def test_the_loop_backpropagates_the_mix_at_a_quarter_and_tau_two(source, tmp_path, monkeypatch):
    """λ = 0.25, τ = 2 inside train.py: each micro-batch's loss handed to backward is
    0.75·CE + 0.25·τ²·KL(teacher_τ ‖ student_τ), written out here from the student's own logits
    on that batch and the source checkpoint's logits (the teacher, loaded independently).
    At λ = 0, 0.5 or 1 a swap of the two terms would change nothing."""
    import accelerate
    from data.loader import TokenStream
    from store.checkpoint import load_checkpoint
    lam, tau = 0.25, 2.0
    batches, student, backward = [], [], []
    next_batch, original_backward = TokenStream.next_batch, accelerate.Accelerator.backward
    monkeypatch.setattr(TokenStream, "next_batch",
                        lambda self: batches.append(next_batch(self)) or batches[-1])

    def spy(self, loss, **kw):
        backward.append(loss.detach().clone())
        return original_backward(self, loss, **kw)

    def hook(module, args, output):  # the student's training forwards carry a graph
        if isinstance(module, Transformer) and output.requires_grad:
            student.append(output.detach().clone())

    monkeypatch.setattr(accelerate.Accelerator, "backward", spy)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = uptrain(source, tmp_path / "quarter", "grad_accum=2", f"uptrain.distill={lam}",
                         f"uptrain.distill_temperature={tau}")
    finally:
        handle.remove()
    assert len(batches) == len(student) == len(backward) == 6  # 3 steps x 2 micro-batches
    teacher = load_checkpoint(source[1]).model.eval()
    kls = []
    for (x, y), logits, loss in zip(batches, student, backward):
        with torch.no_grad():
            t = teacher(x).double() / tau
        s = logits.double() / tau
        p_t, log_p_s = torch.softmax(t, -1), torch.log_softmax(s, -1)
        kl = tau ** 2 * (p_t * (torch.log_softmax(t, -1) - log_p_s)).sum(-1).mean()
        ce = -torch.log_softmax(logits.double(), -1).gather(-1, y[..., None]).mean()
        assert loss.item() == pytest.approx(((1 - lam) * ce + lam * kl).item(), rel=1e-5)
        kls.append(kl.item())
    assert min(kls) > 1e-3  # a converted student differs from its teacher: the KL term counts
    recorded = records(result.run_dir, "distill_kl")  # the mean over each step's micro-batches
    for step in (1, 2, 3):
        assert recorded[step] == pytest.approx(sum(kls[2 * step - 2:2 * step]) / 2, rel=1e-4)
