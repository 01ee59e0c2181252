"""Chat templates: a source's Jinja template, rendered to the same string transformers'
`tokenizer.apply_chat_template(messages, tokenize=False, ...)` gives.

Where the template comes from (transformers' order): `chat_template.jinja` beside the
tokenizer wins over `tokenizer_config.json`'s "chat_template"; a list of named templates
there gives its "default". No template: None.

Rendering replicates transformers' sandbox (utils/chat_template_utils.py): an
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loop controls; a `tojson`
filter that does not escape HTML (json.dumps, ensure_ascii off); the globals
`raise_exception`, `strftime_now`, `dict` and a `namespace` that refuses "_" names; and the
tokenizer's special tokens (bos_token, eos_token, ...: their text, see special_tokens) as
variables beside messages, add_generation_prompt, tools=None and documents=None.

The end-of-turn token is what closes the assistant's turn in the template itself: render
a user turn and an assistant turn whose content is a marker, and take the first of the
tokenizer's special tokens (tokenizer.json's added tokens, sentencepiece's control pieces)
in what follows the marker. ChatML gives <|im_end|>, Llama-3 <|eot_id|>, Llama-2 </s>. A
template that ends turns in plain text has none, and generation stops at EOS alone.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from data.config import DataError
from data.tokenizer import CHAT_TEMPLATE_FILE, CONFIG_FILE, JSON_FILE, SPM_FILE, Tokenizer, \
    read_json

MARKER = "gqalab7marker"  # an assistant reply no template rewrites (trim, tojson, escapes)
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: each a template variable when the tokenizer has it
TEMPLATE_TOKENS = tuple(f"{k}_token" for k in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))


class ChatError(DataError):
    """A template that cannot be read or rendered; one line."""


def chat_template(folder) -> Optional[str]:
    """The chat template of a tokenizer's directory, or None (see the module doc)."""
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = read_json(folder / CONFIG_FILE).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def special_tokens(tok: Tokenizer) -> dict:
    """{bos_token: text, ...}: the variables transformers adds from its special_tokens_map.
    The text of tok's own ids, then what special_tokens_map.json and tokenizer_config.json
    name (the config last: it wins, as in transformers)."""
    ids = dict(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, unk=tok.unk_id)
    texts = {f"{k}_token": tok.token_text(i) for k, i in ids.items() if i is not None}
    for name in (SPECIAL_TOKENS_MAP, CONFIG_FILE):
        config = read_json(tok.path.parent / name) if tok.path else {}
        texts.update({k: token_content(config[k]) for k in TEMPLATE_TOKENS
                      if token_content(config.get(k))})
    return texts


def token_content(value) -> Optional[str]:
    """A special token's text: a string, or an AddedToken's {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def raise_exception(message):
    import jinja2
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ': templates expect the plain JSON text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


class TemplateDict:
    """dict() for templates, without the attributes a sandbox escape would reach for."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def template_namespace():
    """jinja2's namespace, refusing underscore names (no route to CPython internals)."""
    import jinja2

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}")

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=template_namespace())
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template does not parse: {e}") from None


def render_chat(source: str, messages: list, add_generation_prompt: bool = True,
                **variables) -> str:
    """The template's text for messages ([{"role", "content"}]); variables: the special
    tokens (special_tokens) and anything else the template reads."""
    import jinja2
    template = compile_template(source)
    try:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template refused the conversation: {e}") from None


@dataclass
class ChatTemplate:
    """A tokenizer's chat template with the variables it renders with."""

    source: str
    tokenizer: Tokenizer = field(repr=False)

    @classmethod
    def of(cls, tok: Tokenizer) -> Optional["ChatTemplate"]:
        """The template beside tok's files, or None."""
        source = tok.path and chat_template(tok.path.parent)
        return cls(source, tok) if source else None

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        return render_chat(self.source, messages, add_generation_prompt,
                           **special_tokens(self.tokenizer))

    def conversation(self, prompt: str, system: str = "") -> list:
        system_turn = [dict(role="system", content=system)] if system else []
        return system_turn + [dict(role="user", content=prompt)]

    def encode(self, text: str) -> list:
        """A rendered chat's ids, as apply_chat_template(tokenize=True) gives them: the
        special tokens' text becomes their ids, and nothing is added around it."""
        if self.tokenizer.file_name == SPM_FILE:
            raise ChatError(f"chat templates need the source's {JSON_FILE}: {SPM_FILE} alone "
                            f"would read the template's special tokens as plain text")
        return self.tokenizer.encode(text)

    def end_of_turn_id(self) -> Optional[int]:
        """The special token closing the assistant's turn (module doc), or None."""
        turns = [dict(role="user", content="hi"), dict(role="assistant", content=MARKER)]
        _, marker, tail = self.render(turns, add_generation_prompt=False).partition(MARKER)
        found = [(tail.find(text), -len(text), i)  # the first; at one place, the longest
                 for text, i in self.tokenizer.special_tokens().items() if text and text in tail]
        return min(found)[2] if marker and found else None
