"""Chat prompts rendered with a checkpoint's own chat template, as transformers' `apply_chat_template` does.

    render(tokenizer_dir, messages, add_generation_prompt=True, **variables) -> str
    chat_template(tokenizer_dir) -> str

The template is the folder's `chat_template.jinja` if present (transformers saves it there and prefers it),
else `tokenizer_config.json`'s `chat_template` (a string, or a list of {"name", "template"} of which
"default" is used). It is rendered by jinja2 in a sandbox with transformers' conventions: blocks trimmed,
`loopcontrols`, the `tojson` filter keeping non-ASCII text, `raise_exception(message)` and
`strftime_now(format)`, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables.
`messages` is a list of {"role": ..., "content": ...}; `variables` (e.g. `enable_thinking=False`) reach the
template. Tokenize the text without adding special tokens again (`tokenizer.encode(text,
add_special_tokens=False)`): the template already wrote them. Errors are ValueErrors naming the file.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _config(folder: str) -> dict:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected an object")
    return data


def chat_template(tokenizer_dir) -> str:
    """The folder's chat template (see the module docstring); ValueError when it has none."""
    folder = os.fspath(tokenizer_dir)
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = _config(folder).get("chat_template")
    if isinstance(template, list):  # transformers' form for several named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError(f"{folder} has no chat template (neither chat_template.jinja nor a \"chat_template\" in "
                         f"tokenizer_config.json): it is not an instruct checkpoint, or its template was not copied")
    return template


def _special_tokens(folder: str) -> dict:
    """The special tokens' text, as written in tokenizer_config.json (a string or an {"content": ...} entry)."""
    out = {}
    for name, value in _config(folder).items():
        if name in _SPECIAL:
            text = value.get("content") if isinstance(value, dict) else value
            if isinstance(text, str):
                out[name] = text
    return out


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(tokenizer_dir, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """`messages` as the text the checkpoint was trained on (see the module docstring)."""
    import jinja2

    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} objects, got {messages!r:.200}")
    folder = os.fspath(tokenizer_dir)
    try:
        template = _environment().from_string(chat_template(folder))
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template of {folder} does not parse: {e}") from None
    context = dict(_special_tokens(folder), messages=messages, add_generation_prompt=add_generation_prompt,
                   tools=None, documents=None)
    context.update(variables)
    try:
        return template.render(**context)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template of {folder} failed: {e}") from None
