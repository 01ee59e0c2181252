"""evaluation/harness.py and evaluation/tasks.py against lm-eval's own HF-transformers
backend (HFLM) on the same tiny random HF dirs: per-item log-likelihoods within 1e-4,
accuracies equal, on a few items of each local task in its original release format."""
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager, get_task_dict  # noqa: E402

from evaluation.harness import GqalabLM  # noqa: E402
from evaluation.tasks import LOCAL_TASKS, run_tasks, task_specs  # noqa: E402
from store.source import load_model  # noqa: E402

ARC = [{"id": "a1", "question": {"stem": "Which is a mammal?", "choices": [
            {"text": "whale", "label": "A"}, {"text": "shark", "label": "B"},
            {"text": "trout and salmon", "label": "C"}]}, "answerKey": "A"},
       {"id": "a2", "question": {"stem": "What do plants need?", "choices": [
           {"text": "light", "label": "1"}, {"text": "darkness", "label": "2"},
           {"text": "salt", "label": "3"}, {"text": "x", "label": "4"}]}, "answerKey": "1"}]
PIQA = [{"goal": "To dry a wet phone,", "sol1": "put it in rice.", "sol2": "put it in water."},
        {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain"}]
WINOGRANDE = [{"qID": "q1", "sentence": "Sarah was a better surgeon than Maria so _ got the "
                                        "easier cases.", "option1": "Sarah", "option2": "Maria",
               "answer": "2"},
              {"qID": "q2", "sentence": "The cup fell off the table because _ was tilted.",
               "option1": "the cup", "option2": "the table", "answer": "2"}]
OBQA = [{"id": "o1", "question_stem": "Fog is most likely around", "choices": {
            "text": ["a marsh", "a desert", "the sun", "dry plains"],
            "label": ["A", "B", "C", "D"]}, "answerKey": "A"}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """The five tasks' original files (as their releases ship them), a few items each."""
    root = tmp_path_factory.mktemp("evalsets")
    write_jsonl(root / "arc_easy" / "dev.jsonl", ARC)
    write_jsonl(root / "arc_challenge" / "dev.jsonl", ARC[::-1])
    write_jsonl(root / "piqa" / "valid.jsonl", PIQA)
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    write_jsonl(root / "winogrande" / "dev.jsonl", WINOGRANDE)
    (root / "winogrande" / "dev-labels.lst").write_text("2\n2\n")
    write_jsonl(root / "openbookqa" / "test.jsonl", OBQA)
    return root


def both(path):
    model, tokenizer = load_model(path, torch.device("cpu"), torch.float32)
    hf = HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=1)
    return GqalabLM(model, tokenizer, batch_size=3), hf


def task_instances(tasks_dir):
    tasks = get_task_dict(task_specs(list(LOCAL_TASKS), str(tasks_dir)),
                          TaskManager(include_defaults=False))
    instances = []
    for task in tasks.values():
        task.build_all_requests(rank=0, world_size=1)
        instances += task.instances
    return instances


def check_against_hflm(path, tasks_dir):
    ours, hf = both(path)
    instances = task_instances(tasks_dir)
    assert len(instances) == 7 + 7 + 4 + 4 + 4  # a request per choice
    mine, theirs = ours.loglikelihood(instances), hf.loglikelihood(instances)
    for (a, greedy_a), (b, greedy_b) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    names = ["arc_challenge", "winogrande"]  # one shared context per item, one per choice
    assert run_tasks(ours, names, str(tasks_dir)) == run_tasks(hf, names, str(tasks_dir))
    return ours, hf


def test_llama_matches_hflm(hf_llama, tasks_dir):
    check_against_hflm(hf_llama[1], tasks_dir)


def test_gpt2_neox_match_hflm(hf_family, tasks_dir):
    ours, hf = check_against_hflm(hf_family[1], tasks_dir)
    # rolling: a document over several 128-token windows (HFLM one window per batch:
    # its batched windows are what HF's own forward gives only one at a time)
    doc = [Instance("loglikelihood_rolling", {}, ("def main(argv):\n    pass\n" * 40,), 0)]
    assert ours.loglikelihood_rolling(doc)[0] == pytest.approx(
        hf.loglikelihood_rolling(doc)[0], abs=1e-3)
    gen = [Instance("generate_until", {}, ("The quick", {"until": ["\n"], "max_gen_toks": 12}),
                    0)]
    assert ours.generate_until(gen) == hf.generate_until(gen)


@pytest.mark.parametrize("latent", [False, True], ids=["gqa", "mla"])
def test_shared_prefix_equals_scoring_alone(hf_llama, latent):
    """One context's K/V reused across choices of different lengths (one token included)
    gives each choice's log-likelihood as a forward of context + choice alone; also over
    MLA's latent cache (the source converted at a reduced rank)."""
    model, tokenizer = load_model(hf_llama[1], torch.device("cpu"), torch.float32)
    if latent:
        from convert.latent import LatentConversion, latent_model
        model = latent_model(model, LatentConversion(kv_rank=24, rope_dim=16), None)[0].eval()
    lm = GqalabLM(model, tokenizer)
    context = lm.tok_encode("Question: which is a mammal?\nAnswer:")
    choices = [tokenizer.encode(" whale"), tokenizer.encode(" a very large shark"), [5]]
    shared = lm.score_shared(context, choices)
    for (score, greedy), choice in zip(shared, choices):
        alone, alone_greedy = lm.score_alone([(context, choice)])[0]
        logits = model(torch.tensor([context + choice])).log_softmax(-1)[0]
        direct = sum(logits[len(context) - 1 + i, t].item() for i, t in enumerate(choice))
        assert score == pytest.approx(alone, abs=1e-4) == pytest.approx(direct, abs=1e-4)
        assert greedy == alone_greedy and not math.isnan(score)


@pytest.mark.parametrize("latent", [False, True], ids=["gqa", "mla"])
def test_int8_cache_scores_equal_decoding_each_choice_through_it(hf_llama, latent):
    """kv_cache="int8": each choice's log-likelihood (shared prefix, rows of one batch, a
    single-choice pair included) equals prefilling its context into a fresh int8 cache and
    decoding the choice one token at a time (model.sampling), and stays near the float
    cache's (the int8 rounding is small on these logits)."""
    from model.sampling import decode_step, new_cache, prefill
    model, tokenizer = load_model(hf_llama[1], torch.device("cpu"), torch.float32)
    if latent:
        from convert.latent import LatentConversion, latent_model
        model = latent_model(model, LatentConversion(kv_rank=24, rope_dim=16), None)[0].eval()
    lm = GqalabLM(model, tokenizer, kv_cache="int8")
    context = lm.tok_encode("Question: which is a mammal?\nAnswer:")
    choices = [tokenizer.encode(" whale"), tokenizer.encode(" a very large shark"), [5]]
    requests = [(None, context, c) for c in choices] + [(None, context[:-2], choices[1])]
    scores = lm._loglikelihood_tokens(requests)
    floats = GqalabLM(model, tokenizer)._loglikelihood_tokens(requests)
    with torch.inference_mode():
        for (_, ctx, choice), (score, _), (float_score, _) in zip(requests, scores, floats):
            cache = new_cache(model, 1, len(ctx) + len(choice), kind="int8")
            logits = [prefill(model, torch.tensor([ctx]), cache)]
            for i, t in enumerate(choice[:-1]):
                logits.append(decode_step(model, torch.tensor([t]),
                                          torch.tensor([len(ctx) + i]), cache, len(ctx) + i + 1))
            direct = sum(lp.log_softmax(-1)[0, t].item() for lp, t in zip(logits, choice))
            assert score == pytest.approx(direct, abs=1e-4)
            assert score == pytest.approx(float_score, abs=0.05 * len(choice))


def test_tasks_render_through_the_sources_chat_template(tmp_path, hf_llama):
    """tasks_chat: the adapter renders the harness's turns as transformers'
    apply_chat_template does on the same template; a source without one is refused."""
    from hf_fixtures import SMOLLM2_TEMPLATE, chat_tokenizer
    from data.tokenizer import load_tokenizer
    hf = chat_tokenizer(tmp_path, SMOLLM2_TEMPLATE)
    tok = load_tokenizer(tmp_path)
    lm = GqalabLM.__new__(GqalabLM)  # the chat methods need the tokenizer alone
    lm.tokenizer = tok
    turns = [dict(role="user", content="Question: 2 + 2?\nAnswer:")]
    for generation in (True, False):
        assert lm.apply_chat_template(turns, generation) == hf.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation)
    assert lm.chat_template(True) == SMOLLM2_TEMPLATE and lm.chat_template(False) == ""
    import evaluate as ev
    cfg = ev.EvaluateConfig(ckpt=str(hf_llama[1]), tasks=["arc_easy"], tasks_chat=True,
                            device="cpu")
    with pytest.raises(ev.EvalError, match="ships none"):
        ev.run(cfg)
