"""Parsing: the token ids of an assistant completion -> reasoning, content and tool calls.

:class:`StreamParser` is fed completion ids (starting right after the prompt's
``<|start|>assistant``) and yields :class:`Delta` events per channel; :func:`parse_completion`
runs the same parser over a whole completion. ``reasoning`` collects analysis text, ``content``
final text and commentary preambles (and anything it cannot place), ``tool_calls`` every message
addressed to a recipient (``to=`` before or after ``<|channel|>``, on any channel, with or
without ``<|constrain|>``). On well-formed output the result equals openai-harmony's
``parse_messages_from_completion_tokens`` sorted into those fields; unlike it, this parser never
raises on malformed output (a header cut off by the end of the stream, stray special tokens):
what it cannot place becomes content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gptoss_mlx.harmony.format import CHANNEL, CONSTRAIN
from gptoss_mlx.tokenizer import STOP_TOKENS, StreamingDetokenizer, Tokenizer, default_tokenizer

# Recipients that address a reader rather than a tool.
_NOT_TOOLS = ("all", "assistant", "user")


@dataclass
class Delta:
    """A piece of parsed output.

    ``kind`` is where it goes: ``"reasoning"``, ``"content"`` or ``"tool_call"``. ``channel`` is
    the harmony channel of its message (None when the model wrote none). Tool calls: the event
    that opens one has ``text == ""`` and ``tool_call`` = ``{"index", "id", "name"}``; the
    events after it carry pieces of the arguments with the same ``tool_call_index``.
    """

    kind: str
    text: str
    channel: str | None = None
    recipient: str | None = None
    tool_call_index: int | None = None
    tool_call: dict | None = None


@dataclass
class _Header:
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    author: str | None = None
    leftover: list[str] = field(default_factory=list)


def _parse_header(text: str, role_known: bool) -> _Header:
    """A message header such as ``assistant to=functions.f<|channel|>commentary <|constrain|>json``.

    Tolerant: ``to=`` may come before or after the channel, the constrain marker may be missing
    (``json``), and words it cannot place are returned in ``leftover``.
    """
    h = _Header()
    at = text.find(CHANNEL)
    if at >= 0:
        after = text[at + len(CHANNEL) :]
        end = 0
        while end < len(after) and not after[end].isspace() and after[end] != "<":
            end += 1
        h.channel = after[:end] or None
        text = text[:at] + " " + after[end:]
    words = text.replace(CONSTRAIN, " " + CONSTRAIN).split()
    if words and not role_known and not words[0].startswith(("to=", "<|")):
        h.author = words.pop(0)
    elif words and words[0] == "assistant":
        h.author = words.pop(0)
    for word in words:
        if word.startswith("to=") and len(word) > 3 and h.recipient is None:
            h.recipient = word[3:]
        elif word.startswith(CONSTRAIN) and h.content_type is None:
            h.content_type = word
        elif word.startswith("functions.") and h.recipient is None:
            h.recipient = word
        elif h.content_type is None and not word.startswith("<|"):
            h.content_type = word
        else:
            h.leftover.append(word)
    return h


_SEPARATOR = "\n\n"  # between two messages' texts in the same field (e.g. two analysis messages)
_MAX_HEADER_TOKENS = 64  # a header this long is not a header: treat it as text


class StreamParser:
    """Incremental harmony parser over an assistant completion.

    ``feed(token)`` (or a list of tokens) returns the :class:`Delta` events those tokens
    completed; ``finish()`` flushes at the end; ``result()`` gives the same dict as
    :func:`parse_completion`, and always equals the concatenation of the deltas, however the
    tokens were split into ``feed`` calls. ``stop_token`` is the last stop token read
    (``<|return|>`` or ``<|call|>``; None before one). Never raises on malformed or unknown
    tokens.
    """

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tok = tokenizer or default_tokenizer()
        # The stream begins right after the prompt's <|start|>assistant: in a header, role known.
        self._state = "header"
        self._role_known = True
        self._header: list[int] = []
        self._detok = StreamingDetokenizer(self.tok)
        self._kind: str | None = None
        self._channel: str | None = None
        self._recipient: str | None = None
        self._call_index: int | None = None
        self._started_text = False
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[dict] = []
        self.stop_token: int | None = None

    # -- public ------------------------------------------------------------------------------

    @property
    def channel(self) -> str | None:
        """Channel of the message being read (None between messages or when not given)."""
        return self._channel if self._state == "content" else None

    @property
    def kind(self) -> str | None:
        """Where the text being read goes: ``"reasoning"``, ``"content"`` or ``"tool_call"``;
        None in a header or between messages."""
        return self._kind if self._state == "content" else None

    def feed(self, tokens: int | Iterable[int]) -> list[Delta]:
        """Read one id or several (ints, numpy or MLX scalars or arrays); the events they made."""
        try:
            tokens = iter(tokens)
        except TypeError:  # a single id (int, numpy or MLX scalar)
            tokens = iter((tokens,))
        events: list[Delta] = []
        for token in tokens:
            try:
                token = int(token)
            except (TypeError, ValueError):
                continue
            self._step(token, events)
        return events

    def finish(self) -> list[Delta]:
        """End of the stream: close the open message (or header) and flush buffered text."""
        events: list[Delta] = []
        if self._state == "header":
            self._header_failed(events, keep_going=False)
        elif self._state == "content":
            self._close_message(events)
        self._state = "idle"
        return events

    def result(self) -> dict:
        """``{"reasoning", "content", "tool_calls"}`` so far, as :func:`parse_completion` gives."""
        return {
            "reasoning": "".join(self._reasoning),
            "content": "".join(self._content),
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": "".join(c["arguments"])},
                }
                for c in self._calls
            ],
        }

    # -- state machine ---------------------------------------------------------------------

    def _step(self, token: int, events: list[Delta]) -> None:
        tok = self.tok
        special = tok.is_special(token)
        if self._state == "header":
            if token == tok.message_id:
                self._open_message(events)
            elif token == tok.start_id:
                if self._header:
                    self._header_failed(events, keep_going=False)
                self._begin_header(role_known=False)
            elif token in (tok.end_id, tok.return_id, tok.call_id, tok.endoftext_id):
                self._header_failed(events, keep_going=False)
                self._end(token)
            elif token in (tok.channel_id, tok.constrain_id) or not special:
                self._header.append(token)
                if len(self._header) > _MAX_HEADER_TOKENS:
                    self._header_failed(events, keep_going=True)
            # other special tokens (reserved, <|startoftext|>) carry nothing: skip them
        elif self._state == "content":
            if token in (tok.end_id, tok.return_id, tok.call_id, tok.endoftext_id):
                self._close_message(events)
                self._end(token)
            elif token == tok.start_id:
                self._close_message(events)
                self._begin_header(role_known=False)
            elif token == tok.channel_id:  # a new header without <|end|><|start|>assistant
                self._close_message(events)
                self._begin_header(role_known=True)
                self._header.append(token)
            elif not special:
                self._text(self._detok.add(token), events)
        else:  # idle: between messages
            if token == tok.start_id:
                self._begin_header(role_known=False)
            elif token == tok.channel_id:  # the model left out <|start|>assistant
                self._begin_header(role_known=True)
                self._header.append(token)
            elif not special and self._valid(token) and not self._blank(token):
                # text outside any message (whitespace between messages is skipped)
                self._set_target("content", None, None)
                self._state = "content"
                self._text(self._detok.add(token), events)

    def _valid(self, token: int) -> bool:
        try:
            self.tok.token_bytes(token)
            return True
        except (KeyError, ValueError, OverflowError):
            return False

    def _blank(self, token: int) -> bool:
        return not self.tok.token_bytes(token).strip()

    def _end(self, token: int) -> None:
        self._state = "idle"
        if token in STOP_TOKENS:
            self.stop_token = token

    def _begin_header(self, role_known: bool) -> None:
        self._state = "header"
        self._role_known = role_known
        self._header = []

    def _header_text(self) -> str:
        return self.tok.decode(t for t in self._header if self._valid(t))

    def _open_message(self, events: list[Delta]) -> None:
        h = _parse_header(self._header_text(), self._role_known)
        self._header = []
        self._state = "content"
        recipient = h.recipient
        if recipient is not None and recipient not in _NOT_TOOLS:
            name = (
                recipient[len("functions.") :] if recipient.startswith("functions.") else recipient
            )
            index = len(self._calls)
            call = {"index": index, "id": f"call_{index}", "name": name}
            self._calls.append({**call, "arguments": []})
            self._set_target("tool_call", h.channel, recipient, index)
            events.append(Delta("tool_call", "", h.channel, recipient, index, call))
        elif h.channel == "analysis":
            self._set_target("reasoning", h.channel, recipient)
        else:
            self._set_target("content", h.channel, recipient)
        if h.leftover:  # header words it could not place: keep them as text
            self._text(" ".join(h.leftover) + " ", events)

    def _header_failed(self, events: list[Delta], *, keep_going: bool) -> None:
        """A header that never reached <|message|>: its words go to content.

        ``keep_going``: the tokens that follow are this message's text (header too long)."""
        if not self._header:
            self._state = "idle"
            return
        h = _parse_header(self._header_text(), self._role_known)
        self._header = []
        self._set_target("content", h.channel, h.recipient)
        self._state = "content"
        words = ([h.content_type] if h.content_type else []) + h.leftover
        if words:
            self._text(" ".join(words), events)
        if not keep_going:
            self._close_message(events)
            self._state = "idle"

    def _set_target(
        self, kind: str, channel: str | None, recipient: str | None, index: int | None = None
    ) -> None:
        self._kind, self._channel, self._recipient, self._call_index = (
            kind,
            channel,
            recipient,
            index,
        )
        self._started_text = False

    def _text(self, text: str, events: list[Delta]) -> None:
        if not text:
            return
        if self._kind == "tool_call":
            self._calls[self._call_index]["arguments"].append(text)
        else:
            field_parts = self._reasoning if self._kind == "reasoning" else self._content
            if not self._started_text and field_parts:
                text = _SEPARATOR + text
            field_parts.append(text)
        self._started_text = True
        events.append(Delta(self._kind, text, self._channel, self._recipient, self._call_index))

    def _close_message(self, events: list[Delta]) -> None:
        self._text(self._detok.finalize(), events)
        self._state = "idle"


def parse_completion(tokens: Iterable[int], tokenizer: Tokenizer | None = None) -> dict:
    """Parse a finished assistant completion (the ids after the prompt's ``<|start|>assistant``).

    Returns ``{"reasoning": str, "content": str, "tool_calls": [OpenAI tool calls]}`` with each
    tool call's ``arguments`` exactly the text the model wrote and ids ``call_0``, ``call_1``...
    The stop token may be included or stripped. Never raises on malformed output.
    """
    parser = StreamParser(tokenizer)
    parser.feed(tokens)
    parser.finish()
    return parser.result()


def header_channel_and_recipient(text: str) -> tuple[str | None, str | None]:
    """``(channel, recipient)`` of an assistant message header as :class:`StreamParser` reads it,
    e.g. ``("commentary", "functions.f")`` for ``<|channel|>commentary to=functions.f
    <|constrain|>json`` (the text between ``<|start|>assistant`` and ``<|message|>``)."""
    h = _parse_header(text, role_known=True)
    return h.channel, h.recipient
