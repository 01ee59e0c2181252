"""Every command's bad invocations: exit 2, no traceback, stderr ends with exactly one
`error:` line saying what is wrong, and nothing written: every pre-existing run and
checkpoint dir (and, for train.py, the data cache) is byte-identical afterwards and no stray dir appears.

One tiny train run is shared by every case. The cases run in two lanes at once, each
lane on its own copy of that run, serially inside the lane, so each case is checked on
its own files. Each case is its own process, forked from one that imported the commands'
libraries once (tests/command_forks.py): a fresh interpreter costs seconds of imports."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
ENV.pop("HYDRA_FULL_ERROR", None)
TRAIN = ["model=tiny", "data=text_files", "data.files=[{corpus}]", "data.vocab_size=320",
         "data.cache_dir={cache}", "data.num_proc=1", "logger=none", "batch_size=4",
         "seq_len=32", "eval_batches=1"]
CKPT = "{run}/checkpoints/step_4"

# (command, arguments, what the error line must say); {run} is a finished 4-step run
# (checkpoints step_2, step_4), {trunc} the same with step_4's weights cut in half,
# {dangling} the same with step_4 deleted, {hf} its HF export, {new} a path that must
# stay absent.
CASES = [
    ("train.py", [*TRAIN, "model.n_layer=abc"], "model.n_layer=abc: Value 'abc'"),
    ("train.py", [*TRAIN, "attention=foo"], "attention=foo is not an option of group attention: "
                                            "choose one of gqa, mha, mla, mqa"),
    ("train.py", [*TRAIN, "model.n_layr=3"], "unknown key model.n_layr: did you mean model.n_layer?"),
    ("train.py", [*TRAIN, "n_head=4"], "unknown key n_head: did you mean model.n_head?"),
    ("train.py", [*TRAIN, "model="], "choose one of gpt2, gpt2s, pythia, small, tiny"),
    ("train.py", [*TRAIN, "max_steps=1.5"], "max_steps=1.5: Value '1.5'"),
    ("train.py", [*TRAIN, "seq_len=${{nosuch}}"], "seq_len: Interpolation key 'nosuch' not found"),
    ("train.py", [*TRAIN, "model.n_layer"], "cannot parse override 'model.n_layer'"),
    ("train.py", [*TRAIN, "hydra.run.dir={run}", "max_steps=20"], "already has checkpoints"),
    ("train.py", [*TRAIN, "run_dir={run}"], "already has checkpoints: resume=true continues it"),
    ("train.py", [*TRAIN, "run_dir={new}", "resume=true"], "resume=true but"),
    ("train.py", [*TRAIN, "resume={trunc}"], "is truncated or corrupt: resume from the newest "
                                             "intact checkpoint with `python train.py resume="
                                             "{trunc}/checkpoints/step_2`"),
    ("train.py", [*TRAIN, "hydra.run.dir={dangling}", "resume=true"],
     "(dangling): resume from the newest intact checkpoint with `python train.py "
     "resume={dangling}/checkpoints/step_2`"),
    ("train.py", [*TRAIN, "run_dir={run}", "resume=true", "data.vocab_size=3"],
     "cannot change data.vocab_size=3 (the run's: 320)"),
    ("train.py", ["hydra.run.dir={run}", "resume=true", "seed=7"],
     "a resume continues {run}/checkpoints/step_4 exactly as its train_config.yaml says and "
     "cannot change seed=7 (the run's: 1337): drop the override, or start a new run instead"),
    ("train.py", [*TRAIN, "run_dir={run}/metrics.jsonl/run"], "Not a directory"),
    ("train.py", [*TRAIN, "attention.n_kv_head=3"], "not divisible by n_kv_head=3"),
    ("train.py", [*TRAIN, "init_from={new}"], "not found"),
    ("train.py", [*TRAIN, "run_dir={new}", f"init_from={CKPT}", "attention.n_kv_head=3"],
     "n_kv_head=3 does not divide the source's 8 KV heads: pick one of [1, 2, 4, 8]"),
    ("train.py", [*TRAIN, "resume={run}", f"init_from={CKPT}"], "pass either resume or init_from"),
    ("train.py", [*TRAIN, "run_dir={new}", f"init_from={CKPT}", "seq_len=128"],
     "seq_len=128 exceeds the context of {run}/checkpoints/step_4, max_seq_len=64: pass "
     "seq_len=64 or less"),
    ("train.py", [*TRAIN, "run_dir={new}", f"init_from={CKPT}", "model.n_layer=3"],
     "model=tiny model.n_layer=3 disagrees with {run}/checkpoints/step_4's model (n_layer=2): "
     "init_from trains the source's own model; drop the model overrides"),
    ("train.py", [*TRAIN, "batch_mode=shuffled"], "batch_mode=shuffled: Invalid value 'shuffled', "
                                                   "expected one of [random, sequential]"),
    ("train.py", [*TRAIN, "--max_steps=3"], "unrecognized arguments: --max_steps=3: settings "
                                             "are key=value overrides, without dashes"),
    ("train.py", [*TRAIN, "run_dir={new}", "+model.n_layr=3"], "+model.n_layr=3 adds a key "
                                                               "model.n_layr that no setting "
                                                               "reads: did you mean model.n_layer?"),
    ("generate.py", ["ckpt={run}", "+tempreature=0.5"], "did you mean temperature?"),
    ("generate.py", ["ckpt={run}", "--cfg"], "argument --cfg/-c: expected one argument: --help"),
    ("generate.py", ["ckpt={run}", "tempreature=0.5"], "unknown key tempreature: did you mean "
                                                       "temperature?"),
    ("generate.py", ["ckpt={run}", "temperature=hot"], "temperature=hot: Value 'hot'"),
    ("generate.py", ["ckpt={dangling}", "prompt=x"], "which does not exist (dangling): pass "
                                                     "ckpt={dangling}/checkpoints/step_2"),
    ("generate.py", ["ckpt={new}"], "not found"),
    ("generate.py", [f"ckpt={CKPT}", "prompt=def", "top_p=1.5"], "top_p must be in (0, 1]"),
    ("generate.py", [f"ckpt={CKPT}", "prompt=def", "quantize=int3"],
     "quantize=int3: Invalid value 'int3', expected one of [none, int8, int8_head,"),
    ("generate.py", [f"ckpt={CKPT}", "prompt=def", "kv_cache=fp8"],
     "kv_cache=fp8: Invalid value 'fp8', expected one of [float, int8]"),
    ("generate.py", [f"ckpt={CKPT}", "prompt=def", "quant_kernels=always"],
     "quant_kernels=always: Invalid value 'always', expected one of [auto, force]"),
    ("generate.py", [f"ckpt={CKPT}", "prompt=def", "max_new_tokens=1000"], "exceeds the model's "
                                                                          "context of 64"),
    ("generate.py", ["ckpt={trunc}/checkpoints/step_4", "prompt=def"], "truncated or corrupt"),
    ("python -m data.prepare", ["data=nosuch"], "data=nosuch is not an option of group data"),
    ("python -m data.prepare", ["data.vocab_sise=3"], "did you mean data.vocab_size?"),
    ("python -m data.prepare", ["data.val_fraction=2"], "data.val_fraction=2.0 must be between"),
    ("python -m data.prepare", ["data=text_files", "data.files=[{corpus}]", "data.vocab_size=3",
                                "data.cache_dir={cache}", "data.num_proc=1"],
     "data.vocab_size=3 is below the 4 special ids (unk, bos, eos, pad)"),
    ("python -m data.prepare", ["data=text_files", "data.files=[{corpus}]", "data.num_proc=1",
                                "data.cache_dir={run}/metrics.jsonl/cache"], "Not a directory"),
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_head=2", f"out={CKPT}", "overwrite=true"],
     "is the source checkpoint itself"),
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_head=2", "out={run}", "overwrite=true"],
     "contains the source checkpoint"),
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_head=3", "out={new}"], "does not divide"),
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_head=2", "out={new}", "align=svd"],
     "align=svd: Invalid value 'svd', expected one of [none, procrustes, linear, linear_readers]"),
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_head=2", "out={hf}"], "already exists"),
    ("python -m convert", ["ckpt={trunc}/checkpoints/step_4", "n_kv_head=2", "out={new}"],
     "truncated or corrupt"),
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_head=2", "out=/dev/null/gqa"],
     "cannot write /dev/null/gqa: File exists (/dev/null): choose an output path in a writable"),
    ("python -m store.quantize", [f"ckpt={CKPT}", "out=/dev/null/int8"], "cannot write "
                                                                        "/dev/null/int8"),
    ("python -m store.quantize", [f"ckpt={CKPT}", "out={new}", "mode=int3"],
     "mode=int3: Invalid value 'int3', expected one of [int8, int8_head, int4, int4_head, "
     "int4_int8head]"),
    ("python -m store.hf", ["export", f"ckpt={CKPT}", "out=/dev/null/hf"], "cannot write "
                                                                          "/dev/null/hf"),
    ("python -m store.hf", [], "no command: python -m store.hf import"),
    ("python -m store.hf", ["frobnicate"], "unknown command 'frobnicate'"),
    ("python -m store.hf", ["import", "hf={new}", "out={run}/hf"], "config.json"),
    ("python -m store.hf", ["export", f"ckpt={CKPT}", "out={hf}"], "already exists: choose a "
                                                                   "new path or pass "
                                                                   "overwrite=true"),
    ("python -m store.hf", ["import", "hf={hf}", "out={hf}", "overwrite=true"],
     "out={hf} is the source checkpoint itself: writing there would destroy it; write to a "
     "new dir, e.g. out={hf}-gqalab"),
    ("python -m store.hf", ["export", f"ckpt={CKPT}", "out={run}", "overwrite=true"],
     "contains the source checkpoint"),
    ("python -m store.hf", ["export", f"ckpt={CKPT}", f"out={CKPT}/hf", "overwrite=true"],
     f"is inside the source checkpoint {CKPT}: write elsewhere, e.g. out={CKPT}-hf"),
    ("python -m store.quantize", [f"ckpt={CKPT}", "out={run}", "overwrite=true"],
     f"pick another out, e.g. out={CKPT}-int8"),
    ("python -m store.quantize", ["ckpt={hf}", "out={new}"], "{hf} is an HF llama model dir: "
                                                             "import it first with `python -m "
                                                             "store.hf import hf={hf} out=<new "
                                                             "dir>`"),
    ("python -m store.hf", ["export", "ckpt={hf}", "out={new}"], "is an HF llama model dir"),
    ("python -m store.hf", ["import", f"hf={CKPT}", "out={new}"], "is already a gqalab "
                                                                  "checkpoint, not an HF model"),
    ("generate.py", ["ckpt={run}", "device=meta"], "device=meta is not available here: use "
                                                   "auto or one of cpu"),
    # a typo in each command's options names the closest key
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_heads=2", "out={new}"],
     "unknown key n_kv_heads: did you mean n_kv_head?"),
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_head=2", "out={new}", "data.file=[a]"],
     "unknown key data.file: did you mean data.files?"),
    ("python -m convert", [f"ckpt={CKPT}", "n_kv_head=2", "out={new}", "data=text_file"],
     "data=text_file is not an option of group data: did you mean data=text_files?"),
    ("python -m store.quantize", [f"ckpt={CKPT}", "out={new}", "mdoe=int8"],
     "unknown key mdoe: did you mean mode?"),
    ("python -m store.hf", ["export", f"ckpt={CKPT}", "out={new}", "overwrit=true"],
     "unknown key overwrit: did you mean overwrite?"),
    ("python -m convert", [f"ckpt={CKPT}", "out={new}"], "missing n_kv_head=...: "
                                                               "python -m convert ckpt="),
    ("evaluate.py", ["ckpt={new}"], "not found: pass an existing directory as ckpt="),
    ("evaluate.py", ["ckpt={corpus}"], "holds no config.json and no checkpoints/latest"),
    ("evaluate.py", ["ckpt={run}", "data=text_files", "data.files=[{corpus}]",
                     "data.cache_dir={cache}", "data.num_proc=1", "data.split_by=line",
                     "data.max_tokens=40"], "fewer than one window of seq_len+1=65: lower "
                                            "seq_len"),
    ("evaluate.py", ["ckpt={run}", "seq_len=16", "stride=32"], "stride=32 must be in [1, "
                                                               "seq_len=16]"),
    ("evaluate.py", ["ckpt={run}", "data.vocab_sise=3"], "did you mean data.vocab_size?"),
    ("evaluate.py", ["ckpt={run}", "data=nosuch"], "data=nosuch is not an option of group data"),
    ("evaluate.py", ["ckpt={run}", "out={run}/metrics.jsonl"], "already exists: choose a new "
                                                               "path or pass overwrite=true"),
]
LANES = 2  # two processes at a time: the test machine has 2 cores


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose(config_name="train", overrides=overrides)


def digest(folder: Path) -> dict[str, str]:
    """Every file and link under folder -> its content hash (or link target)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 4-step tiny run with checkpoints at steps 2 and 4, trained once."""
    import train as train_mod
    from store.hf import export_hf

    tmp = tmp_path_factory.mktemp("cli")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for d in range(12):
        (corpus / f"doc{d}.py").write_text("".join(f"def f{n}(x):\n    return x + {n}\n"
                                                   for n in range(d, d + 30)))
    fill = lambda args: [a.format(corpus=corpus, cache=tmp / "cache") for a in args]
    overrides = [*fill(TRAIN), f"run_dir={tmp / 'world' / 'run'}", "max_steps=4",
                 "eval_every=2", "log_every=1"]
    train_mod.train(compose_train(overrides), overrides)
    world = tmp / "world"
    export_hf(world / "run" / "checkpoints" / "step_4", world / "hf")
    shutil.copytree(world / "run", world / "trunc", symlinks=True)
    weights = world / "trunc" / "checkpoints" / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(world / "run", world / "dangling", symlinks=True)
    shutil.rmtree(world / "dangling" / "checkpoints" / "step_4")
    return tmp, overrides


def run_case(forks: subprocess.Popen, lane: Path, tmp: Path, command: str, args: list[str]
             ) -> dict:
    world = lane / "world"
    names = {name: world / name for name in ("run", "trunc", "dangling", "hf", "new")}
    args = [a.format(corpus=tmp / "corpus", cache=lane / "cache", **names) for a in args]
    cwd = lane / "cwd"
    cwd.mkdir()
    # train.py refuses before it prepares any data; data.prepare may leave the datasets
    # library's own cache entries behind
    cache = lambda: ({f"cache/{k}": v for k, v in digest(lane / "cache").items()}
                     if command == "train.py" else {})
    before = {**digest(world), **cache()}
    head = [str(ROOT / command)] if command.endswith(".py") else ["-m", command.split()[-1]]
    forks.stdin.write(json.dumps({"argv": [*head, *args], "cwd": str(cwd),
                                  "stderr": str(lane / "stderr")}) + "\n")
    forks.stdin.flush()
    rc = json.loads(forks.stdout.readline())["rc"]
    stderr = (lane / "stderr").read_text()
    after = {**digest(world), **cache()}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    stray = sorted(p.name for p in cwd.iterdir())
    shutil.rmtree(cwd)
    return {"rc": rc, "stderr": stderr, "changed": changed, "stray": stray,
            "args": args, "names": names}


@pytest.fixture(scope="module")
def outcomes(fixture_run) -> list[dict]:
    tmp, _ = fixture_run
    lanes = []
    for i in range(LANES):
        lane = tmp / f"lane{i}"
        shutil.copytree(tmp / "world", lane / "world", symlinks=True)
        shutil.copytree(tmp / "cache", lane / "cache", symlinks=True)  # the run's data, prepared
        lanes.append(lane)

    def run_lane(i: int) -> dict[int, dict]:
        with subprocess.Popen([sys.executable, str(ROOT / "tests" / "command_forks.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, text=True,
                              cwd=lanes[i]) as forks:
            try:
                return {c: run_case(forks, lanes[i], tmp, *CASES[c][:2])
                        for c in range(i, len(CASES), LANES)}
            finally:
                forks.stdin.close()

    with ThreadPoolExecutor(LANES) as pool:
        results = {}
        for part in pool.map(run_lane, range(LANES)):
            results.update(part)
    return [results[c] for c in range(len(CASES))]


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{c[0].split()[-1]}:{' '.join(a for a in c[1] if a not in TRAIN)}"
                              for c in CASES])
def test_bad_invocation_is_one_error_line_exit_2_and_writes_nothing(outcomes, case):
    out = outcomes[case]
    err = out["stderr"]
    lines = [line for line in err.splitlines() if line.strip()]
    assert out["rc"] == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, err
    expected = CASES[case][2].format(**out["names"])
    assert expected in lines[-1]
    assert out["changed"] == [], out["changed"]
    assert out["stray"] == []  # no runs/<time>/, no outputs/, no .hydra/
    assert not out["names"]["new"].exists()


def test_run_dir_records_config_only_when_accepted_and_resume_keeps_it(fixture_run, tmp_path):
    """A new run's .hydra/ holds the config it ran with; a resume adds only its overrides."""
    import train as train_mod

    tmp, overrides = fixture_run
    run = tmp / "world" / "run"
    recorded = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert recorded == OmegaConf.create(OmegaConf.to_yaml(compose_train(overrides), resolve=True))
    assert list(OmegaConf.load(run / ".hydra" / "overrides.yaml")) == overrides

    resumed = tmp_path / "run"
    shutil.copytree(run, resumed, symlinks=True)
    more = [o for o in overrides if not o.startswith(("run_dir=", "max_steps="))]
    more += [f"run_dir={resumed}", "resume=true", "max_steps=6"]
    assert train_mod.train(compose_train(more), more).step == 6
    hydra_dir = sorted(p.name for p in (resumed / ".hydra").iterdir())
    assert hydra_dir[:2] == ["config.yaml", "overrides.yaml"] and len(hydra_dir) == 3
    assert hydra_dir[2].startswith("resume-") and hydra_dir[2].endswith("-overrides.yaml")
    assert (resumed / ".hydra" / "config.yaml").read_bytes() == \
        (run / ".hydra" / "config.yaml").read_bytes()
    assert list(OmegaConf.load(resumed / ".hydra" / hydra_dir[2])) == more


def test_hydra_full_error_shows_the_trace(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "attention=foo"], cwd=tmp_path,
                          env={**ENV, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "attention/foo" in proc.stderr


COMMAND_MODULE = {"convert": "convert.command"}  # `python -m convert` runs a package's __main__


@pytest.mark.parametrize("module", ["convert", "store.quantize", "store.hf"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_to_stdout_and_exits_0(module, flag, capsys):
    import importlib
    try:
        code = importlib.import_module(COMMAND_MODULE.get(module, module)).main([flag])
    except SystemExit as e:  # what `python -m` does with either
        code = e.code
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("usage:") and f"python -m {module}" in out and not err


@pytest.mark.parametrize("module, schema", [("convert", "ConvertConfig"),
                                            ("store.quantize", "QuantizeConfig"),
                                            ("store.hf", "HfConfig")])
def test_help_lists_every_option(module, schema, capsys):
    """--help names every field of the command's schema, with its default, and explains it."""
    import dataclasses
    import importlib
    mod = importlib.import_module(COMMAND_MODULE.get(module, module))
    assert mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    defaults, explained = out.split("== Defaults ==")[1].split("Options (key=value")
    for f in dataclasses.fields(getattr(mod, schema)):
        assert f"\n{f.name}:" in defaults, f.name
        assert f"\n  {f.name} " in explained or f"\n  {f.name}=" in explained, f.name


def test_convert_calibrates_on_a_data_group_given_like_train_py(fixture_run, tmp_path, capsys):
    """`data=text_files data.files=[...]` (train.py's overrides) picks the calibration corpus,
    tokenized with the source's own tokenizer; the K/V error is measured on its val split."""
    from store.checkpoint import read_meta
    from convert.command import main as convert_main

    tmp, _ = fixture_run
    out = tmp_path / "gqa"
    code = convert_main([f"ckpt={tmp}/world/run/checkpoints/step_4", "n_kv_head=2",
                         "group=similar", "calib_windows=2", "data=text_files",
                         f"data.files=[{tmp}/corpus]", f"data.cache_dir={tmp_path}/cache",
                         "data.num_proc=1", f"out={out}"])
    assert code == 0, capsys.readouterr().err
    meta = read_meta(out)
    assert meta["converted_from"]["group"] == "similar"
    assert meta["converted_from"]["calib_windows"] == 2 and meta["kv_error"]["windows"] == 2
    prepared = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("text_files-")]
    assert len(prepared) == 1  # its own cache: the corpus was prepared from data.*
    given = json.loads((prepared[0] / "meta.json").read_text())["tokenizer_given"]
    assert Path(given).parent == (tmp / "world/run/checkpoints/step_4").resolve()


def test_exit_status_prints_a_user_error_as_one_line_and_lets_a_bug_through(capsys):
    import cli

    def refused():
        raise cli.UserError("bad setting\n  on two lines")

    assert cli.exit_status(lambda: None) == 0
    assert cli.exit_status(refused) == 2
    assert capsys.readouterr().err == "error: bad setting on two lines\n"
    with pytest.raises(KeyError):
        cli.exit_status(lambda: {}["a bug"])
