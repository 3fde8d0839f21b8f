"""Streaming generation: chunked prefill, pipelined decode, harmony stop tokens, statistics.

    prompt ids ──► prefill in chunks of `prefill_chunk` through the KV cache (each chunk
                   evaluated, so peak memory stays bounded; only the last position goes through
                   the unembedding)
               ──► sample token 0
    decode:        queue step n+1 (mx.async_eval) before reading token n with .item(), so the
                   device computes the next token while the host parses and prints this one;
                   the only host sync per token is reading the sampled id.
    stop:          on <|return|> (finish "stop") or <|call|> ("tool_calls"), never on <|end|>;
                   on a `stop` string in the answer ("stop"); else after `max_tokens` or at the
                   end of the model's context ("length").
    constrained:   with a response format or a tool choice (:mod:`gptoss_mlx.constrain`), step n+1
                   is queued as the forward pass alone when token n+1 will be masked: the host
                   reads token n and computes the mask while the device runs it, then the masked
                   draw is queued. Free stretches (reasoning) are drawn as above.
    ranks:         a model sharded over several processes (`model.group`) checks that every
                   rank runs the same prompt, and every draw (constrained or not) feeds every
                   rank rank 0's token (`distributed.shared_sampler`).
    cancelled:     polled as each draw is queued; once true the draw is STOPPED (across ranks,
                   rank 0's answer on every rank) and generation ends when it is read: the
                   events already drawn still come, then no more.

A consequence of pipelining: when generation stops on a stop token, that token has already been fed
through the model, so the cache holds ``prompt + completion``; when it stops at ``max_tokens`` the
last token has not been fed and the cache holds one token less. Callers keeping the cache (chat)
read ``cache[0].offset`` rather than assume either (see :mod:`gptoss_mlx.chat`).
"""

from __future__ import annotations

import functools
import json
import operator
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import mlx.core as mx

from .constrain import Guide, compile_constraint
from .distributed import STOPPED, check_same_tokens, shared_sampler
from .errors import GptOssError
from .harmony import Delta, StreamParser, parse_completion, parse_response_format, render_prompt
from .progress import progress_bar
from .sample import Sampler, make_sampler
from .tokenizer import STOP_TOKENS, Tokenizer, default_tokenizer

__all__ = [
    "GenerationEvent",
    "GenerationStats",
    "stream_generate",
    "generate",
    "prompt_tokens",
    "check_context",
]

FINISH_REASONS = {STOP_TOKENS[0]: "stop", STOP_TOKENS[1]: "tool_calls"}

# A prompt: a string (one user message), messages (OpenAI Chat Completions shape) or token ids.
Prompt = str | Sequence[Mapping] | Sequence[int] | mx.array


class LanguageModel(Protocol):
    """What generation needs of a model: `GptOssModel`, or a stand-in with the same calls."""

    def __call__(self, input_ids: mx.array, cache: list | None = None) -> mx.array:
        """ids `[B, T]` through `cache` -> logits `[B, T, vocab]`."""

    def make_cache(self) -> list:
        """A fresh cache, one entry per layer (each with an `offset`)."""


@dataclass
class GenerationStats:
    """Timings and counts of one generation (times in seconds, memory in bytes)."""

    prompt_tokens: int = 0  # tokens prefilled (with a kept `cache`, only the new ones)
    prompt_tps: float = 0.0  # prompt tokens / time to first token
    time_to_first_token: float = 0.0  # from the call until the first token's id is on the host
    generation_tokens: int = 0
    generation_tps: float = 0.0  # tokens after the first / time after the first
    peak_memory: int = 0  # mx.get_peak_memory() since the call started (weights included)
    finish_reason: str | None = None  # "stop" (<|return|>), "tool_calls" (<|call|>), "length"
    # (and "cancelled" from `generate` when `cancelled` ended it)
    precision: str = ""  # the model's weights and cache (`GptOssModel.describe`)
    # With an expert cache: {"prefill": counts, "decode": counts}, counts being the hits, misses,
    # bytes_read and syncs of this generation (`GptOssModel.expert_cache_stats`).
    expert_cache: dict | None = None
    masked_tokens: int = 0  # tokens drawn under a constraint's mask
    mask_seconds: float = 0.0  # host time computing those masks

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for humans, e.g. for a CLI's stderr."""
        masks = (
            f" | masks: {self.masked_tokens} tokens, "
            f"{self.mask_seconds / self.masked_tokens * 1e6:.0f} us/token"
            if self.masked_tokens
            else ""
        )
        line = (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
            f"first token: {self.time_to_first_token:.2f} s | "
            f"peak memory: {self.peak_memory / 1e9:.2f} GB | finish: {self.finish_reason}" + masks
        )
        if self.precision:
            line += f" | {self.precision}"
        if self.expert_cache:
            decode = self.expert_cache["decode"]
            used = decode["hits"] + decode["misses"]
            tokens = max(self.generation_tokens - 1, 1)
            line += (
                f" | expert cache: decode {decode['hits'] / max(used, 1):.0%} hits, "
                f"{decode['bytes_read'] / tokens / 1e6:.1f} MB/token from disk; prefill "
                f"{self.expert_cache['prefill']['bytes_read'] / 1e9:.2f} GB read"
            )
        return line


@dataclass
class GenerationEvent:
    """One generated token.

    ``text`` is the visible text this token completed (concatenated ``deltas``; "" inside headers,
    for special tokens, mid-UTF-8 character, or without a tokenizer). ``kind`` and ``channel`` are
    those of the last delta ("reasoning" / "content" / "tool_call"; None when the token produced
    none). ``part`` is where the token itself belongs: the kind of the message text it is part of
    (mid-character tokens included), None for header and special tokens. With ``logprobs=``,
    ``logprob`` is the token's log probability under the model (log-softmax of its logits, before
    temperature and filters) and ``top_logprobs`` the most likely ``(token, logprob)`` pairs, best
    first. The last event has ``finish_reason`` and ``stats`` set.
    """

    token: int
    text: str = ""
    kind: str | None = None
    channel: str | None = None
    deltas: list[Delta] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    part: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def prompt_tokens(
    prompt: Prompt,
    tokenizer: Tokenizer | None = None,
    *,
    tools: Sequence[Mapping] | None = None,
    reasoning_effort: str | None = "medium",
    response_format: Mapping | None = None,
) -> tuple[list[int], Tokenizer | None]:
    """``(ids, tokenizer)`` for a prompt given as token ids, messages or a string.

    Messages (OpenAI Chat Completions shape) are rendered with harmony (``tools`` and a JSON
    schema ``response_format`` in the developer message); a string is one user message. Both
    need a tokenizer: the default o200k_harmony when none is given.
    """
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, mx.array):
        prompt = prompt.reshape(-1).tolist()
    prompt = list(prompt)
    if prompt and all(isinstance(m, Mapping) for m in prompt):
        tokenizer = tokenizer or default_tokenizer()
        ids = render_prompt(
            prompt,
            tools=tools,
            reasoning_effort=reasoning_effort,
            response_format=response_format,
            tokenizer=tokenizer,
        )
        return ids, tokenizer
    try:
        ids = [operator.index(t) for t in prompt]  # ints, numpy ints; not floats or strings
    except TypeError:
        raise GptOssError(
            "prompt must be token ids (integers), a list of messages "
            "({'role': ..., 'content': ...}) or a string"
        ) from None
    return ids, tokenizer


def context_length(model: LanguageModel) -> int | None:
    """The most positions a generation may use: the model's `max_context` cap when it has one
    (`load(..., max_context=)`), else its configured context (None when it says neither)."""
    limits = (
        getattr(model, "max_context", None),
        getattr(getattr(model, "config", None), "max_position_embeddings", None),
    )
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None


def check_context(model: LanguageModel, length: int, held: int = 0) -> None:
    """GptOssError unless a prompt of ``length`` tokens (after ``held`` already in the cache)
    leaves room for one generated token."""
    context = context_length(model)
    if context is not None and held + length >= context:
        capped = getattr(model, "max_context", None) == context
        before = f" after the {held} already in the cache" if held else ""
        limit = (
            f"the context is {context} (--max-context {context})"
            if capped
            else (f"the model's context is {context}")
        )
        raise GptOssError(
            f"the prompt is {length} tokens{before}, {limit}: shorten the conversation so that "
            "it leaves room for the reply" + (", or raise --max-context" if capped else "")
        )


class _StopStrings:
    """Cuts the answer (``content`` deltas) before the first of ``stops``, holding back any text
    that may be the start of one, so no part of a stop string is ever emitted. Held text is let
    go when the answer is interrupted by reasoning or a tool call, and at the end."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held: Delta | None = None
        self.hit = False

    def filter(self, deltas: list[Delta]) -> list[Delta]:
        out: list[Delta] = []
        for d in deltas:
            if self.hit:
                break
            if d.kind != "content":
                out += self.flush()
                out.append(d)
                continue
            held = replace(d, text=(self.held.text if self.held else "") + d.text)
            self.held = None
            cuts = [i for i in (held.text.find(s) for s in self.stops) if i >= 0]
            if cuts:
                self.hit = True
                if min(cuts) > 0:
                    out.append(replace(held, text=held.text[: min(cuts)]))
                break
            keep = max(
                (k for s in self.stops for k in range(1, len(s)) if held.text.endswith(s[:k])),
                default=0,
            )
            if keep < len(held.text):
                out.append(replace(held, text=held.text[: len(held.text) - keep]))
            if keep:
                self.held = replace(held, text=held.text[len(held.text) - keep :])
        return out

    def flush(self) -> list[Delta]:
        held, self.held = self.held, None
        return [held] if held is not None and not self.hit else []


def _with_logprobs(token: mx.array, logits: mx.array, top: int) -> tuple[mx.array, ...]:
    """``(token, its log probability, the top ids, their log probabilities)`` as lazy arrays."""
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, token.reshape(-1, 1), axis=-1)
    if top == 0:
        return token, chosen
    best = mx.argpartition(-logprobs, top - 1, axis=-1)[:, :top]
    return token, chosen, best, mx.take_along_axis(logprobs, best, axis=-1)


def _cache_arrays(cache) -> list:
    """The key/value buffers the caches hold (to evaluate after a prefill chunk)."""
    return [
        a
        for c in cache or ()
        for a in (getattr(c, "keys", None), getattr(c, "values", None))
        if a is not None
    ]


def _last_logits(model, ids: mx.array, cache) -> mx.array:
    """Logits `[1, V]` of the last of ids `[1, T]`, computing only what that needs when the model
    knows how (`GptOssModel.last_logits`); any callable model otherwise."""
    if hasattr(model, "last_logits"):
        return model.last_logits(ids, cache)
    return model(ids, cache=cache)[:, -1, :]


def _prefill(
    model,
    ids: list[int],
    cache,
    chunk: int,
    progress: bool,
    pauses: Sequence[int] = (),
    on_pause: Callable[[int], None] | None = None,
) -> mx.array:
    """Feed `ids` through the cache `chunk` tokens at a time; the last position's logits `[1, V]`.

    Only the caches of the earlier chunks are evaluated: their logits are never computed. Chunks
    also end at each of `pauses` (0 < p <= len(ids)), where `on_pause(p)` sees the cache holding
    exactly `ids[:p]`.
    """
    pauses = {p for p in pauses if 0 < p <= len(ids)} if on_pause is not None else set()
    starts = sorted(set(range(0, len(ids), chunk)) | {p for p in pauses if p < len(ids)})
    ends = starts[1:] + [len(ids)]
    show = progress and len(starts) > 1
    with progress_bar(len(ids), "Prefill", show) as bar:
        for start, end in zip(starts, ends, strict=True):
            logits = _last_logits(model, mx.array([ids[start:end]]), cache)
            if end < len(ids):
                mx.eval(*_cache_arrays(cache))
            if end in pauses:
                on_pause(end)
            bar.update(end - start)
    return logits


def stream_generate(
    model: LanguageModel,
    prompt: Prompt,
    *,
    tokenizer: Tokenizer | None = None,
    max_tokens: int | None = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    reasoning_effort: str | None = "medium",
    tools: Sequence[Mapping] | None = None,
    cache: list | None = None,
    prefill_chunk: int = 512,
    stop_tokens: Sequence[int] = STOP_TOKENS,
    progress: bool = False,
    sampler: Sampler | None = None,
    response_format: Mapping | None = None,
    tool_choice: str | Mapping | None = None,
    stop: str | Sequence[str] | None = None,
    logprobs: int | None = None,
    prefill_pauses: Sequence[int] = (),
    on_pause: Callable[[int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[GenerationEvent]:
    """Generate from ``prompt``, yielding a :class:`GenerationEvent` per token.

    ``prompt``: token ids, messages (rendered with harmony, ``tools`` and ``reasoning_effort``) or
    a string (one user message). With ``tokenizer`` (or a messages/string prompt, which implies the
    default o200k_harmony) each event carries the parsed text delta and its channel; with token ids
    and no tokenizer, events carry ids only. ``cache``: a cache from ``model.make_cache()`` to
    continue from (``prompt`` is then only the tokens to add); a fresh one when None.
    ``sampler`` overrides ``temperature``/``top_p``/``top_k``/``min_p``/``seed``.
    ``response_format`` (OpenAI's ``{"type": "json_schema", "json_schema": {"name", "schema"}}``
    or ``{"type": "json_object"}``; extensions ``{"type": "regex", "pattern"}`` and ``{"type":
    "grammar", "grammar"}`` in llguidance's Lark syntax) makes the final answer follow it after
    free reasoning; ``tool_choice`` (``"auto"``, ``"none"``, ``"required"`` or ``{"type":
    "function", "function": {"name"}}``) and ``strict`` tools make tool calls follow their
    parameter schemas (see :mod:`gptoss_mlx.constrain`; with a token-id prompt, ``tools`` only
    serve that). A format or tool choice that cannot be enforced is a :class:`GptOssError` here,
    before any token is generated.
    ``stop``: strings that end the answer (``content`` text) before them, finish ``"stop"``; they
    need a tokenizer. ``logprobs``: each event carries its token's log probability and the
    ``logprobs`` (0..20) most likely tokens'. ``prefill_pauses`` / ``on_pause``: positions of
    ``prompt`` at which the prefill pauses and calls ``on_pause(p)`` with the cache holding its
    first ``p`` tokens (to snapshot it). ``cancelled``: asked as each token's draw is queued;
    once it says True the events stop within two tokens, the last with no ``finish_reason``,
    and ``cache`` holds the prompt and the tokens yielded; a model sharded over ranks asks rank
    0's only, and every rank stops at the same token. The prompt (with what ``cache`` holds)
    must leave room in the model's context for one token; generation ends ("length") where the
    context does (``max_tokens=None``: only there).
    The last event carries ``finish_reason`` and :class:`GenerationStats`.
    """
    ids, tokenizer = prompt_tokens(
        prompt,
        tokenizer,
        tools=tools,
        reasoning_effort=reasoning_effort,
        response_format=response_format,
    )
    if not ids:
        raise GptOssError("the prompt is empty: give at least one token")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and not all(0 <= t < vocab for t in ids):
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise GptOssError(
            f"prompt token id {bad} is outside the model's vocabulary (0..{vocab - 1})"
        )
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise GptOssError(f"max_tokens must be an integer >= 1 (or None), got {max_tokens!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise GptOssError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    if logprobs is not None and (
        isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20
    ):
        raise GptOssError(f"logprobs must be an integer in 0..20 (or None), got {logprobs!r}")
    stop = [stop] if isinstance(stop, str) else list(stop or ())
    if not all(isinstance(s, str) for s in stop):
        raise GptOssError(f"stop must be a string or a list of strings, got {stop!r}")
    if stop and tokenizer is None:
        raise GptOssError("stop strings need a tokenizer (to read the answer's text)")
    sampler = sampler or make_sampler(temperature, top_p, top_k, min_p, seed=seed)
    group = getattr(model, "group", None)
    check_same_tokens(ids, group)
    sampler = shared_sampler(sampler, group, cancelled)
    constraint = None
    if response_format is not None or tool_choice is not None or tools:
        constraint = compile_constraint(
            tokenizer or default_tokenizer(),
            response_format=response_format,
            tools=tools,
            tool_choice=tool_choice,
        )
    guide = constraint.guide(sampler) if constraint is not None else None
    stops = frozenset(int(t) for t in stop_tokens)
    if cache is None:
        cache = model.make_cache()
    held = getattr(cache[0], "offset", 0) if cache else 0
    check_context(model, len(ids), held)
    context = context_length(model)
    if context is not None:
        max_tokens = min(max_tokens or context, context - held - len(ids))
    elif max_tokens is None:
        raise GptOssError("max_tokens=None (to the end of the context) needs a model that says its")
    if guide is not None:
        tokenizer = guide.tok
    parser = StreamParser(tokenizer) if tokenizer is not None else None
    prefill = functools.partial(
        _prefill,
        chunk=prefill_chunk,
        progress=progress,
        pauses=prefill_pauses,
        on_pause=on_pause,
    )
    stopper = _StopStrings(stop) if stop else None
    # A draw can be STOPPED: with `cancelled`, or rank 0's cancellation across ranks.
    stoppable = cancelled is not None or (group is not None and group.size() > 1)
    return _generate_events(
        model,
        ids,
        cache,
        sampler,
        max_tokens,
        prefill,
        stops,
        parser,
        stopper,
        logprobs,
        guide,
        stoppable,
    )


def _generate_events(
    model,
    ids,
    cache,
    sampler,
    max_tokens,
    prefill,
    stops,
    parser,
    stopper,
    logprobs,
    guide: Guide | None,
    stoppable: bool,
) -> Iterator[GenerationEvent]:
    mx.reset_peak_memory()
    stats = GenerationStats(prompt_tokens=len(ids))
    describe = getattr(model, "describe", None)
    stats.precision = describe() if describe is not None else ""
    counters = getattr(model, "expert_cache_stats", lambda: None)
    at_start = counters()
    tic = time.perf_counter()

    def forward(token: mx.array) -> mx.array:
        if stoppable:  # STOPPED (-1) is no token: feed 0 in its place (that step is dropped)
            token = mx.maximum(token, 0)
        return model(token.reshape(1, 1), cache=cache)[:, -1, :]

    def with_logprobs(token: mx.array, logits: mx.array) -> tuple[mx.array, ...]:
        """The sampled token's log probability and the top ones, when asked for (lazy)."""
        return _with_logprobs(token, logits, logprobs)[1:] if logprobs is not None else ()

    logits = prefill(model, ids, cache)
    y = sampler(logits) if guide is None else guide.first(logits)
    after_prefill = counters()  # an expert cache counts while the graph is built
    y_logprobs = with_logprobs(y, logits)
    mx.async_eval(y, *y_logprobs)
    t_first = t_last = tic
    n = 0
    while True:
        if n + 1 < max_tokens:  # queue the next step before waiting for this token
            logits = forward(y)
            if guide is None:
                next_y = sampler(logits)
            else:  # a free draw as above, or None if the token will be masked (drawn below)
                next_y = guide.propose(logits)
            next_logprobs = with_logprobs(next_y, logits) if next_y is not None else ()
            mx.async_eval(logits if next_y is None else next_y, *next_logprobs)
        token = int(y.item())
        if token == STOPPED:  # cancelled: the step queued above fed it, so forget that position
            if n + 1 < max_tokens:
                for c in cache:
                    c.trim(1)
            return
        n += 1
        t_last = time.perf_counter()
        if n == 1:
            t_first = t_last
        deltas = parser.feed(token) if parser is not None else []
        ends = guide.feed(token, deltas) if guide is not None else True
        finish = FINISH_REASONS.get(token, "stop") if token in stops and ends else None
        if finish is None and n >= max_tokens:
            finish = "length"
        event = GenerationEvent(token=token, deltas=deltas)
        if stopper is not None:
            event.deltas = stopper.filter(event.deltas)
            if stopper.hit and finish is None:
                finish = "stop"
        if guide is not None and finish is None:  # token n decides what constrains n+1: draw it
            next_y = guide.choose(logits, next_y)
            next_logprobs = with_logprobs(next_y, logits)
            mx.async_eval(next_y, *next_logprobs)
        if parser is not None and not parser.tok.is_special(token):
            event.part = parser.kind
        if logprobs is not None:
            event.logprob = y_logprobs[0].item()
            if logprobs:
                pairs = zip(y_logprobs[1][0].tolist(), y_logprobs[2][0].tolist(), strict=True)
                event.top_logprobs = sorted(pairs, key=lambda p: -p[1])
        if finish is not None:
            if parser is not None:
                end = parser.finish()
                event.deltas += stopper.filter(end) + stopper.flush() if stopper else end
            stats.time_to_first_token = t_first - tic
            stats.prompt_tps = len(ids) / max(stats.time_to_first_token, 1e-9)
            stats.generation_tokens = n
            stats.generation_tps = (
                (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0
            )
            stats.peak_memory = int(mx.get_peak_memory())
            stats.finish_reason = finish
            if at_start is not None:
                stats.expert_cache = {
                    "prefill": _difference(after_prefill, at_start),
                    "decode": _difference(counters(), after_prefill),
                }
            if guide is not None:
                stats.masked_tokens, stats.mask_seconds = guide.masked_tokens, guide.mask_seconds
            event.finish_reason, event.stats = finish, stats
        if event.deltas:
            event.text = "".join(d.text for d in event.deltas)
            event.kind, event.channel = event.deltas[-1].kind, event.deltas[-1].channel
        yield event
        if finish is not None:
            return
        y, y_logprobs = next_y, next_logprobs


def _difference(later: dict[str, int], earlier: dict[str, int]) -> dict[str, int]:
    return {k: later[k] - earlier[k] for k in later}


def generate(
    model: LanguageModel,
    prompt: Prompt,
    *,
    tokenizer: Tokenizer | None = None,
    on_event: Callable[[GenerationEvent], None] | None = None,
    **kwargs,
) -> dict:
    """Run :func:`stream_generate` to the end and return the parsed result.

    ``{"reasoning", "content", "tool_calls"}`` as :func:`harmony.parse_completion` gives them
    (empty without a tokenizer; ``content`` cut before a ``stop`` string, as streamed), plus
    ``"prompt_token_ids"``, ``"completion_token_ids"`` (stop token included),
    ``"finish_reason"`` and ``"stats"`` (a dict). With a JSON ``response_format``
    (``json_schema`` or ``json_object``) also ``"parsed"``: the answer as a Python object, None
    when generation stopped before the answer was complete (or a stop string cut it). ``on_event``
    sees every :class:`GenerationEvent` as it is generated (to print a reply while it streams).
    """
    ids, tokenizer = prompt_tokens(
        prompt,
        tokenizer,
        tools=kwargs.get("tools"),
        reasoning_effort=kwargs.get("reasoning_effort", "medium"),
        response_format=kwargs.get("response_format"),
    )
    fmt = parse_response_format(kwargs.get("response_format"))
    tokens, stats, content = [], None, []
    for event in stream_generate(model, ids, tokenizer=tokenizer, **kwargs):
        tokens.append(event.token)
        stats = event.stats or stats
        content += [d.text for d in event.deltas if d.kind == "content"]
        if on_event is not None:
            on_event(event)
    if stats is None:  # `cancelled` ended it: no event carried statistics
        stats = GenerationStats(generation_tokens=len(tokens), finish_reason="cancelled")
    if tokenizer is not None:
        result = parse_completion(tokens, tokenizer)
        result["content"] = "".join(content)  # the parse's content, less what a stop string cut
    else:
        result = {"reasoning": "", "content": "", "tool_calls": []}
    result.update(
        prompt_token_ids=ids,
        completion_token_ids=tokens,
        finish_reason=stats.finish_reason,
        stats=stats.to_dict(),
    )
    if fmt is not None and fmt.is_json:
        result["parsed"] = None
        if stats.finish_reason == "stop":
            try:
                result["parsed"] = json.loads(result["content"])
            except ValueError:  # the answer was cut by a stop string
                pass
    return result
