"""The tool loop, on a scripted model: calls run with the model's exact arguments, results fed
back, every round's prompt token-identical to openai-harmony's rendering of the same
conversation, each round prefilling only the result and the next header; failures, the round
limit, approval and declared-only tools as specified."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from scripted import ScriptedModel

from gptoss_mlx import ChatSession, GptOssError, harmony
from gptoss_mlx.tool_loop import ToolEvent
from gptoss_mlx.tools import Python, function_spec

oh = pytest.importorskip("openai_harmony")
from openai_harmony import (  # noqa: E402
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolDescription,
    ToolNamespaceConfig,
)

CALLS: list = []


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather in a city.

    Args:
        city: The city's name.
        unit: Temperature unit.
    """
    CALLS.append(("get_weather", city, unit))
    return {"city": city, "temperature": 21, "unit": unit}


def get_time(timezone: str) -> str:
    """Local time in a time zone.

    :param timezone: An IANA zone name, e.g. Europe/Paris.
    """
    CALLS.append(("get_time", timezone))
    return "14:05"


# The schemas as a person writes them for these functions: the oracle gets these, never ours.
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city's name."},
        "unit": {
            "type": "string",
            "enum": ["celsius", "fahrenheit"],
            "description": "Temperature unit.",
            "default": "celsius",
        },
    },
    "required": ["city"],
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {
        "timezone": {"type": "string", "description": "An IANA zone name, e.g. Europe/Paris."}
    },
    "required": ["timezone"],
}

CALL_WEATHER = (
    "<|channel|>analysis<|message|>Need the weather first.<|end|>"
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
    '<|message|>{"city": "Paris", "unit": "celsius"}<|call|>'
)
CALL_TIME = (
    "<|channel|>analysis<|message|>Now the time.<|end|>"
    "<|start|>assistant to=functions.get_time<|channel|>commentary <|constrain|>json"
    '<|message|>{"timezone": "Europe/Paris"}<|call|>'
)
ANSWER = (
    "<|channel|>analysis<|message|>Both known.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>21 °C in Paris at 14:05.<|return|>"
)


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def o_system(*namespaces):
    content = SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM)
    for ns in namespaces:
        content = content.with_tools(ns)
    return Message.from_role_and_content(Role.SYSTEM, content)


def o_developer():
    tools = [
        ToolDescription.new("get_weather", "Current weather in a city.", WEATHER_SCHEMA),
        ToolDescription.new("get_time", "Local time in a time zone.", TIME_SCHEMA),
    ]
    return Message.from_role_and_content(
        Role.DEVELOPER, DeveloperContent.new().with_function_tools(tools)
    )


def o_text(role, text, channel):
    return Message.from_role_and_content(role, text).with_channel(channel)


def o_call(recipient, arguments, channel="commentary", content_type="<|constrain|>json"):
    return (
        Message.from_role_and_content(Role.ASSISTANT, arguments)
        .with_channel(channel)
        .with_recipient(recipient)
        .with_content_type(content_type)
    )


def o_result(author, text, channel="commentary"):
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, author), text)
        .with_channel(channel)
        .with_recipient("assistant")
    )


def oracle(harmony_enc, messages, **config):
    return harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(messages),
        Role.ASSISTANT,
        oh.RenderConversationConfig(**config) if config else None,
    )


def run(session, text):
    events = list(session.send(text))
    return events, [e for e in events if isinstance(e, ToolEvent)]


def test_derived_schemas_are_what_a_person_writes():
    assert function_spec(get_weather)["function"] == {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": WEATHER_SCHEMA,
    }
    assert function_spec(get_time)["function"]["parameters"] == TIME_SCHEMA


def test_two_rounds_of_function_calls(tok, harmony_enc):
    model = ScriptedModel.from_harmony([CALL_WEATHER, CALL_TIME, ANSWER], tok)
    session = ChatSession(model, tok, tools=[get_weather, get_time], temperature=0)
    events, tool_events = run(session, "Weather and time in Paris?")

    # The callables ran with exactly the model's arguments, in order.
    assert CALLS == [("get_weather", "Paris", "celsius"), ("get_time", "Europe/Paris")]
    weather = json.dumps({"city": "Paris", "temperature": 21, "unit": "celsius"})
    assert [(e.kind, e.call.recipient, e.output, e.error, e.round) for e in tool_events] == [
        ("tool_run", "functions.get_weather", "", False, 0),
        ("tool_result", "functions.get_weather", weather, False, 0),
        ("tool_run", "functions.get_time", "", False, 1),
        ("tool_result", "functions.get_time", "14:05", False, 1),
    ]
    assert tool_events[0].call.arguments == '{"city": "Paris", "unit": "celsius"}'

    # Each round's prompt is openai-harmony's rendering of the conversation so far.
    user = o_text(Role.USER, "Weather and time in Paris?", None)
    user = Message.from_role_and_content(Role.USER, "Weather and time in Paris?")
    conversation = [o_system(), o_developer(), user]
    round_1 = oracle(harmony_enc, conversation)
    conversation += [
        o_text(Role.ASSISTANT, "Need the weather first.", "analysis"),
        o_call("functions.get_weather", '{"city": "Paris", "unit": "celsius"}'),
        o_result("functions.get_weather", weather),
    ]
    round_2 = oracle(harmony_enc, conversation)
    conversation += [
        o_text(Role.ASSISTANT, "Now the time.", "analysis"),
        o_call("functions.get_time", '{"timezone": "Europe/Paris"}'),
        o_result("functions.get_time", "14:05"),
    ]
    round_3 = oracle(harmony_enc, conversation)
    assert [tok.decode(c) for c in model.contexts] == [
        tok.decode(r) for r in (round_1, round_2, round_3)
    ]
    assert model.contexts == [round_1, round_2, round_3]

    # Each later round prefilled only the tool result and the next header: the completion
    # before it was already in the cache.
    completions = [tok.encode(t, allow_special=True) for t in (CALL_WEATHER, CALL_TIME)]
    assert model.prefills[0] == round_1
    assert model.prefills[1] == round_2[len(round_1) + len(completions[0]) :]
    assert model.prefills[2] == round_3[len(round_2) + len(completions[1]) :]
    assert tok.decode(model.prefills[1]).startswith("<|start|>functions.get_weather to=")
    assert session.stats.last_turn_prefills == [len(p) for p in model.prefills]
    assert session.stats.full_prefills == 1 and session.stats.tool_rounds == 2

    # The answer follows; history and messages hold the whole loop.
    final = "".join(e.text for e in events if getattr(e, "kind", None) == "content")
    assert final == "21 °C in Paris at 14:05."
    assert events[-1].finish_reason == "stop"
    answer = tok.encode(ANSWER, allow_special=True)
    assert session.history == round_3 + answer[:-1] + [tok.end_id]
    assert [m["role"] for m in session.messages] == [
        "user", "assistant", "tool", "assistant", "tool", "assistant"
    ]  # fmt: skip
    assert session.messages[2]["content"] == weather

    # The messages re-render (a reasoning change re-prefills) as openai-harmony renders the
    # conversation, dropping the turn's reasoning now that it has a final answer.
    session.set_reasoning_effort("medium")
    rerendered = session.next_prompt("Thanks")
    conversation += [
        o_text(Role.ASSISTANT, "Both known.", "analysis"),
        o_text(Role.ASSISTANT, "21 °C in Paris at 14:05.", "final"),
        Message.from_role_and_content(Role.USER, "Thanks"),
    ]
    assert rerendered == oracle(harmony_enc, conversation, auto_drop_analysis=True)


def test_a_raising_tool_is_an_error_the_model_reads(tok):
    def lookup(city: str) -> str:
        """Look a city up."""
        raise ValueError(f"no data for {city}")

    call = (
        "<|channel|>commentary to=functions.lookup <|constrain|>json"
        '<|message|>{"city": "Atlantis"}<|call|>'
    )
    answer = "<|channel|>final<|message|>I could not find it.<|return|>"
    model = ScriptedModel.from_harmony([call, answer], tok)
    session = ChatSession(model, tok, tools=[lookup], temperature=0)
    events, tool_events = run(session, "Where is Atlantis?")
    result = tool_events[-1]
    assert result.kind == "tool_result" and result.error
    assert result.output == "Error: ValueError: no data for Atlantis"
    fed_back = tok.decode(model.prefills[1])
    assert fed_back.startswith(
        "<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>"
        "Error: ValueError: no data for Atlantis<|end|>"
    )
    assert events[-1].finish_reason == "stop" and session.messages[-1]["content"] == (
        "I could not find it."
    )


def test_the_round_limit_stops_the_loop(tok):
    model = ScriptedModel.from_harmony([CALL_WEATHER, CALL_WEATHER, ANSWER], tok)
    session = ChatSession(model, tok, tools=[get_weather], max_tool_rounds=1, temperature=0)
    events, tool_events = run(session, "Weather?")
    assert CALLS == [("get_weather", "Paris", "celsius")]  # the second call was not run
    assert [e.kind for e in tool_events] == ["tool_run", "tool_result", "tool_limit"]
    generated = [e for e in events if not isinstance(e, ToolEvent)]
    assert generated[-1].finish_reason == "tool_calls" and len(model.prefills) == 2
    assert session.history[-1] == tok.call_id  # the turn ends on the call it did not run
    # The conversation goes on: the next turn is appended after that call.
    more = list(session.send("Never mind."))
    assert more[-1].finish_reason == "stop" and len(model.prefills) == 3
    with pytest.raises(GptOssError):
        ChatSession(model, tok, tools=[get_weather], max_tool_rounds=-1)


def test_zero_rounds_runs_nothing(tok):
    model = ScriptedModel.from_harmony(CALL_WEATHER, tok)
    session = ChatSession(model, tok, tools=[get_weather], max_tool_rounds=0, temperature=0)
    _, tool_events = run(session, "Weather?")
    assert CALLS == [] and [e.kind for e in tool_events] == ["tool_limit"]


def test_declined_unknown_and_declared_only_tools(tok):
    # Declined by approve(): not run, and the model is told.
    model = ScriptedModel.from_harmony([CALL_WEATHER, ANSWER], tok)
    asked = []
    session = ChatSession(
        model, tok, tools=[get_weather], approve=lambda c: asked.append(c) or False
    )
    _, tool_events = run(session, "Weather?")
    assert CALLS == [] and asked[0].recipient == "functions.get_weather"
    assert tool_events[-1].error and "declined" in tool_events[-1].output
    # A tool the session does not have: an error result, the loop goes on.
    model = ScriptedModel.from_harmony([CALL_TIME, ANSWER], tok)
    session = ChatSession(model, tok, tools=[get_weather], temperature=0)
    events, tool_events = run(session, "Time?")
    assert tool_events[-1].error and "no tool 'functions.get_time'" in tool_events[-1].output
    assert events[-1].finish_reason == "stop"
    # A function declared without a callable: the turn ends on the call, for the caller.
    spec = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}
    model = ScriptedModel.from_harmony([CALL_WEATHER, ANSWER], tok)
    session = ChatSession(model, tok, tools=[spec], temperature=0)
    events, tool_events = run(session, "Weather?")
    assert tool_events == [] and events[-1].finish_reason == "tool_calls"
    assert session.messages[-1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_dict_and_callable_pair(tok):
    spec = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather, by hand.",
            "parameters": WEATHER_SCHEMA,
        },
    }
    model = ScriptedModel.from_harmony([CALL_WEATHER, ANSWER], tok)
    session = ChatSession(model, tok, tools=[(spec, get_weather)], temperature=0)
    run(session, "Weather?")
    assert CALLS == [("get_weather", "Paris", "celsius")]
    assert "// Weather, by hand." in tok.decode(session.next_prompt("x"))
    for bad in [(spec,), (spec, "not callable"), 42, {"type": "web_search"}]:
        with pytest.raises(GptOssError):
            ChatSession(model, tok, tools=[bad])


def test_python_builtin_round_matches_openai_harmony(tok, harmony_enc):
    """A built-in call on analysis (`to=python code`), its result from `python` on analysis, and
    the system message's python section with our description: all as openai-harmony renders."""
    call = (
        "<|channel|>analysis<|message|>Compute it.<|end|>"
        "<|start|>assistant to=python<|channel|>analysis code<|message|>print(6 * 7)<|call|>"
    )
    answer = "<|channel|>final<|message|>42<|return|>"
    python = Python(timeout=30)
    model = ScriptedModel.from_harmony([call, answer], tok)
    with ChatSession(model, tok, builtin_tools=[python], temperature=0) as session:
        _, tool_events = run(session, "6 times 7?")
    assert [(e.kind, e.output) for e in tool_events] == [("tool_run", ""), ("tool_result", "42\n")]
    config = ToolNamespaceConfig(name="python", description=python.describe(), tools=[])
    conversation = [o_system(config), Message.from_role_and_content(Role.USER, "6 times 7?")]
    assert model.contexts[0] == oracle(harmony_enc, conversation)
    conversation += [
        o_text(Role.ASSISTANT, "Compute it.", "analysis"),
        o_call("python", "print(6 * 7)", "analysis", "code"),
        o_result("python", "42\n", "analysis"),
    ]
    assert model.contexts[1] == oracle(harmony_enc, conversation)


def test_a_function_named_like_a_builtin_is_refused(tok):
    def python(code: str) -> str:
        """Not the real one."""
        return code

    with pytest.raises(GptOssError, match="built-in"):
        ChatSession(ScriptedModel([0]), tok, tools=[python], builtin_tools=["python"])
    with pytest.raises(GptOssError, match="unknown built-in tool"):
        ChatSession(ScriptedModel([0]), tok, builtin_tools=["calculator"])


def test_history_tokens_module_functions_agree(tok):
    """The loop's history is harmony's: chat_history_tokens of the last round plus the result."""
    model = ScriptedModel.from_harmony([CALL_WEATHER, ANSWER], tok)
    session = ChatSession(model, tok, tools=[get_weather], temperature=0)
    stream = session.send("Weather?")
    for event in stream:
        if isinstance(event, ToolEvent) and event.kind == "tool_result":
            break
    stream.close()  # stopped between the result and the next round
    weather = session.messages[-1]
    assert weather["role"] == "tool"
    rendered = harmony.render_messages([weather], history=session.messages[:-1], tokenizer=tok)
    assert session.history[-len(rendered) :] == rendered
    assert session.history[-len(rendered) - 1] == tok.call_id
