"""Constrained decoding: what must parse follows a grammar, the model's reasoning stays free.

A request may ask for a **response format** (the final answer is JSON following a schema, any
JSON object, a regular expression or a Lark grammar) and a **tool choice** (``"required"``, a named
function, ``"none"``, or ``"auto"`` with ``strict`` functions). llguidance turns each of those into
a grammar over our o200k_harmony tokens, special tokens included, and computes, token by token,
the bitmask of the tokens the grammar allows next.

What is constrained, in two modes (:func:`compile_constraint` picks one, or none):

* **guided** (a response format, or tool choice ``"required"``, named, or ``"none"``): every
  assistant *header* is generated under a grammar that lists the messages allowed at that point,
  and constrained message *bodies* follow their grammar up to their stop token:

  - first message: ``<|channel|>analysis<|message|>`` (the reasoning that follows is free: no
    mask, sampled exactly as without a constraint) or one of the answers below;
  - once a message ends (``<|end|>``, or a stop token the model writes inside its reasoning), the
    header of the next one is ``<|start|>assistant`` then one of the answers, never a second
    analysis message; with a single answer allowed (a response format without tools) that forces
    ``<|start|>assistant<|channel|>final<|message|>`` token by token;
  - answers: ``<|channel|>final<|message|>BODY<|return|>`` with BODY following the response
    format (free text for ``"none"`` without a format), allowed unless a call is required; and
    ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>`` for each
    callable function (all of them for ``"required"`` and ``"auto"``, the named one, none for
    ``"none"``), ARGS following NAME's parameter schema when the call is forced or NAME is
    ``strict``, else any JSON object. Commentary preambles are not offered: they would be
    mixed into the answer's text.

* **watch** (tool choice ``"auto"`` with ``strict: true`` functions, no response format): the
  model writes freely; once a header names ``functions.NAME`` of a strict function (as the harmony
  parser reads it), the arguments follow NAME's schema and end with ``<|call|>``.

The decode loop (:mod:`gptoss_mlx.generate`) asks a :class:`Guide` for each token. The mask for
token n+1 depends on token n, so while the device runs the forward pass for n+1 the host reads
token n, advances the grammar and computes the mask (llguidance: tens of microseconds); the mask
goes to the device as packed bits (int32 words, 1/32 of the vocabulary: 25 KB) and is unpacked
there (:func:`apply_bitmask`). Where the next token is free (reasoning, unconstrained text) the
loop draws it speculatively before token n is read, exactly as it does without a constraint
(one draw, so one split of the sampler's random key, per token: the free stretches are the same
tokens as without a constraint, for the same seed); if token n turns out to start a constrained
stretch, the token is drawn again from the masked logits.

JSON schemas compile with at most 32 whitespace characters wherever JSON allows whitespace
(enough to pretty-print 7 levels deep at 4 spaces; llguidance allows any run by default, which
lets a model loop on newlines); a schema's own ``x-guidance`` options override that.
Unsupported keywords or formats, bad patterns and bad grammars are a :class:`GptOssError` before
any token is generated.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import llguidance as llg
import llguidance.numpy as llg_numpy
import llguidance.tiktoken as llg_tiktoken
import mlx.core as mx

from .errors import GptOssError
from .harmony import (
    Delta,
    FunctionDeclaration,
    ResponseFormat,
    function_declarations,
    header_channel_and_recipient,
    parse_response_format,
)
from .sample import Sampler
from .tokenizer import Tokenizer

__all__ = [
    "Constraint",
    "Guide",
    "apply_bitmask",
    "check_response_format",
    "compile_constraint",
    "ll_tokenizer",
]

# Whitespace JSON may have at each place it is allowed (see the module docstring).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,32}"

_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Tokenizer) -> llg.LLTokenizer:
    """llguidance's tokenizer for ours (o200k_harmony with its special tokens, which grammars
    name as ``<|channel|>``...), built once per :class:`Tokenizer` (~0.7 s) and cached.

    Its end-of-sequence token is ``<|endoftext|>``, which no grammar here reaches: each one ends
    with its own ``<|return|>``, ``<|call|>`` or ``<|message|>``.
    """
    ll = _LL_TOKENIZERS.get(tokenizer)
    if ll is None:
        ll = llg_tiktoken.lltokenizer_from_encoding(
            tokenizer.encoding, eos_token=tokenizer.endoftext_id
        )
        _LL_TOKENIZERS[tokenizer] = ll
    return ll


# -- grammars ------------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    """llguidance's error on one line: its ``error: ...`` line when it has one, else its first."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("error:")), None)
    return (detail[len("error:") :].strip() if detail else lines[0] if lines else "")[:300]


# What each kind of grammar may use, for error messages.
_SUPPORTED = {
    "json": "JSON schema features llguidance supports: "
    "https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md",
    "regex": "regular expressions in Rust's syntax, without look-around or backreferences",
    "lark": "llguidance's Lark syntax: "
    "https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md",
}


def _grammar_entry(kind: str, source, what: str) -> dict:
    """One llguidance grammar (an entry of its ``grammars`` list) for a JSON schema (``kind``
    "json"), a regular expression ("regex") or a Lark grammar ("lark"); ``what`` names it in
    errors."""
    try:
        if kind == "json":
            options = source.get("x-guidance") if isinstance(source, Mapping) else None
            own = isinstance(options, Mapping) and (
                "whitespace_pattern" in options or "whitespace_flexible" in options
            )
            defaults = None if own else {"whitespace_pattern": JSON_WHITESPACE}
            text = llg.LLMatcher.grammar_from_json_schema(json.dumps(source), defaults=defaults)
        elif kind == "regex":
            text = llg.LLMatcher.grammar_from_regex(source)
        else:  # Lark needs no conversion
            text = json.dumps({"grammars": [{"lark_grammar": source}]})
        entry = json.loads(text)["grammars"][0]
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(
            json.dumps({"grammars": [entry]})
        )
        problem = messages[0] if failed else None
    except (TypeError, ValueError) as e:
        problem = str(e)
    if problem is not None:
        raise GptOssError(f"{what} cannot be used: {_one_line(problem)} (use {_SUPPORTED[kind]})")
    return entry


def _format_entry(fmt: ResponseFormat) -> dict:
    if fmt.type == "json_schema":
        return _grammar_entry("json", fmt.schema, f"the response_format's JSON schema {fmt.name!r}")
    if fmt.type == "json_object":
        return _grammar_entry("json", {"type": "object"}, "json_object")
    if fmt.type == "regex":
        return _grammar_entry("regex", fmt.pattern, "the response_format's regex")
    return _grammar_entry("lark", fmt.grammar, "the response_format's grammar")


def _arguments_entry(fn: FunctionDeclaration, follow_schema: bool) -> dict:
    """Arguments of a call to ``fn``: its parameter schema, or any JSON object."""
    if not follow_schema:
        schema = {"type": "object"}
    elif fn.parameters is None:  # a function without parameters takes {}
        schema = {"type": "object", "properties": {}, "additionalProperties": False}
    else:
        schema = fn.parameters
    return _grammar_entry("json", schema, f"the parameters of function {fn.name!r}")


@dataclass(frozen=True)
class _ToolChoice:
    """``tool_choice`` read: ``mode`` is "auto", "none", "required" or "named" (then ``name``)."""

    mode: str = "auto"
    name: str | None = None


def _tool_choice(choice, tools: Sequence[FunctionDeclaration]) -> _ToolChoice:
    names = [fn.name for fn in tools]
    if choice is None or choice == "auto":
        return _ToolChoice()
    if choice in ("none", "required"):
        if choice == "required" and not tools:
            raise GptOssError('tool_choice "required" needs tools')
        return _ToolChoice(choice)
    spec = choice.get("function", choice) if isinstance(choice, Mapping) else None
    name = spec.get("name") if isinstance(spec, Mapping) else None
    if not (isinstance(choice, Mapping) and choice.get("type") == "function" and name):
        raise GptOssError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", '
            f'"function": {{"name": ...}}}}, got {choice!r}'
        )
    if name not in names:
        raise GptOssError(
            f"tool_choice names function {name!r}, which is not among the tools "
            f"({', '.join(names) or 'none given'})"
        )
    return _ToolChoice("named", name)


def _lark_text(text: str) -> str:
    return json.dumps(text)  # a Lark string literal


class Constraint:
    """A request's response format and tool choice, compiled (see :func:`compile_constraint`).

    Holds one pristine llguidance matcher per grammar it may need; each generation copies them
    (:meth:`guide`), so one Constraint serves any number of generations.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        fmt: ResponseFormat | None,
        tools: Sequence[FunctionDeclaration],
        choice: _ToolChoice,
    ) -> None:
        self.tokenizer = tokenizer
        self.guided = fmt is not None or choice.mode != "auto"
        self._ll = ll_tokenizer(tokenizer)
        if self.guided:
            self._init_guided(fmt, tools, choice)
        else:
            self._calls = {
                fn.name: self._matcher(
                    "start: @args <|call|>", {"args": _arguments_entry(fn, follow_schema=True)}
                )
                for fn in tools
                if fn.strict
            }

    def _init_guided(
        self, fmt: ResponseFormat | None, tools: Sequence[FunctionDeclaration], choice: _ToolChoice
    ) -> None:
        answers, entries = [], {}
        if choice.mode not in ("required", "named"):
            if fmt is not None:
                entries["answer"] = _format_entry(fmt)
                answers.append('<|channel|> "final" <|message|> @answer <|return|>')
            else:  # "none" without a format: a free final answer
                answers.append('<|channel|> "final" <|message|>')
        callable_ = {"none": [], "named": [fn for fn in tools if fn.name == choice.name]}
        for i, fn in enumerate(callable_.get(choice.mode, tools)):
            forced = choice.mode in ("required", "named")
            entries[f"args{i}"] = _arguments_entry(fn, follow_schema=forced or fn.strict)
            header = _lark_text(f"commentary to=functions.{fn.name} ")
            answers.append(
                f'<|channel|> {header} <|constrain|> "json" <|message|> @args{i} <|call|>'
            )
        answer = "answer_message: " + " | ".join(answers)
        analysis = '<|channel|> "analysis" <|message|>'
        self._first = self._matcher(f"start: {analysis} | answer_message\n{answer}", entries)
        # After a message: with <|start|>assistant to come, or already written up to <|channel|>.
        self._next = self._matcher(
            f'start: <|start|> "assistant" answer_message\n{answer}', entries
        )
        self._next_from_channel = self._matcher(f"start: answer_message\n{answer}", entries)

    def _matcher(self, lark: str, entries: dict[str, dict]) -> llg.LLMatcher:
        grammar = json.dumps(
            {"grammars": [{"lark_grammar": lark}, *({**e, "name": n} for n, e in entries.items())]}
        )
        matcher = llg.LLMatcher(self._ll, grammar, log_level=0)
        if matcher.is_error():
            raise GptOssError(
                f"the constraint cannot be compiled: {_one_line(matcher.get_error())}"
            )
        return matcher

    def guide(self, sampler: Sampler) -> Guide:
        """The per-generation state, drawing with ``sampler``."""
        return Guide(self, sampler)


def compile_constraint(
    tokenizer: Tokenizer,
    *,
    response_format: Mapping | None = None,
    tools: Sequence[Mapping] | None = None,
    tool_choice: str | Mapping | None = None,
) -> Constraint | None:
    """The :class:`Constraint` for a request, or None when nothing is constrained (no format, and
    tool choice ``"auto"`` without strict functions). Raises :class:`GptOssError` for a malformed
    format or tool choice and for a schema, regex or grammar llguidance cannot enforce."""
    fmt = parse_response_format(response_format)
    fns = function_declarations(tools) if tools else []
    choice = _tool_choice(tool_choice, fns)
    if fmt is None and choice.mode == "auto" and not any(fn.strict for fn in fns):
        return None
    return Constraint(tokenizer, fmt, fns, choice)


# -- one generation ------------------------------------------------------------------------------

_BIT_SHIFTS = mx.arange(8, dtype=mx.uint8)
mx.eval(_BIT_SHIFTS)  # MLX streams belong to threads: lazy, it could not run on another one


def apply_bitmask(logits: mx.array, words: mx.array) -> mx.array:
    """``logits`` `[1, V]` with every token whose bit is clear set to -inf.

    ``words``: llguidance's packed mask, int32 `[ceil(V' / 32)]` (V' >= V), token ``t`` allowed
    when bit ``t % 32`` of word ``t // 32`` is set; unpacked here, on the device.
    """
    bits = mx.right_shift(words.view(mx.uint8)[:, None], _BIT_SHIFTS) & 1  # little-endian
    allowed = bits.reshape(-1)[: logits.shape[-1]].astype(mx.bool_)
    return mx.where(allowed, logits, -mx.inf)


class Guide:
    """A :class:`Constraint` during one generation: where the completion is, and whether (and
    by which grammar) the next token is masked.

    The decode loop calls :meth:`first` for token 0, then per token n: :meth:`propose` with the
    logits of n+1 (a speculative free draw, or None when n+1 will surely be masked), :meth:`feed`
    with token n and the parser's deltas for it, and, unless generation ends there,
    :meth:`choose` for token n+1 (which computes its mask). ``masked_tokens`` counts the tokens
    drawn under a mask, ``mask_seconds`` the host time spent computing those masks.
    """

    def __init__(self, constraint: Constraint, sampler: Sampler) -> None:
        self.constraint = constraint
        self.sampler = sampler
        self.tok = constraint.tokenizer
        self.mask_seconds = 0.0
        self.masked_tokens = 0
        self._words = llg_numpy.allocate_token_bitmask(1, constraint._ll.vocab_size)
        self._header: list[int] = []  # tokens of the header being generated (guided)
        self._body: str | None = None  # channel of the free body being generated (guided)
        self._state = "free"  # "free", "match" (a matcher masks the next token), "done"
        if constraint.guided:
            self._match(constraint._first.deep_copy())

    # -- the decode loop's calls -----------------------------------------------------------------

    def first(self, logits: mx.array) -> mx.array:
        """Token 0, drawn from the prompt's last logits `[1, V]`."""
        return self.choose(logits, None)

    def propose(self, logits: mx.array) -> mx.array | None:
        """A draw of the next token from ``logits`` as if it were free, or None when the
        constraint will surely mask it."""
        return None if self._state == "match" else self.sampler(logits)

    def choose(self, logits: mx.array, proposal: mx.array | None) -> mx.array:
        """The next token: ``proposal`` when it is free, else drawn from the masked ``logits``."""
        if self._state != "match":
            return proposal if proposal is not None else self.sampler(logits)
        return self.sampler(apply_bitmask(logits, self._mask()))

    def feed(self, token: int, deltas: Sequence[Delta] = ()) -> bool:
        """Advance past ``token``. True when a stop token here ends the completion; False for one
        the constraint reads as the end of the reasoning (guided), and for every other token."""
        if self._state == "match":
            return self._feed_matcher(token)
        if self._state == "done":
            return True
        return self._feed_free(token, deltas)

    # -- state machine ---------------------------------------------------------------------------

    def _feed_matcher(self, token: int) -> bool:
        matcher = self._matcher
        if not matcher.consume_token(token):
            raise GptOssError(
                f"token {token} broke the constraint ({_one_line(matcher.get_error())}): "
                "please report this"
            )
        if token == self.tok.start_id:
            self._header = []
        else:
            self._header.append(token)
        if not matcher.is_stopped():
            return False
        if token in self.tok.stop_tokens:  # a constrained body's last token
            self._state = "done"
            return True
        # A header after which the body is free (analysis; a final answer with no format).
        self._body, _ = header_channel_and_recipient(self.tok.decode(self._header[:-1]))
        self._state = "free"
        return False

    def _feed_free(self, token: int, deltas: Sequence[Delta]) -> bool:
        tok, constraint = self.tok, self.constraint
        if not constraint.guided:
            opened = next((d.tool_call for d in deltas if d.tool_call is not None), None)
            call = constraint._calls.get(opened["name"]) if opened else None
            if call is not None:  # a header named a strict function: its arguments follow
                self._match(call.deep_copy())
            return True
        if token == tok.start_id:
            self._match(constraint._next.deep_copy(), token)
        elif token == tok.channel_id:
            self._match(constraint._next_from_channel.deep_copy(), token)
        elif token == tok.end_id or (
            self._body == "analysis" and token in (*tok.stop_tokens, tok.endoftext_id)
        ):
            self._match(constraint._next.deep_copy())
        else:
            return True
        return False

    def _match(self, matcher: llg.LLMatcher, written: int | None = None) -> None:
        """Hand the next tokens to ``matcher``, which has already seen ``written`` if given."""
        self._matcher, self._state, self._header = matcher, "match", []
        if written is not None:
            self._feed_matcher(written)

    def _mask(self) -> mx.array:
        """The next token's mask, packed (int32 words), on the device."""
        tic = time.perf_counter()
        llg_numpy.fill_next_token_bitmask(self._matcher, self._words)
        if self._matcher.is_error():
            raise GptOssError(f"the constraint failed: {_one_line(self._matcher.get_error())}")
        mask = mx.array(self._words[0])
        self.mask_seconds += time.perf_counter() - tic
        self.masked_tokens += 1
        return mask


def check_response_format(response_format: Mapping | None) -> None:
    """Raise :class:`GptOssError` unless ``response_format`` is well-formed and llguidance can
    enforce it. Needs no tokenizer, so a caller can check before loading a model."""
    fmt = parse_response_format(response_format)
    if fmt is not None:
        _format_entry(fmt)
