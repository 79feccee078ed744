"""Named chat templates for spec.dataset.chatTemplate, and resolving the field to the Jinja text used.

The trainer renders conversations with the resolved template and exports it beside the model as
chat_template.jinja; the inference server is started with that file (`--chat-template`), so a prompt is
rendered at serving time exactly as it was in training. The named templates are the published layouts:

- chatml: OpenAI's ChatML as used by Qwen and SmolLM (`<|im_start|>role ... <|im_end|>`).
- llama3: Meta Llama 3's header/eot layout (`<|start_header_id|>role<|end_header_id|> ... <|eot_id|>`).
- zephyr: Hugging Face Zephyr's `<|role|>` layout, each turn ended by the tokenizer's own EOS token. Of the
  three it is the one for a base model whose vocabulary lacks dedicated chat tokens: the model learns to stop
  by emitting the EOS token it already has.

Everything else in the field is taken as inline Jinja (it must contain a `{%` or `{{` tag).
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

NAMED: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR}

# What the trainer exports beside the model and names in status.model.chatTemplate.
EXPORT_FILE = "chat_template.jinja"


def is_inline(value: str) -> bool:
    return "{%" in value or "{{" in value


def problem(value: str) -> str | None:
    """Why a chatTemplate value is unusable, or None."""
    if value in NAMED or is_inline(value):
        return None
    return f"{value!r} is neither a named template ({', '.join(NAMED)}) nor inline Jinja (no '{{%' or '{{{{' tag)"


def resolve(value: str) -> str:
    """The Jinja text of a chatTemplate value (a name or inline Jinja)."""
    why = problem(value)
    if why:
        raise ValueError(why)
    return NAMED.get(value, value)
