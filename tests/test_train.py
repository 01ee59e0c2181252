"""train.py: compose -> train -> checkpoint -> load -> generate, exact resume after SIGKILL,
two CPU processes vs one, config errors, wandb offline files, uptraining."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import evaluation.scoring as scoring  # noqa: E402
import train as train_mod  # noqa: E402  (registers the schema)
import training.config as train_config  # noqa: E402
import training.start as train_start  # noqa: E402
from data.loader import eval_batches, open_tokens  # noqa: E402
from data.tokenizer import Tokenizer, tokenizer_files  # noqa: E402
from store.checkpoint import load_checkpoint, read_meta, save_checkpoint  # noqa: E402
from model.config import ConfigError, ModelConfig  # noqa: E402
from model.sampling import SamplingConfig, generate  # noqa: E402
from model.transformer import Transformer  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
       "PYTHONPATH": str(ROOT)}


def write_corpus(folder: Path) -> None:
    """A learnable pattern: `def fN(x):\\n    return x + N\\n`, N random."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for d in range(40):
        nums = torch.randint(0, 30, (40,), generator=g).tolist()
        (folder / f"doc{d}.py").write_text("".join(f"def f{n}(x):\n    return x + {n}\n"
                                                   for n in nums))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    """Overrides shared by every run: tiny model, the corpus, a data cache in tmp."""
    tmp = tmp_path_factory.mktemp("train")
    write_corpus(tmp / "corpus")
    return ["model=tiny", "data=text_files", f"data.files=[{tmp / 'corpus'}]",
            "data.vocab_size=320", f"data.cache_dir={tmp / 'cache'}", "data.num_proc=1",
            "logger=none", "batch_size=8", "seq_len=64", "eval_batches=2"]


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose(config_name="train", overrides=overrides)


def run(overrides: list[str]) -> train_mod.TrainResult:
    return train_mod.train(compose_cfg(overrides), overrides)


def records(run_dir: Path, key: str) -> dict[int, float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


@torch.no_grad()
def val_loss_of(model, prepared) -> float:
    """Per-token val loss over train.py's eval windows (the last batch may be smaller)."""
    batches = list(eval_batches(prepared.val_bin, prepared.dtype, 64, 8, 2))
    total = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
                for x, y in batches)
    return total.item() / sum(y.numel() for _, y in batches)


def cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=kw.pop("cwd"),
                            env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A 40-step MHA run with wandb offline, kept for the tests that need a checkpoint."""
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    overrides = [*base, f"run_dir={run_dir}", "max_steps=40", "eval_every=20", "log_every=1",
                 "optim.lr=3e-3", "logger=wandb", "logger.wandb.mode=offline"]
    return run(overrides), overrides


def test_end_to_end_learns_and_checkpoint_generates(trained):
    result, overrides = trained
    run_dir = result.run_dir
    assert result.step == 40
    # metrics.jsonl has every logged step and both evals; the loss went down to a bound
    train_loss = records(run_dir, "train_loss")
    assert sorted(train_loss) == list(range(1, 41))
    val = records(run_dir, "val_loss")
    assert sorted(val) == [20, 40] and val[40] == pytest.approx(result.val_loss)
    assert train_loss[1] > math.log(320) - 0.5  # starts near uniform
    assert result.val_loss < 2.0, result.val_loss  # from ~5.8 (uniform over 320)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # wandb offline: a run directory with its log, no network needed
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))

    # checkpoint layout, `latest` -> the newest, keep_last=2
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").resolve() == result.checkpoint == ckpts / "step_40"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_20", "step_40"]
    for name in ("model.safetensors", "config.json", "meta.json", "tokenizer.model",
                 "train_config.yaml", "trainer_state.json", "accelerate/optimizer.bin"):
        assert (result.checkpoint / name).is_file(), name
    meta = read_meta(result.checkpoint)
    assert meta["step"] == meta["max_steps"] == 40 and meta["tokens_seen"] == 40 * 8 * 64
    assert meta["val_loss"] == pytest.approx(result.val_loss)
    saved_cfg = OmegaConf.load(result.checkpoint / "train_config.yaml")
    assert saved_cfg.max_steps == 40 and saved_cfg.model.d_model == 64

    # load -> val loss recomputed independently -> greedy generation follows the pattern
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.config == ModelConfig(vocab_size=ckpt.config.vocab_size, n_layer=2, n_head=8,
                                      d_model=64, ffn_hidden=128, max_seq_len=64)
    tok = Tokenizer.load(ckpt.tokenizer_path)
    prepared = train_mod.prepare_data(train_mod.as_data_config(compose_cfg(overrides).data),
                                      progress=False)
    assert val_loss_of(ckpt.model, prepared) == pytest.approx(result.val_loss, rel=1e-5)
    out = generate(ckpt.model, tok.encode("def f7(x):\n"), 8, SamplingConfig(temperature=0))
    assert tok.decode(out[0].tolist()).startswith("def f7(x):\n    return x + ")


def test_bf16_run_evaluates_and_samples_under_autocast(base, tmp_path):
    """mixed_precision=bf16 (auto's choice on CUDA), here CPU autocast over fp32 weights: the
    eval and the sample at step 2 run under autocast (the sample through a KV cache), and
    the logged val loss is the checkpoint's own under the same autocast. A subprocess:
    Accelerate's state keeps a process's first mixed precision."""
    run_dir = tmp_path / "run"
    proc = cli([*base, f"run_dir={run_dir}", "mixed_precision=bf16", "max_steps=2",
                "eval_every=2", "sample_tokens=8"], cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "sample ('def '):\ndef " in out, out
    logged = records(run_dir, "val_loss")
    assert list(logged) == [2]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "latest")
    prepared = train_mod.prepare_data(train_mod.as_data_config(compose_cfg(base).data),
                                      progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert val_loss_of(ckpt.model, prepared) == pytest.approx(logged[2], rel=1e-3)


def test_eval_sums_in_a_dtype_the_device_has():
    """float64 sums (exact token counts) except on MPS, which has no float64 at all."""
    assert scoring.sum_dtype(torch.device("mps")) == torch.float32
    assert scoring.sum_dtype(torch.device("cpu")) == torch.float64
    assert scoring.sum_dtype(torch.device("cuda", 0)) == torch.float64


def test_lr_schedule_warms_up_then_decays_to_floor():
    optim = OmegaConf.create({"lr": 1.0, "min_lr_ratio": 0.1, "warmup_frac": 0.1})
    lrs = [train_mod.lr_at(s, 100, optim) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert train_mod.lr_at(100, 100, optim) == pytest.approx(0.1)


def test_optimizer_never_decays_norms():
    model = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16))
    opt = train_mod.build_optimizer(model, OmegaConf.create(
        {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}))
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    assert sum(map(len, (decay["params"], no_decay["params"]))) == len(list(model.parameters()))


def test_train_loss_record_is_the_mean_since_the_last_record(base, tmp_path):
    common = [*base, "max_steps=7", "eval_every=7", "grad_accum=2"]
    every = records(run([*common, "log_every=1", f"run_dir={tmp_path / 'a'}"]).run_dir,
                    "train_loss")
    sparse = records(run([*common, "log_every=3", f"run_dir={tmp_path / 'b'}"]).run_dir,
                     "train_loss")
    assert sorted(sparse) == [3, 6, 7]  # and the last step, a shorter interval
    for end, start in ((3, 1), (6, 4), (7, 7)):
        mean = sum(every[s] for s in range(start, end + 1)) / (end - start + 1)
        assert sparse[end] == pytest.approx(mean, rel=1e-5), end


def test_sigkill_then_resume_matches_uninterrupted_run(base, tmp_path):
    common = [*base, "max_steps=60", "eval_every=30", "ckpt_every=3", "log_every=1",
              "keep_last=2"]
    killed_dir = tmp_path / "killed"
    proc = cli([*common, f"run_dir={killed_dir}"], cwd=tmp_path)
    latest = killed_dir / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # land the kill anywhere: mid-step or mid-checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (killed_dir / ".lock").is_file()  # the file stays; its flock died with the process
    killed_at = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert killed_at < 60

    reference = run([*common, f"run_dir={tmp_path / 'reference'}"])
    resumed = run([*common, f"run_dir={killed_dir}", "resume=true"])
    assert resumed.step == reference.step == 60
    ref_loss, res_loss = records(reference.run_dir, "train_loss"), records(killed_dir, "train_loss")
    assert sorted(res_loss) == list(range(1, 61))  # the killed run's extra records were trimmed
    for step in range(1, 61):
        assert res_loss[step] == pytest.approx(ref_loss[step], abs=1e-6), step
    assert resumed.val_loss == pytest.approx(reference.val_loss, abs=1e-6)
    assert not (killed_dir / ".lock").exists()  # taken over without cleanup, released at the end


def killed_after(run_dir: Path, step: int, copy: Path) -> Path:
    """A copy of run_dir as a kill right after checkpoint step_<step> leaves it: the later
    checkpoints gone, `latest` -> step_<step>; their metrics records stay for resume to trim."""
    shutil.copytree(run_dir, copy, symlinks=True)
    ckpts = copy / "checkpoints"
    for later in ckpts.glob("step_*"):
        if int(later.name[5:]) > step:
            shutil.rmtree(later)
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to(f"step_{step}")
    return copy


def saved_config(run_dir: Path, step: int) -> dict:
    """A checkpoint's train_config.yaml, less what names the run rather than trains it."""
    cfg = OmegaConf.load(run_dir / "checkpoints" / f"step_{step}" / "train_config.yaml")
    return {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("run_dir", "resume")}


def test_resume_continues_the_checkpoints_config_exactly_and_extends(base, tmp_path):
    """`resume=true` alone (the README's form) after a run with non-default batch_size,
    seq_len, max_steps and lr, killed after checkpoint 3 of 6: the config is the checkpoint's
    and every record equals the uninterrupted run's, the first train_loss after the resume
    too (ckpt_every=3 is not a multiple of log_every=2). max_steps=8 then extends it."""
    common = [*base, "max_steps=6", "eval_every=6", "ckpt_every=3", "log_every=2",
              "keep_last=5", "optim.lr=3e-3"]
    reference = run([*common, f"run_dir={tmp_path / 'reference'}"])
    killed = killed_after(reference.run_dir, 3, tmp_path / "killed")
    resumed = run([f"run_dir={killed}", "resume=true"])
    assert resumed.step == 6 and resumed.val_loss == pytest.approx(reference.val_loss, abs=1e-6)
    assert sorted(records(killed, "train_loss")) == [2, 4, 6]
    for key in ("train_loss", "lr", "tokens_seen", "grad_norm"):
        assert records(killed, key) == pytest.approx(records(reference.run_dir, key), abs=1e-6), key
    assert saved_config(killed, 6) == saved_config(reference.run_dir, 6)

    extend = [f"run_dir={killed}", "resume=true", "max_steps=8", "log_every=1"]
    assert run(extend).step == 8
    lr, tokens = records(killed, "lr"), records(killed, "tokens_seen")
    assert sorted(lr) == [2, 4, 6, 7, 8] and tokens[8] == 8 * 8 * 64  # batch 8 x 64 tokens
    # the schedule over the new max_steps, at the run's own peak lr
    optim = OmegaConf.create(saved_config(killed, 6)["optim"])
    assert lr[7] == pytest.approx(train_mod.lr_at(6, 8, optim)) and optim.lr == 3e-3
    assert saved_config(killed, 8) == {**saved_config(killed, 6), "max_steps": 8, "log_every": 1}
    record = sorted((killed / ".hydra").glob("resume-*-overrides.yaml"))[-1]
    assert list(OmegaConf.load(record)) == extend
    assert "#   max_steps: 6 -> 8\n#   log_every: 2 -> 1\n" in record.read_text()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): os.readlink(p).encode() if p.is_symlink() else
            p.read_bytes() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


# an override a resume refuses -> what the error says
RESUME_REFUSALS = [
    ("batch_size=4", "cannot change batch_size=4 (the run's: 8): drop the override, or start a "
                     "new run instead"),
    ("optim.lr=0.01", "cannot change optim.lr=0.01 (the run's: 0.003)"),
    ("data.vocab_size=300", "cannot change data.vocab_size=300 (the run's: 320)"),
    ("model=small", "cannot change model.n_layer=6 (the run's: 2), model.d_model=256"),
    ("seed=1", "cannot change seed=1 (the run's: 1337)"),
    ("max_steps=39", "max_steps=39 is below"),
]


@pytest.mark.parametrize("override, message", RESUME_REFUSALS,
                         ids=[override for override, _ in RESUME_REFUSALS])
def test_resume_refuses_overrides_that_would_change_the_run(trained, tmp_path, override,
                                                            message):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0].run_dir, run_dir, symlinks=True)
    before = snapshot(run_dir)
    with pytest.raises(train_mod.TrainError, match=re.escape(message)):
        run([f"run_dir={run_dir}", "resume=true", override])
    assert snapshot(run_dir) == before


def test_fresh_run_replaces_the_logs_of_an_attempt_without_checkpoints(base, tmp_path):
    """An attempt that died before its first checkpoint leaves metrics.jsonl; a fresh run
    in the same dir starts it over instead of appending."""
    args = [*base, f"run_dir={tmp_path / 'run'}", "log_every=1", "eval_every=0"]
    died = run([*args, "max_steps=2"]).run_dir
    shutil.rmtree(died / "checkpoints")
    run([*args, "max_steps=3"])
    steps = [json.loads(line)["step"] for line in (died / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # train_loss at each step, val_loss at the end


def run_two_processes(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """train.py args on two CPU processes (torchrun, gloo); fails the test if it fails."""
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(ROOT / "train.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def odd_val_seq_len(base) -> int:
    """The longest seq_len that cuts the val split into an odd number of windows (the split,
    by a hash of each file's path, changes with tmp_path), so 2 processes get uneven shares."""
    prepared = train_mod.prepare_data(train_mod.as_data_config(compose_cfg(base).data),
                                      progress=False)
    n_tokens = len(open_tokens(prepared.val_bin, prepared.dtype))
    return next(s for s in range(64, 32, -1) if (n_tokens - 1) // s % 2 == 1)


def test_two_cpu_processes_match_one(base, tmp_path):
    """Sequential windows: 2 processes x batch 4 see exactly 1 process x batch 8's batches,
    and both evaluate the whole val split, an odd number of windows, each once."""
    common = [*base, "max_steps=6", "eval_every=6", "log_every=1", "batch_mode=sequential",
              "eval_batches=1000", f"seq_len={odd_val_seq_len(base)}"]  # 1000: all of val
    two_dir = tmp_path / "two"
    proc = run_two_processes([*common, "batch_size=4", f"hydra.run.dir={two_dir}"], tmp_path)
    one = run([*common, f"run_dir={tmp_path / 'one'}"])
    two_loss, one_loss = records(two_dir, "train_loss"), records(one.run_dir, "train_loss")
    assert sorted(two_loss) == sorted(one_loss) == list(range(1, 7))  # no duplicate records
    for step in one_loss:
        assert two_loss[step] == pytest.approx(one_loss[step], rel=1e-4), step
    assert records(two_dir, "val_loss")[6] == pytest.approx(one.val_loss, rel=1e-4)
    # rank 1 wrote nothing but its own RNG state inside rank 0's checkpoint
    files = lambda d: {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
    extra = files(two_dir) - files(one.run_dir)
    assert extra - {p for p in extra if p.startswith(".hydra/")} == {
        "checkpoints/step_6/accelerate/random_states_1.pkl"}
    assert files(one.run_dir) <= files(two_dir)
    assert len(proc.stdout.split("done: 6 steps")) == 2  # one summary, from rank 0


@pytest.mark.parametrize("override, expected", [
    ("model.n_layr=3", "n_layr"),
    ("model.n_layer=abc", "n_layer"),
    ("attention=foo", "attention"),
    ("batch_mode=shuffled", "batch_mode=shuffled"),  # typed choices: the cli line names them
    ("fsdp_reduce_dtype=bf16", "fsdp_reduce_dtype=bf16"),
    ("on_signal=ignore", "on_signal=ignore"),
])
def test_compose_rejects_typos_and_types(base, override, expected):
    with pytest.raises(Exception, match=expected):
        compose_cfg([*base, override])


@pytest.mark.parametrize("override, message", [
    ("attention.n_kv_head=3", "n_head=8 is not divisible by n_kv_head=3"),
    ("seq_len=128", "seq_len=128 exceeds model.max_seq_len=64"),
    ("compile=maybe", r"compile='maybe' is not one of \['auto', 'true', 'false'\]"),
    ("uptrain.alpha=0.05", "uptrain.alpha needs init_from"),
    ("model.norm=batchnorm", "norm='batchnorm' is not one of rmsnorm, layernorm"),
])
def test_invalid_combinations_fail_before_any_work(base, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train_config.check_config(compose_cfg([*base, f"run_dir={tmp_path}", override]))


@pytest.mark.parametrize("preset, switches", [
    ("gpt2", dict(positions="learned", mlp="gelu_tanh", parallel_residual=False, rotary_dim=64)),
    ("pythia", dict(positions="rope", mlp="gelu", parallel_residual=True, rotary_dim=16)),
])
def test_family_presets_build_their_architecture(base, tmp_path, preset, switches):
    cfg = compose_cfg([*base, f"model={preset}", f"run_dir={tmp_path}"])
    train_config.check_config(cfg)
    model = train_config.model_config(cfg, vocab_size=320)
    assert {k: getattr(model, k) for k in switches} == switches
    assert model.norm == "layernorm" and model.attn_bias and model.mlp_bias


def test_cli_errors_are_one_line_and_nonzero(base, tmp_path):
    taken = tmp_path / "taken"
    (taken / "checkpoints" / "step_5").mkdir(parents=True)
    cases = {  # override -> what the single error line must say
        "attention.n_kv_head=3": "error: n_head=8 is not divisible by n_kv_head=3",
        f"run_dir={taken}": f"error: {taken} already has checkpoints",
        f"init_from={tmp_path / 'nowhere'}": "error: checkpoint",
        "resume=true": "error: resume=true but",
    }
    procs = {o: cli([*base, f"run_dir={tmp_path / 'r'}", o] if "run_dir" not in o else [*base, o],
                    cwd=tmp_path) for o in cases}
    typo = cli([*base, "model.n_layr=3"], cwd=tmp_path)
    for override, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (override, err)
        assert err.strip().splitlines() == [err.strip()] and err.startswith(cases[override]), err
    _, err = typo.communicate(timeout=120)
    assert typo.returncode != 0 and "n_layr" in err and "Traceback" not in err


def test_uptrain_converted_checkpoint_runs_alpha_steps_and_improves(base, trained, tmp_path):
    from convert.command import convert_checkpoint
    from convert.heads import Conversion

    source, overrides = trained
    converted = convert_checkpoint(source.checkpoint, tmp_path / "gqa2", Conversion(2))
    result = run([*base, f"run_dir={tmp_path / 'up'}", f"init_from={converted}",
                  "uptrain.alpha=0.25", "attention=gqa", "eval_every=5"])
    assert result.step == round(0.25 * 40)
    # resumed alone, it keeps what init_from derived: alpha's steps, the source's tokenizer
    killed = killed_after(result.run_dir, 5, tmp_path / "killed")
    assert run([f"run_dir={killed}", "resume=true"]).step == 10
    assert records(killed, "train_loss") == pytest.approx(records(result.run_dir, "train_loss"),
                                                          abs=1e-6)
    assert read_meta(killed / "checkpoints/step_10") == read_meta(result.checkpoint)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.config.n_kv_head == 2 and ckpt.config.d_model == 64
    meta = read_meta(result.checkpoint)
    assert meta["source_step"] == 40 and meta["uptrain_alpha"] == 0.25
    assert meta["converted_from"]["path"] == str(source.checkpoint.resolve())
    assert meta["max_steps"] == 10 and meta["init_from"] == str(converted.resolve())
    # recipe from the source: its lr (3e-3), not this config's default
    assert OmegaConf.load(result.checkpoint / "train_config.yaml").optim.lr == 3e-3
    # the uptrained model beats the converted one on the same val windows
    prepared = train_mod.prepare_data(train_mod.as_data_config(compose_cfg(overrides).data),
                                      progress=False)
    assert result.val_loss < val_loss_of(load_checkpoint(converted).model, prepared)

    # converting on load: straight from the MHA checkpoint to MQA
    mqa = run([*base, f"run_dir={tmp_path / 'mqa'}", f"init_from={source.checkpoint}",
               "attention=mqa", "uptrain.alpha=0.05"])
    assert mqa.step == 2 and load_checkpoint(mqa.checkpoint).config.n_kv_head == 1


def test_uptrain_needs_source_steps(base, tmp_path):
    model = Transformer(ModelConfig(vocab_size=320, n_layer=2, n_head=8, d_model=64,
                                    max_seq_len=64))
    bare = save_checkpoint(tmp_path / "bare", model, meta={})
    with pytest.raises(train_mod.TrainError, match="uptrain.source_steps=N, or set max_steps=N"):
        run([*base, f"run_dir={tmp_path / 'r'}", f"init_from={bare}", "uptrain.alpha=0.05"])


@pytest.fixture(scope="module")
def small_source(trained, tmp_path_factory) -> Path:
    """A 1-layer checkpoint with a 96-token context (unlike every model group) and the trained
    run's tokenizer."""
    model = Transformer(ModelConfig(vocab_size=320, n_layer=1, n_head=4, d_model=32,
                                    ffn_hidden=64, max_seq_len=96))
    return save_checkpoint(tmp_path_factory.mktemp("small") / "src", model, meta={"step": 10},
                           files=tokenizer_files(trained[0].checkpoint))


def without(args: list[str], *keys: str) -> list[str]:
    return [a for a in args if a.split("=")[0] not in keys]


def test_init_from_trains_and_records_the_source_model(base, small_source, tmp_path):
    # no model=, no seq_len=: the model group's default (small, 256 tokens) must not count
    args = [*without(base, "model", "seq_len"), f"init_from={small_source}", "max_steps=1",
            "eval_every=0", f"run_dir={tmp_path / 'up'}"]
    result = run(args)
    trained_cfg = load_checkpoint(result.checkpoint).config
    assert read_meta(result.checkpoint)["tokens_seen"] == 8 * 96  # windows of the source's context
    for recorded in (result.checkpoint / "train_config.yaml",
                     result.run_dir / ".hydra" / "config.yaml"):
        cfg = OmegaConf.load(recorded)
        assert cfg.seq_len == 96
        # the recorded config rebuilds the model that was trained
        assert train_config.model_config(cfg, trained_cfg.vocab_size) == trained_cfg


@pytest.mark.parametrize("override, message", [
    ("seq_len=128", r"seq_len=128 exceeds the context of \S*src, max_seq_len=96: pass seq_len=96"),
    ("model.n_layer=5", r"model.n_layer=5 disagrees with \S*src's model \(n_layer=1\): init_from"),
    ("model=tiny", r"model=tiny disagrees with \S*src's model \(n_layer=1, n_head=4, d_model=32, "
                   r"ffn_hidden=64, \.\.\.\)"),
])
def test_init_from_refuses_what_the_source_cannot_train(base, small_source, tmp_path, override,
                                                        message):
    fresh = tmp_path / "cache"
    args = [*without(base, "model", "seq_len", "data.cache_dir"), f"init_from={small_source}",
            f"data.cache_dir={fresh}", f"run_dir={tmp_path / 'up'}", override]
    with pytest.raises(train_mod.TrainError, match=message):
        run(args)
    assert not fresh.exists() and not (tmp_path / "up").exists()  # before any data or run dir


def test_init_from_accepts_model_overrides_that_agree(base, small_source, tmp_path):
    args = [*without(base, "model", "seq_len"), f"init_from={small_source}", "model.n_layer=1",
            "model.max_seq_len=96", "seq_len=48", f"run_dir={tmp_path / 'up'}"]
    cfg = train_start.uptrain_config(compose_cfg(args), small_source, args)
    assert (cfg.seq_len, cfg.model.n_layer, cfg.model.d_model, cfg.model.ffn_hidden) == (48, 1, 32, 64)


def test_uptrain_converts_on_load_with_grouping_and_alignment(base, trained, tmp_path):
    from convert.heads import Conversion, convert_model
    from convert.command import token_windows

    source, overrides = trained
    args = [*base, f"init_from={source.checkpoint}", "attention=gqa", "uptrain.group=similar",
            "uptrain.align=procrustes", "uptrain.calib_windows=4"]
    from hydra.errors import ConfigCompositionException  # a typed choice: refused when composed
    with pytest.raises(ConfigCompositionException, match="override uptrain.group=kmeans"):
        run([*args, f"run_dir={tmp_path / 'bad'}", "uptrain.group=kmeans", "max_steps=1"])
    cfg = train_start.uptrain_config(compose_cfg([*args, f"run_dir={tmp_path / 'x'}"]),
                                   source.checkpoint, args)
    model, provenance = train_start.init_model(cfg, load_checkpoint(source.checkpoint).config.vocab_size)
    src = load_checkpoint(source.checkpoint).model  # the same conversion as convert's
    calib = token_windows(cfg.data, "train", src.config.max_seq_len, 4)
    expected = convert_model(src, Conversion(2, "mean", group="similar", align="procrustes"), calib)
    for a, b in zip(model.state_dict().values(), expected.state_dict().values()):
        assert torch.equal(a, b)
    assert (provenance["uptrain_group"], provenance["uptrain_align"],
            provenance["uptrain_calib_windows"]) == ("similar", "procrustes", 4)
    result = run([*args, f"run_dir={tmp_path / 'up'}", "uptrain.alpha=0.05"])
    meta = read_meta(result.checkpoint)
    assert meta["uptrain_group"] == "similar" and meta["uptrain_align"] == "procrustes"
    assert load_checkpoint(result.checkpoint).config.n_kv_head == 2
