"""Serving renders a conversation exactly as training did: the trainer's token ids for a conversation (its real
tokenizer loading with spec.dataset.chatTemplate, and its encoder) equal those the real vLLM CPU server's
/tokenize gives for the same messages, when vLLM is started with the chat_template.jinja the trainer exports
beside the model (--chat-template, as the operator's Deployment passes it). The named template (zephyr) differs
from the tokenizer's own (ChatML), so the test fails if either side ignores it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kubetune import chat_templates
from kubetune.api import parse_spec
from kubetune_cli.localenv.vllm_server import LocalVLLMServer
from kubetune_trainer import model as model_lib
from kubetune_trainer.data.encode import Encoder
from kubetune_trainer.data.records import Example

pytestmark = [pytest.mark.serving, pytest.mark.timeout(900)]

CONVERSATION = [
    ("system", "You answer in one sentence."),
    ("user", "What is a fortune cookie?"),
    ("assistant", "A crisp cookie with a slip of paper inside."),
    ("user", "Who eats them?"),
]


def _tokenize(server: LocalVLLMServer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    body = {
        "model": "tiny",
        "messages": messages,
        "add_generation_prompt": generation_prompt,
        "add_special_tokens": False,
    }
    req = urllib.request.Request(
        server.base_url + "/tokenize", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["tokens"]


def test_trainer_and_vllm_render_the_same_token_ids(tiny_llama_artifacts, tmp_path: Path) -> None:
    base = tiny_llama_artifacts["base"]
    spec = parse_spec(
        {
            "model": {"uri": "s3://bucket/base"},
            "output": {"uri": "s3://bucket/out"},
            "dataset": {"train": "s3://bucket/d.jsonl", "format": "chat", "chatTemplate": "zephyr"},
        }
    )
    tok = model_lib.load_tokenizer(spec, base)
    exported = tmp_path / "model"
    tok.save_pretrained(exported)  # what export.py writes beside the model
    template = exported / chat_templates.EXPORT_FILE
    assert template.read_text() == chat_templates.ZEPHYR

    enc = Encoder(tok, "chat", 512)
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    prompt_ids, _ = enc._tokenize([enc._render(CONVERSATION, True)], special=False)
    answered = CONVERSATION + [("assistant", "Anyone who orders dessert.")]
    (trained,) = enc.encode([Example(answered, None, None, "", 0)])
    assert trained is not None

    with LocalVLLMServer(base, "tiny", max_model_len=512, chat_template=str(template), startup_timeout=720) as srv:
        served_prompt = _tokenize(srv, messages, True)
        served_full = _tokenize(srv, [{"role": r, "content": c} for r, c in answered], False)
    print(f"prompt: {len(served_prompt)} tokens, conversation: {len(served_full)} tokens; identical")
    assert served_prompt == [int(t) for t in prompt_ids[0]]
    assert served_full == [int(t) for t in trained.input_ids]
    assert tok.decode(np.asarray(served_prompt)).startswith("<|system|>\nYou answer in one sentence.")
