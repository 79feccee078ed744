"""The inference contract, against the real vLLM OpenAI server on CPU.

The path the operator's Deployment takes, on one machine: a model and a LoRA adapter in S3 (SeaweedFS) ->
`python -m kubetune.fetch` (the init container's command) into local folders -> the vLLM OpenAI server
launched with the arguments `kubetune.vllm.vllm_args` builds -> the `openai` client.

The server is started with the chat_template.jinja the trainer exports for spec.dataset.chatTemplate (zephyr,
which differs from the tokenizer's own ChatML), as the operator's Deployment passes it (--chat-template): one
server start checks both the OpenAI contract and that serving renders a conversation exactly as training did.

Needs the serving venv (tools/serving-venv.sh; scripts/test.sh builds it). The server start-up (~1 min with
--enforce-eager on 2 cores) is paid once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from kubetune import chat_templates
from kubetune.api import parse_spec
from kubetune.fetch import MARKER_NAME
from kubetune.vllm import lora_rank_bucket
from kubetune_cli.localenv.vllm_server import LocalVLLMServer, serving_venv_dir, serving_venv_python
from kubetune_trainer import model as model_lib
from kubetune_trainer.data.encode import Encoder
from kubetune_trainer.data.records import Example

pytestmark = [
    pytest.mark.serving,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        serving_venv_python() is None,
        reason=f"no vLLM serving venv at {serving_venv_dir()}: run tools/serving-venv.sh (or set KUBETUNE_VLLM_VENV)",
    ),
]

SERVED = "tiny-llama"
ADAPTER = "tiny-adapter"
MAX_MODEL_LEN = 512
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a fruit."}]
N_TOKENS = 12
# A random model may emit EOS at once; ignore_eos makes every answer exactly N_TOKENS long.
GREEDY = {"temperature": 0, "max_tokens": N_TOKENS, "extra_body": {"ignore_eos": True}}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _upload_dir(client, bucket: str, prefix: str, src: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        client.upload_file(str(path), bucket, f"{prefix}/{rel}")
        sizes[rel] = path.stat().st_size
    return sizes


def _init_container_fetch(s3_server, uri: str, dest: Path) -> dict:
    """Run the init container's command: `python -m kubetune.fetch s3://... /models/x`."""
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune.fetch", uri, str(dest)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"kubetune.fetch failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fetched_model(s3_server, tiny_llama_artifacts, tmp_path_factory) -> dict[str, Path]:
    """Base model and adapter uploaded to S3, then fetched back into fresh folders as the init container does."""
    client = s3_server.client()
    bucket = f"kt-serving-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    dest_root = tmp_path_factory.mktemp("models")
    out = {}
    for name, src in tiny_llama_artifacts.items():
        sizes = _upload_dir(client, bucket, f"jobs/tiny/{name}", src)
        uri = f"s3://{bucket}/jobs/tiny/{name}"
        dest = dest_root / name
        first = _init_container_fetch(s3_server, uri, dest)
        assert first["skipped"] is False and first["files"] == len(sizes)
        assert first["bytes"] == sum(sizes.values()) == first["downloaded_bytes"]
        for rel in sizes:
            assert _sha256(dest / rel) == _sha256(src / rel), rel
        assert (dest / MARKER_NAME).is_file()
        # A restarted pod finds the completion marker and downloads nothing.
        again = _init_container_fetch(s3_server, uri, dest)
        assert again["skipped"] is True and again["downloaded_bytes"] == 0
        out[name] = dest
    assert (out["base"] / "model.safetensors").is_file()
    assert (out["base"] / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out["base"] / "tokenizer_config.json").read_text()
    )
    assert json.loads((out["adapter"] / "adapter_config.json").read_text())["r"] >= 1
    return out


def _adapter_rank(adapter_dir: Path) -> int:
    return int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])


@pytest.fixture(scope="module")
def trainer_tokenizer(fetched_model, tmp_path_factory) -> tuple[object, Path]:
    """The trainer's tokenizer for a chat job with spec.dataset.chatTemplate zephyr (its real loading code), and
    the chat_template.jinja export.py writes beside the model."""
    spec = parse_spec(
        {
            "model": {"uri": "s3://bucket/base"},
            "output": {"uri": "s3://bucket/out"},
            "dataset": {"train": "s3://bucket/d.jsonl", "format": "chat", "chatTemplate": "zephyr"},
        }
    )
    tok = model_lib.load_tokenizer(spec, fetched_model["base"])
    exported = tmp_path_factory.mktemp("exported")
    tok.save_pretrained(exported)
    template = exported / chat_templates.EXPORT_FILE
    assert template.read_text() == chat_templates.ZEPHYR
    return tok, template


@pytest.fixture(scope="module")
def server(fetched_model, trainer_tokenizer):
    srv = LocalVLLMServer(
        fetched_model["base"],
        SERVED,
        chat_template=str(trainer_tokenizer[1]),
        lora_modules={ADAPTER: fetched_model["adapter"]},
        # The Deployment builder derives this from the adapter's rank the same way.
        max_lora_rank=lora_rank_bucket(_adapter_rank(fetched_model["adapter"])),
        max_model_len=MAX_MODEL_LEN,
        startup_timeout=600,
    )
    with srv:
        print(f"vLLM ready in {srv.ready_seconds:.1f} s at {srv.base_url}")
        yield srv


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.api_base, api_key="unused", max_retries=0, timeout=120)


def _complete(client, model: str) -> str:
    r = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    assert r.model == model
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == N_TOKENS
    return r.choices[0].text


def _chat(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    assert r.model == model
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert r.usage.completion_tokens == N_TOKENS
    return msg.content


def test_server_binds_loopback_only(server):
    assert server.base_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server.base_url + "/health", timeout=10) as r:
        assert r.status == 200


def test_models_lists_served_name_and_adapter(client, server, fetched_model):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {SERVED, ADAPTER}
    extra = {k: m.model_extra or {} for k, m in models.items()}
    assert extra[SERVED].get("root") == str(fetched_model["base"].resolve())
    assert extra[SERVED].get("max_model_len") == MAX_MODEL_LEN
    assert extra[ADAPTER].get("parent") == SERVED


@pytest.mark.parametrize("model", [SERVED, ADAPTER])
def test_completions_plain_and_streamed_agree(client, model):
    text = _complete(client, model)
    assert text
    chunks = list(client.completions.create(model=model, prompt=PROMPT, stream=True, **GREEDY))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize("model", [SERVED, ADAPTER])
def test_chat_completions_plain_and_streamed_agree(client, model):
    content = _chat(client, model)
    assert content
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, stream=True, **GREEDY))
    assert len(chunks) > 1
    streamed = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert streamed == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_adapter_changes_greedy_answers(client):
    base_text, adapter_text = _complete(client, SERVED), _complete(client, ADAPTER)
    assert base_text != adapter_text
    assert _chat(client, SERVED) != _chat(client, ADAPTER)
    # Greedy decoding is deterministic: asking again gives the same answers.
    assert _complete(client, SERVED) == base_text
    assert _complete(client, ADAPTER) == adapter_text


def test_bad_requests_get_clear_4xx_and_server_keeps_serving(client, server):
    import openai

    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert unknown.value.status_code == 404
    assert "no-such-model" in unknown.value.message and "does not exist" in unknown.value.message

    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=MAX_MODEL_LEN * 20)
    assert too_long.value.status_code == 400
    assert "max_tokens" in too_long.value.message and str(MAX_MODEL_LEN) in too_long.value.message

    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": "word " * (2 * MAX_MODEL_LEN)}], max_tokens=4
        )
    assert long_prompt.value.status_code == 400
    assert str(MAX_MODEL_LEN) in long_prompt.value.message

    # Still serving, both the base and the adapter.
    assert server.alive()
    assert _complete(client, SERVED)
    assert _chat(client, ADAPTER)


CONVERSATION = [
    ("system", "You answer in one sentence."),
    ("user", "What is a fortune cookie?"),
    ("assistant", "A crisp cookie with a slip of paper inside."),
    ("user", "Who eats them?"),
]


def _tokenize(server: LocalVLLMServer, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    body = {"model": SERVED, "messages": messages, "add_generation_prompt": generation_prompt}
    body["add_special_tokens"] = False
    req = urllib.request.Request(
        server.base_url + "/tokenize", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["tokens"]


def test_trainer_and_vllm_render_the_same_token_ids(server, trainer_tokenizer) -> None:
    """The trainer's token ids for a conversation (its encoder) equal those vLLM's /tokenize gives for the same
    messages under the exported template; zephyr differs from the tokenizer's own ChatML, so the test fails if
    either side ignores the template."""
    tok = trainer_tokenizer[0]
    enc = Encoder(tok, "chat", 512)
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    prompt_ids = enc._tokenize([enc._render(CONVERSATION, True)], special=False)
    answered = CONVERSATION + [("assistant", "Anyone who orders dessert.")]
    (trained,) = enc.encode([Example(answered, None, None, "", 0)])
    assert trained is not None

    served_prompt = _tokenize(server, messages, True)
    served_full = _tokenize(server, [{"role": r, "content": c} for r, c in answered], False)
    print(f"prompt: {len(served_prompt)} tokens, conversation: {len(served_full)} tokens; identical")
    assert served_prompt == [int(t) for t in prompt_ids[0]]
    assert served_full == [int(t) for t in trained.input_ids]
    assert tok.decode(np.asarray(served_prompt)).startswith("<|system|>\nYou answer in one sentence.")
