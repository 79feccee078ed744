"""Tokenisation of clean examples into token ids and loss labels, per format.

- chat / instruction: the turns are rendered with the tokenizer's chat template (instruction records are a
  [system], user, assistant chat), so the fine-tuned model is queried the way vLLM's /v1/chat/completions
  renders requests. Loss is on assistant turns only: each assistant turn's character span in the rendered text
  runs from the end of the conversation-so-far rendered with add_generation_prompt (so the "assistant" header
  is masked) to the end of the conversation rendered through that turn (so the end-of-turn token is learned and
  the model learns to stop). Rendering every prefix costs a template run per turn, so the template's assistant
  header and end-of-turn suffix are found once with a probe chat and each record is rendered once, its spans
  found as header + content + suffix; a record where that does not match takes the prefix renders. The whole
  text is tokenised once, and a token is a target when its first character lies inside an assistant span. The
  template is the tokenizer's own or spec.dataset.chatTemplate (set on the tokenizer when it is loaded); a
  tokenizer with neither is refused rather than given an ad-hoc layout the inference server would not use.
- completion: the text (with the tokenizer's own BOS, if it adds one) plus EOS unless the text was cut at
  maxSeqLength, every token a target.
- classification: the text (with BOS if the tokenizer adds one); the label is the class id.
- preference: prompt + chosen and prompt + rejected, each rendered with the chat template like a chat whose
  last assistant turn(s) are the response; only the response's tokens are targets. The two sequences share one
  row (the rejected one starts at `boundary`, with its own positions), so a pair is never split apart.

Everything is truncated to maxSeqLength tokens.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.records import Example

IGNORE = -100  # the label value torch's cross-entropy skips
CONVERSATIONAL = ("chat", "instruction", "preference")  # rendered with the chat template, masked by spans

# Rendered conversations: (text, assistant character spans) each.
_Rendered = list[tuple[str, list[tuple[int, int]]]]


@dataclass(slots=True)
class Encoded:
    input_ids: np.ndarray  # int32, 1-D
    labels: np.ndarray | None  # int32 token targets (IGNORE where masked); None for classification
    label: int | None  # class id for classification
    boundary: int | None = None  # preference: where the rejected sequence starts (the chosen one is before it)


class Encoder:
    """Tokenises batches of Examples of one format with one tokenizer."""

    def __init__(self, tokenizer: Any, fmt: str, max_seq_length: int):
        self.tok = tokenizer
        self.fmt = fmt
        self.max_len = max_seq_length
        self._fast = getattr(tokenizer, "backend_tokenizer", None)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_id or 0)
        # Control tokens written by the template must never come from the data: a "<|im_end|>" inside a message
        # would be tokenised as the real end-of-turn token and silently change what the model learns.
        specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        conversational = fmt in CONVERSATIONAL
        if conversational and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"format {fmt}: the base model's tokenizer has no chat template; set spec.dataset.chatTemplate "
                "(chatml, llama3, zephyr or inline Jinja) so training and serving render conversations alike"
            )
        if conversational and self._fast is None:
            raise DataError(f"format {fmt} needs a fast tokenizer: masking maps tokens to characters by offsets")
        self._direct = _direct_renderer(tokenizer) if conversational else None
        if self._direct is not None and not self._direct_agrees():
            self._direct = None
        self._turn_markers = self._probe_template() if conversational else None
        self._starts_in_order = self._fast is not None and _starts_in_order(self._fast)

    # -------------------------------------------------------------------------------------- rendering

    def _render(self, turns: list[tuple[str, str]], generation_prompt: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in turns]
        if self._direct is not None:
            return self._direct(messages, generation_prompt)
        return self._apply_template(messages, generation_prompt)

    def _apply_template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return cast(  # tokenize=False: the rendered text
            str,
            self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt),
        )

    def _direct_agrees(self) -> bool:
        """Whether the direct render gives apply_chat_template's text on probe chats (with a system turn, two
        rounds, control-looking and non-ASCII text, with and without the generation prompt); if not, every
        record takes apply_chat_template."""
        assert self._direct is not None
        probe = [
            {"role": "system", "content": "Be brief. \u00e9\u4e2d"},
            {"role": "user", "content": "q1 {{ x }} {% raw %}"},
            {"role": "assistant", "content": " a1\n\n"},
            {"role": "user", "content": "q2"},
        ]
        try:
            return all(
                self._direct(chat, g) == self._apply_template(chat, g)
                for chat in (probe[1:2], probe[:3], probe)
                for g in (False, True)
            )
        except Exception:  # noqa: BLE001 - a template that refuses a probe: keep the library's own path
            return False

    def _probe_template(self) -> tuple[str, str] | None:
        """(assistant header, end-of-turn suffix) of the chat template, found by rendering a probe chat, or None
        when the template does not render turns as header + content + suffix (then every record takes the
        slow path)."""
        u, a = "probe-user-7c1e", "probe-assistant-9f3b"
        try:
            user_only = self._render([("user", u)], False)
            prompt = self._render([("user", u)], True)
            both = self._render([("user", u), ("assistant", a)], False)
        except Exception:  # noqa: BLE001 - a template that refuses the probe (e.g. demands a system turn)
            return None
        if not (prompt.startswith(user_only) and both.startswith(prompt + a)):
            return None
        header, suffix = prompt[len(user_only) :], both[len(prompt) + len(a) :]
        return (header, suffix) if header else None

    def render_with_spans(self, turns: list[tuple[str, str]], skip: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns (the loss targets); the
        assistant turns among the first `skip` turns are context, not targets (a preference prompt's)."""
        full = self._render(turns, False)
        spans = self._spans_by_markers(full, turns) if self._turn_markers is not None else None
        if spans is None:
            spans = self._spans_by_prefixes(full, turns)
        if skip:
            context = sum(1 for r, c in turns[:skip] if r == "assistant" and c)
            spans = spans[context:]
        return full, spans

    def _spans_by_markers(self, full: str, turns: list[tuple[str, str]]) -> list[tuple[int, int]] | None:
        # One render per record: each assistant turn is found as header + content + suffix, in order. The
        # header holds control tokens, which records may not contain (control_token), so the match cannot land
        # inside a user's text.
        assert self._turn_markers is not None
        header, suffix = self._turn_markers
        spans, cursor = [], 0
        for role, content in turns:
            if role != "assistant" or not content:
                continue
            at = full.find(header + content + suffix, cursor)
            if at < 0:
                return None
            start = at + len(header)
            cursor = start + len(content) + len(suffix)
            spans.append((start, cursor))
        return spans

    def _spans_by_prefixes(self, full: str, turns: list[tuple[str, str]]) -> list[tuple[int, int]]:
        # Each assistant span runs from the end of the conversation so far rendered with the generation prompt
        # to the end of the conversation rendered through that turn.
        spans: list[tuple[int, int]] = []
        last = len(turns) - 1
        for i, (role, content) in enumerate(turns):
            if role != "assistant" or not content:
                continue
            # transformers refuses to render an empty conversation: a chat that opens with the assistant has no
            # prefix to render and goes straight to the content search below.
            start_text = self._render(turns[:i], True) if i else ""
            end = len(full) if i == last else len(self._render(turns[: i + 1], False))
            if full.startswith(start_text) and start_text:
                start = len(start_text)
            else:
                # The template does not render this prefix as a prefix of the whole (e.g. it injects a default
                # system prompt only when rendering from the first message): fall back to finding the content.
                start = full.find(content, spans[-1][1] if spans else 0)
                if start < 0:
                    continue
                end = max(end, start + len(content))
            spans.append((start, end))
        return spans

    # -------------------------------------------------------------------------------------- encoding

    def _tokenize(self, texts: list[str], special: bool) -> list[np.ndarray]:
        """Token ids per text, truncated to maxSeqLength.

        Each encoding becomes a small int32 array right away: a batch of Python int lists would cost ~36 bytes
        a token, the arrays 4.
        """
        if self._fast is not None:
            encs = self._fast.encode_batch(texts, add_special_tokens=special)
            return [np.asarray(e.ids[: self.max_len], dtype=np.int32) for e in encs]
        out = self.tok(texts, add_special_tokens=special)
        return [np.asarray(x[: self.max_len], dtype=np.int32) for x in out["input_ids"]]

    def has_control_token(self, ex: Example) -> bool:
        if self._special_re is None or ex.messages is None:
            return False
        texts = ex.messages + (ex.chosen or []) + (ex.rejected or [])
        return any(self._special_re.search(c) for _, c in texts)

    def encode(self, examples: list[Example]) -> list[Encoded | None]:
        """One Encoded per example, or None when nothing is left to learn after truncation (e.g. a prompt longer
        than maxSeqLength leaves no response tokens)."""
        if not examples:
            return []
        if self.fmt in CONVERSATIONAL:
            rendered = self._render_batch(examples)
            return self._finish_turns(rendered, self._tokenize_rendered(rendered))
        ids_list = self._tokenize([ex.text or "" for ex in examples], special=True)
        out: list[Encoded | None] = []
        for ex, ids in zip(examples, ids_list):
            if self.fmt == "completion":
                fits = len(ids) < self.max_len
                if self.eos_id is not None and fits and (len(ids) == 0 or ids[-1] != self.eos_id):
                    # The document boundary the model learns to emit. A text cut at maxSeqLength gets none:
                    # it does not end there, and the model should not learn to stop mid-sentence.
                    ids = np.append(ids, np.int32(self.eos_id))
                out.append(Encoded(ids, ids.copy(), None))
            else:
                out.append(Encoded(ids, None, ex.label))
        return out

    def encode_batches(self, batches: Iterable[list[Example]]) -> Iterator[list[Encoded | None]]:
        """encode() of each batch, in order.

        For conversations the tokenizer works on one batch in a thread of its own while this one finishes the
        batch before (targets, and whatever the caller does with it: packing) and renders the next: the
        tokenizer runs native code without the GIL, so the two overlap where a core is free. Same work, same
        order of results."""
        if self.fmt not in CONVERSATIONAL:
            yield from map(self.encode, batches)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-tokenize") as pool:
            pending: tuple[_Rendered, Future[list[Any]]] | None = None
            for batch in batches:
                rendered = self._render_batch(batch)
                started = (rendered, pool.submit(self._tokenize_rendered, rendered))
                if pending is not None:
                    yield self._finish_turns(pending[0], pending[1].result())
                pending = started
            if pending is not None:
                yield self._finish_turns(pending[0], pending[1].result())

    def _render_batch(self, examples: list[Example]) -> _Rendered:
        """The batch's conversations rendered with their assistant spans; a preference pair is two of them
        (prompt + chosen, prompt + rejected)."""
        if self.fmt == "preference":
            convs = [
                c
                for ex in examples
                for c in ((ex.messages or []) + (ex.chosen or []), (ex.messages or []) + (ex.rejected or []))
            ]
            skips = [len(ex.messages or []) for ex in examples for _ in range(2)]
        else:
            convs, skips = [ex.messages or [] for ex in examples], [0] * len(examples)
        return [self.render_with_spans(turns, skip) for turns, skip in zip(convs, skips)]

    def _tokenize_rendered(self, rendered: _Rendered) -> list[Any]:
        assert self._fast is not None  # conversational formats refuse a slow tokenizer (__init__)
        # A chat template writes its own BOS if the model wants one (as vLLM renders it, without adding another).
        return cast(list[Any], self._fast.encode_batch([text for text, _ in rendered], add_special_tokens=False))

    def _finish_turns(self, rendered: _Rendered, encs: list[Any]) -> list[Encoded | None]:
        sides = self._encoded_turns(rendered, encs)
        return _pairs(sides) if self.fmt == "preference" else sides

    def _encoded_turns(self, rendered: _Rendered, encs: list[Any]) -> list[Encoded | None]:
        ids, ends = self._flat_ids(encs)
        target = self._targets(encs, rendered, ends)
        labels = np.where(target, ids, np.int32(IGNORE))  # int32 like ids
        targets_before = np.concatenate([[0], np.cumsum(target)])
        targets_per_record = np.diff(targets_before[np.concatenate([[0], ends])])
        out: list[Encoded | None] = []
        begin = 0
        for end, targets in zip(ends.tolist(), targets_per_record.tolist()):
            out.append(Encoded(ids[begin:end], labels[begin:end], None) if targets else None)
            begin = end
        return out

    def _flat_ids(self, encs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """The batch's token ids (int32), every text's truncated to maxSeqLength, concatenated; and where each
        text's tokens end in them. One array per batch rather than one per text: the fast tokenizer hands back
        Python lists, and filling one array from all of them costs less than building thousands of small ones."""
        ids = [e.ids[: self.max_len] for e in encs]
        ends = np.cumsum([len(x) for x in ids], dtype=np.int64)
        total = int(ends[-1]) if len(ends) else 0
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total), ends

    def _targets(self, encs: list[Any], rendered: _Rendered, ends: np.ndarray) -> np.ndarray:
        """Which tokens of the batch (records' tokens concatenated, record i's ending at ends[i]) start inside
        one of their own record's assistant spans.

        Reading every token's offsets costs more than the tokenizer's own work on them (a Python tuple per
        token), so where token starts never decrease along the text, a span's targets are the run of tokens
        from the first one starting at or after its start to the first one starting at or after its end, found
        with a few lookups at the two edges. A record whose edges do not show that plainly takes every offset.
        """
        total = int(ends[-1]) if len(ends) else 0
        opens: list[int] = []
        closes: list[int] = []
        by_offsets: list[int] = []
        begin = 0
        for i, (enc, (text, spans), end) in enumerate(zip(encs, rendered, ends.tolist())):
            runs = _span_runs(enc, len(text), spans, end - begin) if self._starts_in_order else None
            if runs is None:
                by_offsets.append(i)
            else:
                opens.extend(begin + a for a, _ in runs)
                closes.extend(begin + b for _, b in runs)
            begin = end
        # Runs never overlap (spans do not), so +1 where one opens and -1 where it closes sum to 1 inside it.
        edges = np.bincount(opens, minlength=total + 1) - np.bincount(closes, minlength=total + 1)
        target = np.cumsum(edges[:total]) > 0
        for i in by_offsets:
            begin = int(ends[i - 1]) if i else 0
            target[begin : ends[i]] = _in_spans(encs[i].offsets[: ends[i] - begin], rendered[i][1])
        return target


def _pairs(sides: list[Encoded | None]) -> list[Encoded | None]:
    """Each preference pair (its two sides consecutive) as one Encoded: prompt + chosen, then prompt + rejected
    from `boundary` on."""
    out: list[Encoded | None] = []
    for chosen, rejected in zip(sides[0::2], sides[1::2]):
        if chosen is None or rejected is None:
            out.append(None)  # truncation left one side without response tokens: no comparison
            continue
        assert chosen.labels is not None and rejected.labels is not None
        out.append(
            Encoded(
                np.concatenate([chosen.input_ids, rejected.input_ids]),
                np.concatenate([chosen.labels, rejected.labels]),
                None,
                len(chosen.input_ids),
            )
        )
    return out


def _starts_in_order(backend: Any) -> bool:
    """Whether token starts never decrease along the text, whatever the text: true of every pre-tokenizer and
    model (they split and merge in order), but not once a Unicode normaliser may reorder combining marks."""
    normalizer = getattr(backend, "normalizer", None)
    if normalizer is None:
        return True
    try:
        state = normalizer.__getstate__()  # the normaliser's JSON (a Sequence lists its parts)
    except Exception:  # noqa: BLE001 - a normaliser that cannot describe itself: read every offset
        return False
    return re.search(rb'"type"\s*:\s*"NFK?[CD]"', state) is None


def _span_runs(enc: Any, length: int, spans: list[tuple[int, int]], kept: int) -> list[tuple[int, int]] | None:
    """The target tokens of each span as a run [a, b) of token indices below `kept` (the tokens left after
    truncation); None when an edge is not plain (see _first_starting_at)."""
    count = len(enc)
    runs = []
    for lo, hi in spans:
        a = _first_starting_at(enc, lo, length, count)
        b = _first_starting_at(enc, hi, length, count)
        if a is None or b is None:
            return None
        runs.append((min(a, kept), min(b, kept)))
    return runs


def _first_starting_at(enc: Any, x: int, length: int, count: int) -> int | None:
    """The index of the first token that starts at or after character x (count when none does), given token
    starts that never decrease; None when the tokens around x do not show it plainly (x in no token, a token
    without offsets, an empty token at x), so that the caller reads every offset instead."""
    if x >= length:  # past the text: no token starts there unless one is empty at its very end
        last = _start(enc, count - 1) if count else -1
        return count if last is not None and last < x else None
    t = enc.char_to_token(x)  # the first token holding character x
    if t is None:
        return None
    start = _start(enc, t)
    if start is None:
        return None
    if start < x:
        # The token holding x began before it: it straddles the edge and belongs to what comes before.
        t += 1
        after = _start(enc, t) if t < count else x
        return t if after is not None and after >= x else None
    before = _start(enc, t - 1) if t else -1
    return t if before is not None and before < x else None


def _start(enc: Any, t: int) -> int | None:
    chars = enc.token_to_chars(t)
    return None if chars is None else int(chars[0])


def _in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens (by their character offsets) start inside one of the spans."""
    starts = np.fromiter(map(operator.itemgetter(0), offsets), dtype=np.int64, count=len(offsets))
    target = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        target |= (starts >= lo) & (starts < hi)
    return target


def _direct_renderer(tokenizer: Any) -> Callable[[list[dict[str, str]], bool], str] | None:
    """The tokenizer's compiled chat template, rendered without apply_chat_template's per-call work.

    apply_chat_template spends about half of each call outside the template: resolving the template, copying
    and type-checking the messages (built for rich objects: dataclasses, pydantic models, media) and the
    special-token variables. Our messages are plain {role, content} strings, so rendering transformers' own
    compiled template (same sandboxed environment, filters and globals) with the same variables gives the
    same text; Encoder checks that on probe chats and otherwise keeps apply_chat_template. None when this
    transformers version does not have the pieces.
    """
    try:
        from transformers.utils import chat_template_utils as ctu

        template = ctu._compile_jinja_template(tokenizer.get_chat_template())
        variables = ctu._plain_template_data(dict(tokenizer.special_tokens_map))
    except Exception:  # noqa: BLE001 - a private API that may move: fall back to the public one
        return None
    env = template.environment
    if env.is_async:
        return None
    # What Template.render does, less its copies of the template's globals (a ChainMap, slow to iterate) into
    # every call's context: transformers caches the compiled template and never changes it, so one flat copy
    # serves every call. The variables are laid out as render(**kwargs) lays them.
    globals_ = dict(template.globals)
    name, blocks, root = template.name, template.blocks, template.root_render_func

    def direct(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        parent = {
            **globals_,
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": generation_prompt,
            **variables,
        }
        ctx = env.context_class(env, parent, name, blocks, globals=globals_)
        try:
            return cast(str, env.concat(root(ctx)))
        except Exception:  # re-raised by jinja with the template's own line numbers, as render does
            env.handle_exception()
            raise  # not reached: handle_exception raises

    return direct
