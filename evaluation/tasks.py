"""Zero-shot multiple-choice tasks through lm-evaluation-harness, and their local copies.

`run_tasks(lm, names, tasks_dir, limit)` runs harness tasks on an LM (evaluation/harness.py)
-> {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, samples}}. With tasks_dir, the five
tasks of LOCAL_TASKS read their dataset's original release from tasks_dir/<task>/ (the
files READERS names; no network); every other name (and these too, without tasks_dir) is
the harness's own task, whose dataset comes from the Hub.

The local task definitions are the harness's own (lm_eval/tasks/arc, piqa, winogrande,
openbookqa: prompt, target and choices copied verbatim); each reader turns the original
release into the rows of the Hub dataset those read. acc_norm is the harness's: each
choice's log-likelihood divided by its length in bytes.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from evaluation import EvalError

METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


class TaskError(EvalError):
    """A task or its local files that cannot be read; the message names the fix."""


# ---------------------------------------------------------------- the original releases

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise TaskError(f"{path} not found: tasks_dir must hold <task>/{path.name} in the "
                        f"dataset's original release format (docs/evaluate.md)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def read_labels(path: Path) -> list[str]:
    if not path.is_file():
        raise TaskError(f"{path} not found: tasks_dir must hold the labels file beside the items")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def arc_rows(folder: Path) -> list[dict]:
    """ARC's dev.jsonl: question {stem, choices [{text, label}]}, answerKey."""
    return [{"id": d["id"], "question": d["question"]["stem"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]},
             "answerKey": d["answerKey"]} for d in read_jsonl(folder / "dev.jsonl")]


def piqa_rows(folder: Path) -> list[dict]:
    """PIQA's valid.jsonl (goal, sol1, sol2) with valid-labels.lst (0/1 a line)."""
    items, labels = read_jsonl(folder / "valid.jsonl"), read_labels(folder / "valid-labels.lst")
    check_count(folder, len(items), len(labels))
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}
            for d, label in zip(items, labels)]


def winogrande_rows(folder: Path) -> list[dict]:
    """WinoGrande's dev.jsonl (sentence with _, option1, option2; answer "1"/"2", else from
    dev-labels.lst)."""
    items = read_jsonl(folder / "dev.jsonl")
    if any("answer" not in d for d in items):
        labels = read_labels(folder / "dev-labels.lst")
        check_count(folder, len(items), len(labels))
        items = [{**d, "answer": label} for d, label in zip(items, labels)]
    return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")} for d in items]


def openbookqa_rows(folder: Path) -> list[dict]:
    """OpenBookQA's test.jsonl: question_stem, choices {text [], label []}, answerKey."""
    return [{k: d[k] for k in ("id", "question_stem", "choices", "answerKey")}
            for d in read_jsonl(folder / "test.jsonl")]


def check_count(folder: Path, items: int, labels: int) -> None:
    if items != labels:
        raise TaskError(f"{folder}: {items} items but {labels} labels: the labels file must "
                        f"have one line per item")


# ---------------------------------------------------------------- the harness's definitions

def winogrande_text(doc):  # lm_eval/tasks/winogrande/preprocess_winogrande.py, verbatim
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


ARC = dict(doc_to_text="Question: {{question}}\nAnswer:",
           doc_to_target="{{choices.label.index(answerKey)}}", doc_to_choice="{{choices.text}}")
# task -> (reader, the harness config's prompt fields)
LOCAL_TASKS = {
    "arc_easy": (arc_rows, ARC),
    "arc_challenge": (arc_rows, ARC),
    "piqa": (piqa_rows, dict(doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
                             doc_to_choice="{{[sol1, sol2]}}")),
    "winogrande": (winogrande_rows, dict(doc_to_text=winogrande_text,
                                         doc_to_target=winogrande_target,
                                         doc_to_choice=winogrande_choice)),
    "openbookqa": (openbookqa_rows, dict(
        doc_to_text="question_stem", doc_to_target="{{choices.label.index(answerKey.lstrip())}}",
        doc_to_choice="{{choices.text}}")),
}
ACC_NORM = {"winogrande": False}  # the harness reports acc only for WinoGrande


def local_dataset(task: str, folder: Path, **_) -> dict:
    """The harness's custom_dataset hook: {"validation": the rows} (it passes metadata)."""
    import datasets
    return {"validation": datasets.Dataset.from_list(LOCAL_TASKS[task][0](folder))}


def local_task(task: str, tasks_dir: Path) -> dict:
    """The harness config of a LOCAL_TASKS task, reading tasks_dir/<task>/."""
    folder = tasks_dir / task
    if not folder.is_dir():
        raise TaskError(f"tasks_dir={tasks_dir} has no {task}/ folder: put the dataset's "
                        f"original files there, or drop tasks_dir to read it from the Hub")
    metrics = ["acc", "acc_norm"] if ACC_NORM.get(task, True) else ["acc"]
    return dict(task=task, output_type="multiple_choice", validation_split="validation",
                custom_dataset=partial(local_dataset, task, folder), **LOCAL_TASKS[task][1],
                metric_list=[dict(metric=m, aggregation="mean", higher_is_better=True)
                             for m in metrics], metadata=dict(version=1.0))


def task_specs(names: list[str], tasks_dir: str) -> list:
    """Each name as a local config (with tasks_dir, for LOCAL_TASKS) or the harness's name."""
    if tasks_dir and not Path(tasks_dir).is_dir():
        raise TaskError(f"tasks_dir={tasks_dir} is not a directory")
    return [local_task(n, Path(tasks_dir)) if tasks_dir and n in LOCAL_TASKS else n
            for n in names]


def run_tasks(lm, names: list[str], tasks_dir: str = "", limit: int | None = None,
              chat: bool = False) -> dict:
    """-> {task: {acc, acc_stderr, acc_norm, acc_norm_stderr (None when not reported),
    samples}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    specs = task_specs(names, tasks_dir)
    # indexing the harness's own task files takes seconds: only when a name needs them
    manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))
    out = simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager,
                          log_samples=False, bootstrap_iters=1000, apply_chat_template=chat)
    return {name: task_metrics(out["results"][name], out["n-samples"][name]["effective"])
            for name in names}


def task_metrics(result: dict, samples: int) -> dict:
    value = lambda m: result.get(f"{m},none")
    return {**{m: (None if value(m) in (None, "N/A") else float(value(m))) for m in METRICS},
            "samples": samples}


def check_tasks(names: list[str], tasks_dir: str, limit: int | None) -> None:
    """Before any model loads: lm-eval installed, tasks_dir a folder, limit positive."""
    if not names:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError("tasks= runs lm-evaluation-harness, which is not installed: "
                        "pip install -e '.[eval]'") from None
    task_specs([], tasks_dir)
    if limit is not None and limit <= 0:
        raise TaskError(f"task_limit={limit} must be a positive integer (null: every item)")


def score_tasks(path, names: list[str], tasks_dir: str, limit: int | None, batch_size: int,
                device, dtype, chat: bool = False, kv_cache: str = "float") -> dict:
    """run_tasks on the model at path (any source store.source opens); kv_cache="int8"
    scores every continuation through the int8 cache (GqalabLM)."""
    from evaluation.harness import GqalabLM
    from store.source import load_model
    model, tokenizer = load_model(path, device, dtype)
    if tokenizer is None:
        raise TaskError(f"{path} ships no tokenizer: tasks= scores text, so the model needs "
                        f"its own")
    return run_tasks(GqalabLM(model, tokenizer, batch_size, kv_cache=kv_cache), names, tasks_dir,
                     limit, chat)


def task_average(scores: dict) -> dict:
    """Mean acc and mean acc_norm over the tasks that report each."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {m: mean([t[m] for t in scores.values() if t[m] is not None])
            for m in ("acc", "acc_norm")}


def add_task_scores(rows: list, paths: list, names: list[str], tasks_dir: str,
                    limit: int | None, batch_size: int, device, dtype, chat: bool = False) -> None:
    """Fill each report Row's tasks and task_average (rows and paths in the same order)."""
    for row, path in zip(rows, paths):
        row.tasks = score_tasks(path, names, tasks_dir, limit, batch_size, device, dtype, chat)
        row.task_average = task_average(row.tasks)
