"""Chat templates (pcp_jax.chat, `generate --chat`) against transformers' `apply_chat_template`, on a small
tokenizer with a ChatML-style template built here (no network): the same text and the same token ids, with
the template in tokenizer_config.json or in chat_template.jinja; then `generate --chat` generates from those
ids what the model generates from them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pcp_jax.chat import chat_template, render

SPECIAL = ["<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "You", "are", "helpful", "Hi", "there", "How", "old", "is", "the", "sky",
         "?", ".", "[UNK]", "<think>", "</think>"]
# Loops with loopcontrols, the tojson filter, raise_exception, a special-token variable and a template variable.
TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message.role) }}"
    "{%- endif %}"
    "{%- if message.role == 'system' and not loop.first %}{% continue %}{% endif %}"
    "{{ '<|im_start|>' + message.role + '\n' + message.content + eos_token + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{ '<think> </think> ' }}{% endif %}"
    "{%- endif %}")
MESSAGES = [{"role": "system", "content": "You are helpful ."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hi ."},
            {"role": "user", "content": "How old is the sky ?"}]


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    names = SPECIAL + WORDS
    vocab = {w: i for i, w in enumerate(names)} | {f"w{i}": i for i in range(len(names), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tokenizer folders with TEMPLATE: transformers' save_pretrained (chat_template.jinja) and a
    hand-written tokenizer_config.json holding it; and transformers' tokenizer for each."""
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("chat")
    hf = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(101), eos_token="<|im_end|>", unk_token="[UNK]")
    hf.chat_template = TEMPLATE
    hf.save_pretrained(root / "jinja")
    (root / "config").mkdir()
    _tokenizer(101).save(str(root / "config" / "tokenizer.json"))
    (root / "config" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
         "unk_token": "[UNK]", "chat_template": TEMPLATE}))
    return {name: (root / name, PreTrainedTokenizerFast.from_pretrained(root / name)) for name in ("jinja", "config")}


def _hf_ids(hf, messages, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("where", ["jinja", "config"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_matches_transformers(folders, where, generation_prompt):
    from tokenizers import Tokenizer
    folder, hf = folders[where]
    assert (folder / "chat_template.jinja").exists() == (where == "jinja")
    for kwargs in ({}, {"enable_thinking": False}):
        text = render(folder, MESSAGES, add_generation_prompt=generation_prompt, **kwargs)
        assert text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt,
                                              **kwargs)
        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
        assert ids == _hf_ids(hf, MESSAGES, add_generation_prompt=generation_prompt, **kwargs)


def test_template_errors_are_one_value_error(folders, tmp_path):
    folder, _ = folders["config"]
    with pytest.raises(ValueError, match="the chat template refused the messages: unknown role tool"):
        render(folder, [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="messages must be a list"):
        render(folder, "Hi there")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "x"}))
    with pytest.raises(ValueError, match="has no chat template"):
        chat_template(tmp_path)


def test_generate_chat_generates_from_the_rendered_ids(folders, tmp_path):
    import pcp_jax
    from hf_models import build
    folder = tmp_path / "model"
    build(seed=5).save_pretrained(folder)
    jinja, hf = folders["jinja"]
    for name in os.listdir(jinja):
        (folder / name).write_bytes((jinja / name).read_bytes())
    messages = [MESSAGES[0], {"role": "user", "content": "How old is the sky ?"}]
    want_prompt = _hf_ids(hf, messages, add_generation_prompt=True)
    save = tmp_path / "run.npz"
    r = subprocess.run([sys.executable, "-m", "pcp_jax.cli", "generate", "--model", str(folder), "--chat", "--system",
                        "You are helpful .", "--prompt", "How old is the sky ?", "--max-new-tokens", "4", "--no-eos",
                        "--dtype", "float32", "--save", str(save)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tokens = np.load(save)["tokens"][0]
    assert tokens[:len(want_prompt)].tolist() == want_prompt
    model = pcp_jax.load_model(folder, dtype="float32")
    np.testing.assert_array_equal(tokens, model.generate([want_prompt], 4)[0])
