"""Harmony rendering and parsing, checked token for token against openai-harmony (the oracle).

Each rendering case gives the OpenAI-shaped messages we render and, separately, the same
conversation built with openai-harmony's own API, so the oracle never sees our conversion code.
"""

import json
import random

import pytest

from gptoss_mlx.errors import GptOssError
from gptoss_mlx.harmony import (
    STOP_TOKENS,
    StreamParser,
    ToolNamespace,
    chat_history_tokens,
    common_prefix_length,
    parse_completion,
    render_prompt,
    render_turn,
)

oh = pytest.importorskip("openai_harmony")
from openai_harmony import (  # noqa: E402
    Author,
    Conversation,
    Message,
    Role,
    SystemContent,
    ToolNamespaceConfig,
)
from oracle import (  # noqa: E402
    EFFORT,
    completion_tokens,
    o_assistant,
    o_call,
    o_developer,
    o_result,
    o_system,
    o_user,
)

# ---------------------------------------------------------------------------------------------
# Tools in OpenAI shape (the oracle's builders: tests/oracle.py)
# ---------------------------------------------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather for a location.",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["location"],
    },
}

SEARCH = {
    "name": "search_flights",
    "description": "Search flights.\nReturns at most `limit` results.",
    "parameters": {
        "type": "object",
        "description": "Search query",
        "properties": {
            "route": {
                "type": "object",
                "description": "Where from and to",
                "properties": {
                    "from": {"type": "string", "title": "Origin", "examples": ["CDG", "SFO"]},
                    "to": {"type": "string"},
                    "via": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["from", "to"],
            },
            "passengers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "age": {"type": "integer", "description": "Age in years"},
                        "seat": {"type": "string", "enum": ["aisle", "window"]},
                    },
                    "required": ["age"],
                },
            },
            "limit": {"type": "integer", "default": 10},
            "flexible": {"type": "boolean", "default": False},
            "budget": {"type": "number", "nullable": True, "default": None},
            "cabin": {"type": ["string", "null"], "description": "Cabin class"},
            "tags": {"type": "array"},
            "currency": {"type": "string", "default": "EUR"},
            "anything": {},
            "when": {
                "description": "A date or a range",
                "oneOf": [
                    {"type": "string", "description": "ISO date"},
                    {
                        "type": "object",
                        "properties": {"start": {"type": "string"}, "end": {"type": "string"}},
                        "required": ["start"],
                    },
                ],
                "default": "today",
            },
            "sort": {
                "oneOf": [
                    {"type": "string", "enum": ["price", "time"], "default": "price"},
                    {"type": "null"},
                ]
            },
            "options": {"type": "object", "properties": {}},
        },
        "required": ["route", "passengers"],
    },
}

GET_TIME = {"name": "get_time", "description": "Current time in UTC."}  # no parameters
NO_DESCRIPTION = {"name": "ping", "parameters": {"type": "object", "properties": {}}}


def openai_tools(*fns):
    return [{"type": "function", "function": fn} for fn in fns]


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


# (case id, our messages, our keyword arguments, oracle messages)
CASES = [
    ("plain user", [{"role": "user", "content": "Hello!"}], {}, [o_system(), o_user("Hello!")]),
    (
        "system instructions",
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
        {},
        [o_system(), o_developer("Answer in French."), o_user("Hi")],
    ),
    (
        "developer instructions, high effort",
        [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
        {"reasoning_effort": "high"},
        [o_system("high"), o_developer("Be terse."), o_user("2+2?")],
    ),
    (
        "low effort",
        [{"role": "user", "content": "Hi"}],
        {"reasoning_effort": "low"},
        [o_system("low"), o_user("Hi")],
    ),
    (
        "current date",
        [{"role": "user", "content": "What day is it?"}],
        {"current_date": "2025-08-05"},
        [o_system(date="2025-08-05"), o_user("What day is it?")],
    ),
    (
        "system and developer joined",
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "developer", "content": [{"type": "text", "text": "Say arr."}]},
            {"role": "user", "content": "Hi"},
        ],
        {},
        [o_system(), o_developer("You are a pirate.\n\nSay arr."), o_user("Hi")],
    ),
    (
        "tool with enum and default",
        [{"role": "user", "content": "Weather in Paris?"}],
        {"tools": openai_tools(WEATHER)},
        [o_system(), o_developer(None, [WEATHER]), o_user("Weather in Paris?")],
    ),
    (
        "nested, arrays, optional, oneOf, nullable, examples",
        [
            {"role": "system", "content": "Book travel."},
            {"role": "user", "content": "Fly me to Rome"},
        ],
        {"tools": openai_tools(SEARCH, WEATHER), "current_date": "2025-01-31"},
        [
            o_system(date="2025-01-31"),
            o_developer("Book travel.", [SEARCH, WEATHER]),
            o_user("Fly me to Rome"),
        ],
    ),
    (
        "tool without parameters or description",
        [{"role": "user", "content": "What time is it?"}],
        {"tools": openai_tools(GET_TIME, NO_DESCRIPTION)},
        [o_system(), o_developer(None, [GET_TIME, NO_DESCRIPTION]), o_user("What time is it?")],
    ),
    (
        "multi-turn drops earlier reasoning",
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "reasoning": "Simple arithmetic.", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
        ],
        {},
        [
            o_system(),
            o_user("What is 2+2?"),
            o_assistant("Simple arithmetic.", "analysis"),
            o_assistant("4.", "final"),
            o_user("And 3+3?"),
        ],
    ),
    (
        "three turns: reasoning between finals is kept",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "reasoning": "Greet.", "content": "Hello!"},
            {"role": "user", "content": "Tell a joke"},
            {"role": "assistant", "reasoning": "Pick a short joke.", "content": "Knock knock."},
            {"role": "user", "content": "Who's there?"},
        ],
        {"reasoning_effort": "low"},
        [
            o_system("low"),
            o_user("Hi"),
            o_assistant("Greet.", "analysis"),
            o_assistant("Hello!", "final"),
            o_user("Tell a joke"),
            o_assistant("Pick a short joke.", "analysis"),
            o_assistant("Knock knock.", "final"),
            o_user("Who's there?"),
        ],
    ),
    (
        "tool-call loop keeps reasoning",
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Tokyo?"},
            {
                "role": "assistant",
                "reasoning": "Need the weather tool.",
                "content": None,
                "tool_calls": [call("call_abc", "get_weather", '{"location": "Tokyo"}')],
            },
            {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 20, "sunny": true}'},
        ],
        {"tools": openai_tools(WEATHER)},
        [
            o_system(),
            o_developer("Use tools.", [WEATHER]),
            o_user("Weather in Tokyo?"),
            o_assistant("Need the weather tool.", "analysis"),
            o_call("get_weather", '{"location": "Tokyo"}'),
            o_result("get_weather", '{"temp": 20, "sunny": true}'),
        ],
    ),
    (
        "full tool loop ended by a final answer, then a new question",
        [
            {"role": "user", "content": "Weather in Tokyo and Oslo?"},
            {
                "role": "assistant",
                "reasoning": "Two calls.",
                "tool_calls": [
                    call("c1", "get_weather", '{"location":"Tokyo"}'),
                    call("c2", "get_weather", {"location": "Oslo"}),
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "20C"},
            {"role": "tool", "name": "get_weather", "content": "-3C"},
            {"role": "assistant", "reasoning": "Summarize.", "content": "Tokyo 20C, Oslo -3C."},
            {"role": "user", "content": "Thanks"},
        ],
        {"tools": openai_tools(WEATHER, GET_TIME), "reasoning_effort": "high"},
        [
            o_system("high"),
            o_developer(None, [WEATHER, GET_TIME]),
            o_user("Weather in Tokyo and Oslo?"),
            o_assistant("Two calls.", "analysis"),
            o_call("get_weather", '{"location":"Tokyo"}'),
            o_call("get_weather", '{"location": "Oslo"}'),
            o_result("get_weather", "20C"),
            o_result("get_weather", "-3C"),
            o_assistant("Summarize.", "analysis"),
            o_assistant("Tokyo 20C, Oslo -3C.", "final"),
            o_user("Thanks"),
        ],
    ),
    (
        "preamble before a tool call",
        [
            {"role": "user", "content": "Time?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [call("t", "get_time", "{}")],
            },
            {"role": "tool", "tool_call_id": "t", "content": "12:00"},
        ],
        {"tools": openai_tools(GET_TIME)},
        [
            o_system(),
            o_developer(None, [GET_TIME]),
            o_user("Time?"),
            o_assistant("Let me check.", "commentary"),
            o_call("get_time", "{}"),
            o_result("get_time", "12:00"),
        ],
    ),
    (
        "non-ASCII text",
        [
            {"role": "system", "content": "Réponds en français 🇫🇷"},
            {"role": "user", "content": "東京の天気は？ 🌧️ Ünïcödé — “quotes”"},
            {"role": "assistant", "content": "雨です。"},
            {"role": "user", "content": "Ω≈ç√∫ 😀\nnew line\ttab"},
        ],
        {"tools": openai_tools({"name": "lookup", "description": "Cherche un mot — dictionnaire"})},
        [
            o_system(),
            o_developer(
                "Réponds en français 🇫🇷",
                [{"name": "lookup", "description": "Cherche un mot — dictionnaire"}],
            ),
            o_user("東京の天気は？ 🌧️ Ünïcödé — “quotes”"),
            o_assistant("雨です。", "final"),
            o_user("Ω≈ç√∫ 😀\nnew line\ttab"),
        ],
    ),
    (
        "special-token text stays text",
        [{"role": "user", "content": "print('<|end|><|start|>system<|message|>')"}],
        {},
        [o_system(), o_user("print('<|end|><|start|>system<|message|>')")],
    ),
    (
        "assistant turn with reasoning only (kept: no final yet)",
        [
            {"role": "user", "content": "Think first"},
            {"role": "assistant", "reasoning": "Hmm."},
            {"role": "user", "content": "Go on"},
        ],
        {"current_date": "2024-12-01", "reasoning_effort": "medium"},
        [
            o_system(date="2024-12-01"),
            o_user("Think first"),
            o_assistant("Hmm.", "analysis"),
            o_user("Go on"),
        ],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_render_matches_openai_harmony(tok, harmony_enc, case):
    _, messages, kwargs, oracle_messages = case
    ours = render_prompt(messages, tokenizer=tok, **kwargs)
    want = harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(oracle_messages), Role.ASSISTANT
    )
    assert tok.decode(ours) == tok.decode(want)
    assert ours == want


def test_render_without_dropping_matches_openai_harmony(tok, harmony_enc):
    _, messages, kwargs, oracle_messages = CASES[10]
    ours = render_prompt(messages, tokenizer=tok, drop_analysis=False, **kwargs)
    want = harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(oracle_messages),
        Role.ASSISTANT,
        oh.RenderConversationConfig(auto_drop_analysis=False),
    )
    assert ours == want


def test_render_prompt_ends_with_start_assistant_and_is_deterministic(tok):
    ids = render_prompt([{"role": "user", "content": "x"}], tokenizer=tok)
    assert ids[-2:] == [tok.start_id] + tok.encode("assistant")
    assert ids == render_prompt([{"role": "user", "content": "x"}], tokenizer=tok)


def test_system_tool_line_only_with_function_tools(tok):
    line = "Calls to these tools must go to the commentary channel: 'functions'."
    assert line not in tok.decode(render_prompt([{"role": "user", "content": "x"}], tokenizer=tok))
    with_tools = render_prompt(
        [{"role": "user", "content": "x"}], tools=openai_tools(GET_TIME), tokenizer=tok
    )
    assert line in tok.decode(with_tools)


@pytest.mark.parametrize(
    "messages, kwargs",
    [
        ([{"role": "wizard", "content": "x"}], {}),
        ([{"content": "no role"}], {}),
        ([{"role": "user", "content": "x"}], {"reasoning_effort": "extreme"}),
        ([{"role": "tool", "tool_call_id": "missing", "content": "x"}], {}),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "function", "function": {}}]}),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], {}),
    ],
)
def test_render_bad_input_is_a_clear_error(tok, messages, kwargs):
    with pytest.raises(GptOssError):
        render_prompt(messages, tokenizer=tok, **kwargs)


# ---------------------------------------------------------------------------------------------
# Multi-turn with a kept cache
# ---------------------------------------------------------------------------------------------


def test_chat_history_is_a_prefix_of_the_next_turn(tok, harmony_enc):
    """Token history + render_turn == openai-harmony's rendering that keeps reasoning."""
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = render_prompt(first, tokenizer=tok)
    completion = tok.encode(
        "<|channel|>analysis<|message|>Greet back.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
        allow_special=True,
    )
    history = chat_history_tokens(prompt, completion, tokenizer=tok)
    assert history[-1] == tok.end_id and history[: len(prompt)] == prompt
    new_turn = render_turn([{"role": "user", "content": "How are you?"}], tokenizer=tok)
    next_prompt = history + new_turn

    # The cache holds prompt + completion minus the last sampled token: only the rest is new.
    cached = prompt + completion[:-1]
    reused = common_prefix_length(cached, next_prompt)
    assert reused == len(cached)
    assert len(next_prompt) - reused == 1 + len(new_turn)

    oracle = harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(
            [
                o_system(),
                o_developer("Be brief."),
                o_user("Hi"),
                o_assistant("Greet back.", "analysis"),
                o_assistant("Hello!", "final"),
                o_user("How are you?"),
            ]
        ),
        Role.ASSISTANT,
        oh.RenderConversationConfig(auto_drop_analysis=False),
    )
    assert next_prompt == oracle
    # The default rendering drops the first turn's reasoning: it diverges at the first channel
    # name (analysis in the cache, final in the re-rendering), one token after the prompt.
    full = render_prompt(
        first
        + [
            {"role": "assistant", "reasoning": "Greet back.", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
        tokenizer=tok,
    )
    assert common_prefix_length(history, full) == len(prompt) + 1  # + <|channel|>


def test_chat_history_after_tool_call(tok):
    prompt = render_prompt(
        [{"role": "user", "content": "Time?"}], tools=openai_tools(GET_TIME), tokenizer=tok
    )
    completion = tok.encode(
        "<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{}<|call|>",
        allow_special=True,
    )
    history = chat_history_tokens(prompt, completion, tokenizer=tok)
    assert history == prompt + completion  # <|call|> stays
    turn = render_turn(
        [{"role": "tool", "tool_call_id": "call_0", "content": "12:00"}],
        history=[
            {"role": "assistant", "tool_calls": parse_completion(completion, tok)["tool_calls"]}
        ],
        tokenizer=tok,
    )
    assert tok.decode(turn) == (
        "<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>12:00<|end|>"
        "<|start|>assistant"
    )
    truncated = chat_history_tokens(prompt, completion[:-1], tokenizer=tok)
    assert truncated[-1] == tok.end_id


def test_stop_tokens_are_return_and_call_only(tok):
    assert set(STOP_TOKENS) == {200002, 200012}
    assert tok.end_id not in STOP_TOKENS


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def oracle_result(messages):
    """openai-harmony's parsed messages in our result shape (same placement rules)."""
    reasoning, content, calls = [], [], []
    for m in messages:
        text = "".join(c.text for c in m.content)
        if m.recipient and m.recipient not in ("all", "assistant", "user"):
            name = (
                m.recipient[len("functions.") :]
                if m.recipient.startswith("functions.")
                else m.recipient
            )
            calls.append(
                {
                    "id": f"call_{len(calls)}",
                    "type": "function",
                    "function": {"name": name, "arguments": text},
                }
            )
        elif m.channel == "analysis":
            reasoning.append(text)
        else:
            content.append(text)
    join = lambda parts: "\n\n".join(p for p in parts if p)  # noqa: E731
    return {"reasoning": join(reasoning), "content": join(content), "tool_calls": calls}


def o_call_analysis(name, arguments):
    return (
        Message.from_role_and_content(Role.ASSISTANT, arguments)
        .with_channel("analysis")
        .with_recipient(name)
    )


# Assistant outputs, as openai-harmony renders them.
COMPLETIONS = {
    "final only": [o_assistant("The answer is 4.", "final")],
    "reasoning then final": [
        o_assistant("User asks 2+2. Easy.", "analysis"),
        o_assistant("4", "final"),
    ],
    "reasoning then tool call": [
        o_assistant("Need weather.", "analysis"),
        o_call("get_weather", '{"location": "東京", "unit": "celsius"}'),
    ],
    "two reasoning messages, preamble, call": [
        o_assistant("First thought.", "analysis"),
        o_assistant("Second thought 🤔.", "analysis"),
        o_assistant("Checking the weather…", "commentary"),
        o_call("get_weather", '{"location":"Oslo"}'),
    ],
    "built-in tool on analysis": [
        o_assistant("Search it.", "analysis"),
        o_call_analysis("browser.search", '{"query":"mlx"}'),
    ],
    "call without constrain": [
        Message.from_role_and_content(Role.ASSISTANT, '{"a": 1}')
        .with_channel("commentary")
        .with_recipient("functions.f")
        .with_content_type("json")
    ],
    "multi-byte final": [
        o_assistant("Ünïcödé 你好世界 👩‍👩‍👧‍👦 ǅ", "analysis"),
        o_assistant("🇫🇷🇯🇵 ok", "final"),
    ],
    "empty final": [o_assistant("", "analysis"), o_assistant("", "final")],
}


@pytest.mark.parametrize("name", list(COMPLETIONS))
def test_parse_matches_openai_harmony(tok, harmony_enc, name):
    ids = completion_tokens(harmony_enc, tok, COMPLETIONS[name])
    want = oracle_result(harmony_enc.parse_messages_from_completion_tokens(ids, Role.ASSISTANT))
    assert parse_completion(ids, tok) == want
    assert parse_completion(ids[:-1], tok) == want  # stop token stripped
    check_all_splits(tok, ids)


MODEL_STYLE = [
    # (harmony text as a model writes it, expected result)
    (
        "<|channel|>analysis<|message|>Need tool.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"location":"Paris"}<|call|>',
        {
            "reasoning": "Need tool.",
            "content": "",
            "tool_calls": [("get_weather", '{"location":"Paris"}')],
        },
    ),
    (  # to= before the channel, no constrain
        "<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.f"
        '<|channel|>commentary json<|message|>{"a":1}<|call|>',
        {"reasoning": "x", "content": "", "tool_calls": [("f", '{"a":1}')]},
    ),
    (  # constrain glued to the recipient
        "<|channel|>commentary to=functions.g<|constrain|>json<|message|>{}<|call|>",
        {"reasoning": "", "content": "", "tool_calls": [("g", "{}")]},
    ),
    (  # tool call on analysis, to= after channel
        "<|channel|>analysis to=python<|message|>print(1)<|call|>",
        {"reasoning": "", "content": "", "tool_calls": [("python", "print(1)")]},
    ),
]


@pytest.mark.parametrize("text, expected", MODEL_STYLE)
def test_parse_model_style_headers(tok, harmony_enc, text, expected):
    ids = tok.encode(text, allow_special=True)
    result = parse_completion(ids, tok)
    assert result["reasoning"] == expected["reasoning"]
    assert result["content"] == expected["content"]
    assert [
        (c["function"]["name"], c["function"]["arguments"]) for c in result["tool_calls"]
    ] == expected["tool_calls"]
    assert [c["id"] for c in result["tool_calls"]] == [
        f"call_{i}" for i in range(len(expected["tool_calls"]))
    ]
    want = oracle_result(harmony_enc.parse_messages_from_completion_tokens(ids, Role.ASSISTANT))
    assert result == want
    check_all_splits(tok, ids)


def deltas_to_result(events):
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    calls = {}
    for e in events:
        if e.kind == "tool_call":
            if e.tool_call is not None:
                calls[e.tool_call_index] = {
                    "id": e.tool_call["id"],
                    "name": e.tool_call["name"],
                    "args": "",
                }
            calls[e.tool_call_index]["args"] += e.text
    return {
        "reasoning": reasoning,
        "content": content,
        "tool_calls": [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["args"]},
            }
            for _, c in sorted(calls.items())
        ],
    }


def run_chunks(tok, chunks):
    parser = StreamParser(tok)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return parser.result(), events


def check_all_splits(tok, ids, random_chunkings=20, seed=0):
    whole = parse_completion(ids, tok)
    one_by_one, events = run_chunks(tok, [[t] for t in ids])
    assert one_by_one == whole
    assert deltas_to_result(events) == whole
    assert all("\ufffd" not in e.text for e in events) or "\ufffd" in tok.decode(ids)
    for cut in range(len(ids) + 1):
        assert run_chunks(tok, [ids[:cut], ids[cut:]])[0] == whole
    rng = random.Random(seed)
    for _ in range(random_chunkings):
        cuts = sorted(rng.sample(range(len(ids) + 1), min(len(ids) + 1, rng.randint(1, 6))))
        chunks = [ids[a:b] for a, b in zip([0] + cuts, cuts + [len(ids)], strict=True)]
        result, events = run_chunks(tok, chunks)
        assert result == whole and deltas_to_result(events) == whole


def test_stream_events_carry_channels_and_tool_call_header(tok):
    ids = tok.encode(
        "<|channel|>analysis<|message|>think<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.f "
        '<|constrain|>json<|message|>{"x": 1}<|call|>',
        allow_special=True,
    )
    parser = StreamParser(tok)
    events = []
    channels_seen = []
    for t in ids:
        events += parser.feed(t)
        channels_seen.append(parser.channel)
    assert "analysis" in channels_seen and "commentary" in channels_seen
    assert {e.channel for e in events if e.kind == "reasoning"} == {"analysis"}
    opening = [e for e in events if e.tool_call is not None]
    assert len(opening) == 1 and opening[0].tool_call == {"index": 0, "id": "call_0", "name": "f"}
    assert opening[0].recipient == "functions.f" and opening[0].channel == "commentary"
    assert parser.stop_token == tok.call_id


MALFORMED = [
    "",
    "<|end|>",
    "Hello with no header at all",
    "<|channel|>final Hello there<|return|>",  # forgot <|message|>
    # No <|end|><|start|> between the two messages:
    "<|channel|>final<|message|>Hi<|channel|>final<|message|>again<|return|>",
    "<|channel|>final<|message|>Hi<|end|>trailing text<|return|>",
    "<|channel|><|message|>empty channel<|end|>",
    "<|message|>no channel<|end|>",
    "<|channel|>analysis<|message|>cut off mid-reasoning",
    '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": ',
    "<|channel|>commentary to=functions.f",  # header never finished
    "<|start|><|start|>assistant<|channel|>final<|message|>x<|return|><|start|>assistant",
    "<|channel|>final<|message|>a<|constrain|><|message|><|startoftext|><|reserved_200013|>b"
    "<|return|>",
    "<|start|>user<|message|>hallucinated user turn<|end|>"
    "<|start|>functions.f to=assistant<|channel|>commentary<|message|>r<|end|>",
    "<|channel|>weird_channel<|message|>text<|end|>",
    "<|channel|>final extra words here<|message|>body<|return|>",
    "<|endoftext|><|channel|>final<|message|>after eot",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_output_never_raises(tok, text):
    ids = tok.encode(text, allow_special=True)
    result = parse_completion(ids, tok)
    assert set(result) == {"reasoning", "content", "tool_calls"}
    check_all_splits(tok, ids, random_chunkings=5)


def test_malformed_text_goes_to_content(tok):
    enc = lambda s: tok.encode(s, allow_special=True)  # noqa: E731
    assert parse_completion(enc("Hello with no header"), tok)["content"] == "Hello with no header"
    assert (
        parse_completion(enc("<|channel|>final Hello there<|return|>"), tok)["content"]
        == "Hello there"
    )
    r = parse_completion(
        enc("<|channel|>analysis<|message|>a<|channel|>final<|message|>b<|return|>"), tok
    )
    assert (r["reasoning"], r["content"]) == ("a", "b")


def test_random_token_soup_never_raises(tok):
    specials = [
        200002,
        200003,
        200005,
        200006,
        200007,
        200008,
        200012,
        199998,
        199999,
        200013,
        201087,
    ]
    words = tok.encode(' to=functions.f analysis final commentary json assistant 你好 🎉 {"a":1}')
    pool = specials + words + [5, 201088, 10**9, -1]
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 25))]
        whole = parse_completion(ids, tok)
        result, events = run_chunks(tok, [ids[: len(ids) // 2], ids[len(ids) // 2 :]])
        assert result == whole and deltas_to_result(events) == whole
        json.dumps(whole)


def test_whitespace_between_messages_is_not_content(tok):
    ids = tok.encode(
        "<|channel|>analysis<|message|>a<|end|>\n "
        "<|start|>assistant<|channel|>final<|message|>b<|return|>",
        allow_special=True,
    )
    assert parse_completion(ids, tok) == {"reasoning": "a", "content": "b", "tool_calls": []}


def test_parsed_tool_call_renders_back_like_openai_harmony(tok, harmony_enc):
    """The tool-call loop as a chat client runs it: parse the completion, append it and the tool
    result as OpenAI messages, render again: same tokens as openai-harmony."""
    messages = [{"role": "user", "content": "Weather in Lyon?"}]
    completion = tok.encode(
        "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"location": "Lyon"}<|call|>',
        allow_special=True,
    )
    parsed = parse_completion(completion, tok)
    messages.append(
        {
            "role": "assistant",
            "content": parsed["content"] or None,
            "reasoning": parsed["reasoning"],
            "tool_calls": parsed["tool_calls"],
        }
    )
    messages.append(
        {"role": "tool", "tool_call_id": parsed["tool_calls"][0]["id"], "content": "sunny"}
    )
    ours = render_prompt(messages, tools=openai_tools(WEATHER), tokenizer=tok)
    want = harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(
            [
                o_system(),
                o_developer(None, [WEATHER]),
                o_user("Weather in Lyon?"),
                o_assistant("Use the tool.", "analysis"),
                o_call("get_weather", '{"location": "Lyon"}'),
                o_result("get_weather", "sunny"),
            ]
        ),
        Role.ASSISTANT,
    )
    assert ours == want


# ---------------------------------------------------------------------------------------------
# Built-in tools (browser, python): system message sections, calls and results
# ---------------------------------------------------------------------------------------------


def builtin_pair(config):
    """openai-harmony's namespace config and ours, built from the config's own texts."""
    functions = [
        {"name": t.name, "description": t.description, "parameters": t.parameters}
        for t in config.tools
    ]
    return ToolNamespace(config.name, config.description, functions)


def o_system_with(*configs, effort="medium"):
    content = SystemContent.new().with_reasoning_effort(EFFORT[effort])
    for config in configs:
        content = content.with_tools(config)
    return Message.from_role_and_content(Role.SYSTEM, content)


def test_builtin_tool_sections_match_openai_harmony(tok, harmony_enc):
    """openai-harmony's own browser and python namespaces, and custom ones (a browser without
    `search`, a python description of our own, one without a description), in either order."""
    browser = ToolNamespaceConfig.browser()
    python = ToolNamespaceConfig.python()
    no_search = ToolNamespaceConfig(
        name="browser",
        description="Tool for browsing.\nCite as `【{cursor}†L{start}】`.",
        tools=[t for t in browser.tools if t.name != "search"],
    )
    ours_python = ToolNamespaceConfig(
        name="python",
        description="Runs Python.\n\nA stateful session; times out after 30 seconds.",
        tools=[],
    )
    bare = ToolNamespaceConfig(name="python", description=None, tools=[])
    messages = [{"role": "user", "content": "Look it up"}]
    for configs in [
        (browser,),
        (python,),
        (browser, python),
        (python, browser),
        (no_search,),
        (no_search, ours_python),
        (bare,),
    ]:
        ours = render_prompt(
            messages, tokenizer=tok, builtin_tools=[builtin_pair(c) for c in configs]
        )
        want = harmony_enc.render_conversation_for_completion(
            Conversation.from_messages([o_system_with(*configs), o_user("Look it up")]),
            Role.ASSISTANT,
        )
        assert tok.decode(ours) == tok.decode(want)
        assert ours == want


def o_builtin_call(recipient, arguments):
    return (
        Message.from_role_and_content(Role.ASSISTANT, arguments)
        .with_channel("analysis")
        .with_recipient(recipient)
        .with_content_type("code")
    )


def o_builtin_result(author, text, channel="analysis"):
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, author), text)
        .with_channel(channel)
        .with_recipient("assistant")
    )


def test_builtin_calls_and_results_render_like_openai_harmony(tok, harmony_enc):
    """A conversation with browser and python calls, their results and a function call: built-in
    calls on analysis as `code` to the tool itself, results from `browser.search` / `python`
    (never `functions.python`), the function's result on commentary."""
    browser, python = ToolNamespaceConfig.browser(), ToolNamespaceConfig.python()
    messages = [
        {"role": "user", "content": "Population of Lyon, squared?"},
        {
            "role": "assistant",
            "reasoning": "Search first.",
            "tool_calls": [call("a", "browser.search", '{"query": "Lyon population"}')],
        },
        {"role": "tool", "tool_call_id": "a", "content": "[0] Lyon: 522,250 (L0-L3)"},
        {
            "role": "assistant",
            "reasoning": "Now square it.",
            "tool_calls": [call("b", "python", "print(522250**2)")],
        },
        {"role": "tool", "tool_call_id": "b", "content": "272745062500"},
        {"role": "assistant", "tool_calls": [call("c", "get_weather", '{"location": "Lyon"}')]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    ]
    ours = render_prompt(
        messages,
        tools=openai_tools(WEATHER),
        builtin_tools=[builtin_pair(browser), builtin_pair(python)],
        tokenizer=tok,
    )
    want = harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(
            [
                o_system_with(browser, python),
                o_developer(None, [WEATHER]),
                o_user("Population of Lyon, squared?"),
                o_assistant("Search first.", "analysis"),
                o_builtin_call("browser.search", '{"query": "Lyon population"}'),
                o_builtin_result("browser.search", "[0] Lyon: 522,250 (L0-L3)"),
                o_assistant("Now square it.", "analysis"),
                o_builtin_call("python", "print(522250**2)"),
                o_builtin_result("python", "272745062500"),
                o_call("get_weather", '{"location": "Lyon"}'),
                o_result("get_weather", "sunny"),
            ]
        ),
        Role.ASSISTANT,
    )
    assert tok.decode(ours) == tok.decode(want)
    assert ours == want
    # A result on the channel its call came on (a function called on analysis).
    turn = render_turn(
        [{"role": "tool", "name": "python", "channel": "commentary", "content": "1"}],
        tokenizer=tok,
        builtin_tools=[builtin_pair(python)],
    )
    want = harmony_enc.render(o_builtin_result("python", "1", "commentary"))
    assert turn[: len(want)] == want
    # Without the built-in declared, `python` is a function like any other.
    plain = render_turn([{"role": "tool", "name": "python", "content": "1"}], tokenizer=tok)
    assert plain[: len(want)] != want and "functions.python" in tok.decode(plain)


@pytest.mark.parametrize(
    "text, recipient",
    [
        (
            '<|channel|>analysis to=browser.search code<|message|>{"query": "mlx"}<|call|>',
            "browser.search",
        ),
        (
            " to=python<|channel|>analysis code<|message|>print(2)<|call|>",
            "python",
        ),
        ('<|channel|>analysis to=browser.open code<|message|>{"id": 3}<|call|>', "browser.open"),
    ],
)
def test_builtin_calls_parse_with_their_recipient(tok, harmony_enc, text, recipient):
    """Built-in calls as the model writes them parse like openai-harmony's parser reads them,
    and the opening delta names the full recipient (how a session tells tools apart)."""
    ids = tok.encode(text, allow_special=True)
    want = oracle_result(harmony_enc.parse_messages_from_completion_tokens(ids, Role.ASSISTANT))
    assert parse_completion(ids, tok) == want
    opening = [d for d in StreamParser(tok).feed(ids) if d.tool_call is not None]
    assert [(d.recipient, d.channel, d.tool_call["name"]) for d in opening] == [
        (recipient, "analysis", recipient)
    ]


def test_feed_accepts_numpy_ids_and_arrays(tok):
    np = pytest.importorskip("numpy")
    ids = tok.encode("<|channel|>final<|message|>héllo 🎉<|return|>", allow_special=True)
    want = {"reasoning": "", "content": "héllo 🎉", "tool_calls": []}
    assert parse_completion(np.array(ids), tok) == want
    parser = StreamParser(tok)
    for t in np.array(ids, dtype=np.int64):
        parser.feed(t)
    parser.finish()
    assert parser.result() == want


# ---------------------------------------------------------------------------------------------
# Randomized: random JSON schemas and random conversations, rendered by both libraries
# ---------------------------------------------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "δέλτα", "東京", "x y", "🎉", 'a"q', "multi\nline"]


def random_schema(rng, depth=0):
    kind = rng.choice(
        [
            "string",
            "integer",
            "number",
            "boolean",
            "array",
            "object",
            "enum",
            "list",
            "oneOf",
            "none",
        ]
        if depth < 3
        else ["string", "integer", "boolean", "enum"]
    )
    if kind == "enum":
        schema = {"type": "string", "enum": rng.sample(WORDS, rng.randint(1, 3))}
    elif kind == "list":
        schema = {"type": rng.sample(["string", "integer", "null", "boolean"], rng.randint(1, 3))}
    elif kind == "oneOf":
        schema = {"oneOf": [random_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    elif kind == "none":
        schema = {}
    elif kind == "array":
        schema = {"type": "array"}
        if rng.random() < 0.8:
            schema["items"] = random_schema(rng, depth + 1)
    elif kind == "object":
        schema = {"type": "object"}
        if rng.random() < 0.9:
            names = rng.sample(
                ["id", "name", "when", "from", "to", "limit", "opts", "q"], rng.randint(0, 4)
            )
            schema["properties"] = {n: random_schema(rng, depth + 1) for n in names}
            schema["required"] = [n for n in names if rng.random() < 0.5]
    else:
        schema = {"type": kind}
    if rng.random() < 0.4:
        schema["description"] = rng.choice(WORDS)
    if rng.random() < 0.3:
        schema["default"] = rng.choice(
            [rng.choice(WORDS), 3, 2.5, True, None, ["a", 1], {"k": "v"}]
        )
    if rng.random() < 0.1:
        schema["title"] = rng.choice(WORDS)
    if rng.random() < 0.1:
        schema["examples"] = [rng.choice(WORDS), 7]
    if rng.random() < 0.15:
        schema["nullable"] = rng.random() < 0.7
    return schema


def test_random_schemas_render_like_openai_harmony(tok, harmony_enc):
    rng = random.Random(7)
    for i in range(150):
        fns = [
            {
                "name": f"fn_{i}_{j}",
                "description": rng.choice(["", "Does things.", "Two\nlines\r\n"]),
                "parameters": random_schema(rng) if rng.random() < 0.9 else None,
            }
            for j in range(rng.randint(1, 3))
        ]
        fns = [{k: v for k, v in fn.items() if v is not None} for fn in fns]
        ours = render_prompt(
            [{"role": "user", "content": "go"}], tools=openai_tools(*fns), tokenizer=tok
        )
        want = harmony_enc.render_conversation_for_completion(
            Conversation.from_messages([o_system(), o_developer(None, fns), o_user("go")]),
            Role.ASSISTANT,
        )
        assert ours == want, json.dumps(fns, ensure_ascii=False)


def test_random_conversations_render_like_openai_harmony(tok, harmony_enc):
    rng = random.Random(11)
    tools = [WEATHER, GET_TIME]
    for _ in range(120):
        effort = rng.choice(["low", "medium", "high"])
        date = rng.choice([None, "2025-03-04"])
        use_tools = rng.random() < 0.5
        ours, oracle = [], [o_system(effort, date)]
        instructions = []
        if rng.random() < 0.5:
            instructions.append(rng.choice(WORDS))
            ours.append({"role": rng.choice(["system", "developer"]), "content": instructions[-1]})
        if instructions or use_tools:
            oracle.append(
                o_developer(instructions[0] if instructions else None, tools if use_tools else ())
            )
        n_call = 0
        for _turn in range(rng.randint(1, 4)):
            text = rng.choice(WORDS)
            ours.append({"role": "user", "content": text})
            oracle.append(o_user(text))
            if rng.random() < 0.3:
                break  # end on a user message
            reasoning = rng.choice([None, "think " + rng.choice(WORDS)])
            if use_tools and rng.random() < 0.5:
                ids = []
                calls = []
                if reasoning:
                    oracle.append(o_assistant(reasoning, "analysis"))
                for _ in range(rng.randint(1, 2)):
                    fn = rng.choice(tools)["name"]
                    args = json.dumps({"q": rng.choice(WORDS)}, ensure_ascii=False)
                    ids.append((f"id{n_call}", fn))
                    calls.append(call(f"id{n_call}", fn, args))
                    oracle.append(o_call(fn, args))
                    n_call += 1
                ours.append({"role": "assistant", "reasoning": reasoning, "tool_calls": calls})
                for id_, fn in ids:
                    result = rng.choice(WORDS)
                    ours.append({"role": "tool", "tool_call_id": id_, "content": result})
                    oracle.append(o_result(fn, result))
            answer = rng.choice(WORDS)
            if reasoning and not (use_tools and ours[-1]["role"] == "tool"):
                oracle.append(o_assistant(reasoning, "analysis"))
            elif reasoning:
                reasoning = None
            ours.append({"role": "assistant", "reasoning": reasoning, "content": answer})
            oracle.append(o_assistant(answer, "final"))
        kwargs = {
            "reasoning_effort": effort,
            "current_date": date,
            "tools": openai_tools(*tools) if use_tools else None,
        }
        mine = render_prompt(ours, tokenizer=tok, **kwargs)
        want = harmony_enc.render_conversation_for_completion(
            Conversation.from_messages(oracle), Role.ASSISTANT
        )
        assert mine == want, json.dumps(ours, ensure_ascii=False)


def test_random_completions_parse_like_openai_harmony(tok, harmony_enc):
    rng = random.Random(3)
    texts = WORDS + [
        "",
        '{"location": "Zürich", "n": [1, 2]}',
        "ends in emoji 👍🏽",
        " leading space",
    ]
    for _ in range(150):
        msgs = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice(
                ["analysis", "commentary", "final", "call", "call_analysis", "call_json"]
            )
            text = rng.choice(texts)
            if kind == "call":
                msgs.append(o_call(rng.choice(["get_weather", "get_time"]), text))
            elif kind == "call_analysis":
                msgs.append(o_call_analysis(rng.choice(["python", "browser.search"]), text))
            elif kind == "call_json":
                msgs.append(o_call("f", text).with_content_type("json"))
            else:
                msgs.append(o_assistant(text, kind))
        ids = completion_tokens(harmony_enc, tok, msgs)
        want = oracle_result(harmony_enc.parse_messages_from_completion_tokens(ids, Role.ASSISTANT))
        assert parse_completion(ids, tok) == want
        result, events = run_chunks(tok, [[t] for t in ids])
        assert result == want and deltas_to_result(events) == want


# ---------------------------------------------------------------------------------------------
# Response formats: a `# Response Formats` section at the end of the developer message
# ---------------------------------------------------------------------------------------------

SHOPPING = {
    "properties": {
        "items": {
            "type": "array",
            "description": "entries on the shopping list",
            "items": {"type": "string"},
        }
    },
    "type": "object",
}
# Harmony's guide: "# Response Formats\n\n## {format name}\n\n// {description or context}\n{schema}"
# at the end of the developer message, the schema as compact JSON (written out by hand here).
SHOPPING_SECTION = (
    "# Response Formats\n\n## shopping_list\n\n// What to buy.\n"
    '{"properties":{"items":{"type":"array","description":"entries on the shopping list",'
    '"items":{"type":"string"}}},"type":"object"}'
)


@pytest.mark.parametrize(
    "fmt",
    [
        {
            "type": "json_schema",
            "json_schema": {
                "name": "shopping_list",
                "description": "What to buy.",
                "schema": SHOPPING,
                "strict": True,
            },
        },
        # The Responses API's text.format: the same fields, flat.
        {
            "type": "json_schema",
            "name": "shopping_list",
            "description": "What to buy.",
            "schema": SHOPPING,
        },
    ],
)
def test_response_format_ends_the_developer_message(tok, harmony_enc, fmt):
    instructions = "You are a helpful shopping assistant"
    messages = [
        {"role": "system", "content": instructions},
        {"role": "user", "content": "I need to buy coffee, soda and eggs"},
    ]
    ours = render_prompt(messages, response_format=fmt, tokenizer=tok)
    # openai-harmony has no response formats: its developer instructions carry the section.
    want = harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(
            [
                o_system(),
                o_developer(instructions + "\n\n" + SHOPPING_SECTION),
                o_user("I need to buy coffee, soda and eggs"),
            ]
        ),
        Role.ASSISTANT,
    )
    assert ours == want


def test_response_format_comes_after_the_tools_and_alone_makes_a_developer_message(tok):
    fmt = {"type": "json_schema", "json_schema": {"name": "shopping_list", "schema": SHOPPING}}
    user = [{"role": "user", "content": "Hi"}]
    text = tok.decode(render_prompt(user, tools=openai_tools(WEATHER), response_format=fmt))
    developer = text[text.index("<|start|>developer<|message|>") :]
    developer = developer[: developer.index("<|end|>")]
    section = SHOPPING_SECTION.replace("// What to buy.\n", "")  # no description: no comment line
    assert developer.endswith("} // namespace functions\n\n" + section)
    alone = tok.decode(render_prompt(user, response_format=fmt))
    assert "<|start|>developer<|message|>" + section + "<|end|>" in alone


@pytest.mark.parametrize(
    "fmt",
    [
        None,
        {"type": "text"},
        {"type": "json_object"},
        {"type": "regex", "pattern": "[0-9]+"},
        {"type": "grammar", "grammar": 'start: "a"'},
    ],
)
def test_formats_without_a_schema_add_nothing_to_the_prompt(tok, fmt):
    user = [{"role": "user", "content": "Hi"}]
    assert render_prompt(user, response_format=fmt) == render_prompt(user)


# ---------------------------------------------------------------------------------------------
# Generated turns rendered as the ids the model wrote (completion_token_ids)
# ---------------------------------------------------------------------------------------------


def test_generated_turns_render_as_written_with_reasoning_restored(tok, harmony_enc):
    """Turns sent back without their reasoning but with the ids the model wrote render as
    openai-harmony renders the turns with their reasoning, earlier reasoning dropped by its rule."""
    call_turn = [
        o_assistant("Two calls.", "analysis"),
        o_call("get_weather", '{"location":"Tokyo"}'),
    ]
    answer_turn = [o_assistant("Summarize.", "analysis"), o_assistant("Tokyo 20C.", "final")]
    first = completion_tokens(harmony_enc, tok, call_turn)
    second = completion_tokens(harmony_enc, tok, answer_turn)
    messages = [
        {"role": "user", "content": "Weather in Tokyo?"},
        {
            "role": "assistant",
            "tool_calls": [call("c1", "get_weather", '{"location":"Tokyo"}')],
            "completion_token_ids": first,
        },
        {"role": "tool", "tool_call_id": "c1", "content": "20C"},
    ]
    oracle = [o_system(), o_developer(None, [WEATHER]), o_user("Weather in Tokyo?")]
    oracle += call_turn + [o_result("get_weather", "20C")]
    for extra, oracle_extra in (
        ([], []),  # the tool loop: reasoning kept
        (
            [
                {"role": "assistant", "content": "Tokyo 20C.", "completion_token_ids": second},
                {"role": "user", "content": "Thanks"},
            ],
            answer_turn + [o_user("Thanks")],  # a final answer: earlier reasoning dropped
        ),
    ):
        ours = render_prompt(messages + extra, tools=openai_tools(WEATHER), tokenizer=tok)
        want = harmony_enc.render_conversation_for_completion(
            Conversation.from_messages(oracle + oracle_extra), Role.ASSISTANT
        )
        assert ours == want


def test_a_generated_turn_keeps_the_models_own_header_order(tok):
    """The model writes `<|channel|>commentary to=functions.f`; the renderer would write
    `to=functions.f<|channel|>commentary`. A generated turn keeps the model's ids, so the prompt
    that sent it plus its completion is a prefix of the next prompt (a kept cache stays valid)."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = render_prompt(messages, tools=openai_tools(WEATHER), tokenizer=tok)
    text = (
        "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>commentary"
        ' to=functions.get_weather <|constrain|>json<|message|>{"location":"Paris"}<|call|>'
    )
    completion = tok.encode(text, allow_special=True)
    turn = {
        "role": "assistant",
        "tool_calls": [call("c9", "get_weather", '{"location":"Paris"}')],
        "completion_token_ids": completion,
    }
    result = {"role": "tool", "tool_call_id": "c9", "content": "18C"}
    following = render_prompt(messages + [turn, result], tools=openai_tools(WEATHER), tokenizer=tok)
    assert following[: len(prompt) + len(completion)] == prompt + completion
    rendered = render_prompt(
        messages + [{**turn, "completion_token_ids": None, "reasoning": "Use the tool."}, result],
        tools=openai_tools(WEATHER),
        tokenizer=tok,
    )
    assert rendered != following  # the canonical header order differs from the model's
    tail = len(following) - len(prompt) - len(completion)  # the tool result, as rendered
    assert following[-tail:] == rendered[-tail:]
