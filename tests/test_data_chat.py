"""data/chat.py: the rendered chat equals transformers' apply_chat_template (SmolLM2's
ChatML template and a hand-written one that leans on the sandbox's settings), the
template's source follows transformers' order, and the end-of-turn token is the template's."""
import json
import shutil

import pytest

from data.chat import ChatError, ChatTemplate, chat_template
from data.tokenizer import load_tokenizer
from hf_fixtures import SMOLLM2_TEMPLATE, chat_tokenizer

# Whitespace control (trim_blocks, lstrip_blocks), loop controls, namespace, dict(), tojson
# without HTML escapes or ASCII escapes, raise_exception and the special-token variables:
# each renders differently when the environment is not set up as transformers sets it up.
HANDWRITTEN = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    [{{ ns.turns }}] {{ message['role'] | upper }}: {{ message['content'] | trim }}
    meta {{ dict(role=message['role'], chars=message['content'] | length, note='<a & b>') | tojson }}
<end>
    {% if ns.turns >= 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
    [{{ ns.turns + 1 }}] ASSISTANT:{% endif %}"""

CONVERSATIONS = [
    [dict(role="user", content="The capital of France is")],
    [dict(role="system", content="Be brief."), dict(role="user", content="  café — ✓ 日本語 \n")],
    [dict(role="user", content="a"), dict(role="assistant", content="b"),
     dict(role="user", content="c"), dict(role="assistant", content="d"),
     dict(role="user", content="e")],
]


@pytest.fixture(scope="module", params=["smollm2", "handwritten"])
def chat_dir(request, tmp_path_factory):
    """(template name, dir, transformers tokenizer) with the template in chat_template.jinja."""
    template = SMOLLM2_TEMPLATE if request.param == "smollm2" else HANDWRITTEN
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, chat_tokenizer(out, template)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendered_chat_and_its_ids_equal_transformers(chat_dir, messages):
    _, out, hf = chat_dir
    chat = ChatTemplate.of(load_tokenizer(out))
    for generation_prompt in (True, False):
        text = chat.render(messages, add_generation_prompt=generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation_prompt)
    ids = hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert chat.encode(chat.render(messages)) == ids


def test_the_end_of_turn_token_is_the_one_closing_the_assistant_turn(chat_dir):
    name, out, hf = chat_dir
    expected = {"smollm2": "<|im_end|>", "handwritten": "<end>"}[name]
    assert ChatTemplate.of(load_tokenizer(out)).end_of_turn_id() == \
        hf.convert_tokens_to_ids(expected) != hf.eos_token_id


def test_a_template_that_ends_turns_in_plain_text_has_no_end_of_turn_token(tmp_path):
    chat_tokenizer(tmp_path, "{% for m in messages %}{{ m['content'] }}< {% endfor %}")
    assert ChatTemplate.of(load_tokenizer(tmp_path)).end_of_turn_id() is None


def test_raise_exception_is_one_chat_error(tmp_path):
    chat_tokenizer(tmp_path, HANDWRITTEN)
    with pytest.raises(ChatError, match="unknown role: tool") as e:
        ChatTemplate.of(load_tokenizer(tmp_path)).render([dict(role="tool", content="x")])
    assert "\n" not in str(e.value)


def test_template_sources_follow_transformers(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; a list of named templates gives
    its default; no template anywhere: None for us, None for transformers."""
    from transformers import AutoTokenizer
    chat_tokenizer(tmp_path, SMOLLM2_TEMPLATE)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    cases = {"jinja wins": [dict(name="default", template="config {{ messages }}")],
             "list": [dict(name="tool_use", template="tools"), dict(name="default", template="d")],
             "string": "plain {{ messages[0]['content'] }}", "none": None}
    for case, in_config in cases.items():
        if case != "jinja wins":
            (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
        config_path.write_text(json.dumps({**config, "chat_template": in_config}))
        theirs = AutoTokenizer.from_pretrained(tmp_path).chat_template
        theirs = theirs.get("default") if isinstance(theirs, dict) else theirs
        assert chat_template(tmp_path) == theirs, case
    assert chat_template(tmp_path) is None


def test_a_sentencepiece_only_tokenizer_is_refused_for_chats(tmp_path, spm_model_path):
    shutil.copy(spm_model_path, tmp_path / "tokenizer.model")
    (tmp_path / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)
    chat = ChatTemplate.of(load_tokenizer(tmp_path))
    with pytest.raises(ChatError, match="tokenizer.json"):
        chat.encode(chat.render(CONVERSATIONS[0]))
