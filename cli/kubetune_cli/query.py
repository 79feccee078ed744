"""Asking a served model something, and telling the user how to do it themselves.

The sample question comes from the job's held-out data (its first record), so the answer can be compared
with the reference the fine-tune learnt from. Chat and instruction records are asked through
/v1/chat/completions (the trainer rendered them with the tokenizer's chat template), completion records
through /v1/completions with the record's first words as the prompt, and preference pairs by their prompt
(the reference shown is the chosen response).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from kubetune import api

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam


@dataclass
class Sample:
    messages: list[dict[str, str]] | None  # chat form
    prompt: str | None  # completion form
    reference: str | None

    @property
    def question(self) -> str:
        if self.messages:
            return self.messages[-1]["content"]
        return self.prompt or ""


def sample_from_record(record: dict[str, Any], dataset: api.DatasetSpec) -> Sample | None:
    f = dataset.fields
    if dataset.format == "chat":
        turns = record.get(f.messages) or []
        if not turns or turns[-1].get("role") != "assistant":
            return None
        return Sample([{"role": t["role"], "content": t["content"]} for t in turns[:-1]], None, turns[-1]["content"])
    if dataset.format == "instruction":
        messages = [{"role": "system", "content": record[f.system]}] if record.get(f.system) else []
        messages.append({"role": "user", "content": record[f.prompt]})
        return Sample(messages, None, record.get(f.response))
    if dataset.format == "completion":
        words = str(record.get(f.text, "")).split()
        return Sample(None, " ".join(words[:8]), " ".join(words[8:40]) or None)
    if dataset.format == "preference":
        return _preference_sample(record, dataset)
    return None


def _preference_sample(record: dict[str, Any], dataset: api.DatasetSpec) -> Sample | None:
    """A preference pair asks its prompt (a text is one user turn); the reference is the chosen response."""
    f = dataset.fields
    prompt, chosen = record.get(f.prompt), record.get(f.chosen or "chosen")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, dict) for t in prompt):
        messages = [{"role": t["role"], "content": t["content"]} for t in prompt]
    else:
        return None
    if isinstance(chosen, list):  # assistant messages
        chosen = "\n".join(str(t.get("content", "")) for t in chosen if isinstance(t, dict)) or None
    return Sample(messages, None, chosen if isinstance(chosen, str) else None)


def first_record(client: Any, uri: str) -> dict[str, Any] | None:
    """The first JSON line of an s3:// object (or of the first object under a prefix); reads 64 KiB at most."""
    from kubetune.fetch import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    listing = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=20).get("Contents", [])
    keys = [o["Key"] for o in listing if o["Key"] == key or o["Key"].endswith((".jsonl", ".json"))]
    if not keys:
        return None
    body = client.get_object(Bucket=bucket, Key=keys[0], Range="bytes=0-65535")["Body"].read()
    for line in body.decode("utf-8", "replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def ask(api_base: str, model: str, sample: Sample, max_tokens: int = 64, timeout: float = 120.0) -> str:
    """The model's greedy answer to the sample (OpenAI client)."""
    import openai

    client = openai.OpenAI(base_url=api_base, api_key="unused", timeout=timeout, max_retries=1)
    if sample.messages:
        messages = cast("list[ChatCompletionMessageParam]", sample.messages)  # {"role", "content"} dicts
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return resp.choices[0].message.content or ""
    completion = client.completions.create(
        model=model, prompt=sample.prompt or "", max_tokens=max_tokens, temperature=0
    )
    return completion.choices[0].text


def howto(api_base: str, model: str, question: str = "Tell me a fortune.") -> str:
    """How to query the endpoint: curl and the openai Python client."""
    q = json.dumps(question)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 64})
    body = body.replace("'", "'\\''")  # inside single quotes in the shell
    return (
        f"curl {api_base}/chat/completions -H 'Content-Type: application/json' \\\n"
        f"  -d '{body}'\n\n"
        "python - <<'EOF'\n"
        "import openai\n"
        f"client = openai.OpenAI(base_url={api_base!r}, api_key='unused')\n"
        f"r = client.chat.completions.create(model={model!r}, max_tokens=64,\n"
        f"    messages=[{{'role': 'user', 'content': {q}}}])\n"
        "print(r.choices[0].message.content)\n"
        "EOF"
    )
