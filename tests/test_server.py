"""`gptoss-mlx serve` through the real `openai` client (and raw HTTP where a client would not send
what is tested): models, Chat Completions and Responses, streamed and not, tool calls, prompts
token-identical to openai-harmony's rendering, reasoning restored, prompt-cache reuse equal to no
cache, and the server under concurrency, disconnects and malformed requests.

The model is the tiny random checkpoint with the real o200k vocabulary (float32), wrapped in a
`ForcedModel` where a test needs harmony structure: its scripts force the structure (channels,
tool calls) and leave `{free:N}` positions to the model, so outputs still depend on the cache.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest
from scripted import ForcedModel
from serving import WEATHER, running

from gptoss_mlx import load
from gptoss_mlx.server import create_app

openai = pytest.importorskip("openai")
pytest.importorskip("openai_harmony")
from oracle import (  # noqa: E402
    completion_tokens,
    o_assistant,
    o_call,
    o_developer,
    o_result,
    o_system,
    o_user,
)
from oracle import prompt as oracle  # noqa: E402

TOOLS = [{"type": "function", "function": WEATHER}]
RESPONSES_TOOLS = [{"type": "function", **WEATHER}]
ARGUMENTS = '{"location": "Tokyo", "days": [1, 2]}'


@pytest.fixture(scope="module")
def tiny(o200k_dir):
    return load(o200k_dir, dtype="float32")


@contextlib.contextmanager
def serve(tiny, scripts=(), context=None, **options):
    """(openai client, the forced model, base URL) of a server running the scripts (on a model
    whose context is `context` positions, when given)."""
    model, tok = tiny
    forced = ForcedModel(model, [ForcedModel.script(s, tok) for s in scripts])
    if context is not None:
        forced.config = model.config.replace(max_position_embeddings=context)
    options.setdefault("model_name", "gpt-oss-tiny")
    with running(create_app(forced, tok, **options)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, forced, url


def answer(reasoning=6, content=8):
    return (
        f"<|channel|>analysis<|message|>{{free:{reasoning}}}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{{free:{content}}}<|return|>"
    )


def tool_call(arguments=ARGUMENTS, reasoning=5, name="get_weather"):
    return (
        f"<|channel|>analysis<|message|>{{free:{reasoning}}}<|end|><|start|>assistant"
        f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{arguments}<|call|>"
    )


def written(harmony_enc, tok, *messages):
    """A script: the completion a model writes for `messages`, as openai-harmony renders them."""
    return tok.decode(completion_tokens(harmony_enc, tok, messages))


def as_sent_back(message):
    """An assistant message as a Chat Completions client sends it back: no reasoning."""
    out = message.model_dump(exclude_none=True)
    out.pop("reasoning", None)
    return out


# -- the openai client: models, both APIs, streamed and not ---------------------------------------


def test_models_and_health(tiny):
    with serve(tiny) as (client, _, url):
        assert [m.id for m in client.models.list()] == ["gpt-oss-tiny"]
        assert client.models.retrieve("gpt-oss-tiny").id == "gpt-oss-tiny"
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_chat_streamed_pieces_join_to_the_non_streamed_result(tiny, harmony_enc):
    messages = [{"role": "user", "content": "Hello!"}]
    with serve(tiny, [answer()] * 2) as (client, _, _):
        full = client.chat.completions.create(
            model="gpt-oss-tiny", messages=messages, temperature=0, max_tokens=100
        )
        chunks = list(
            client.chat.completions.create(
                model="gpt-oss-tiny",
                messages=messages,
                temperature=0,
                max_tokens=100,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    message = full.choices[0].message
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == message.content != ""
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == message.reasoning != ""
    assert full.choices[0].finish_reason == "stop" == chunks[-2].choices[0].finish_reason
    # Usage: the prompt as openai-harmony renders it, the completion the script's 6 + 8 free
    # positions and 10 forced tokens, 6 of them reasoning.
    prompt = oracle(harmony_enc, o_system(), o_user("Hello!"))
    streamed = chunks[-1].usage
    assert not chunks[-1].choices
    for usage in (full.usage, streamed):
        assert usage.prompt_tokens == len(prompt)
        assert usage.completion_tokens == 6 + 8 + 10
        assert usage.total_tokens == len(prompt) + 24
        assert usage.completion_tokens_details.reasoning_tokens == 6
    assert full.usage.prompt_tokens_details.cached_tokens == 0


def test_the_same_prompt_again_comes_from_the_cache(tiny):
    messages = [{"role": "user", "content": "Hello!"}]
    with serve(tiny, [answer()] * 2) as (client, _, _):
        first, second = (
            client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=100
            )
            for _ in range(2)
        )
    # The second prompt is all in the cache but its last token (one must run), which the
    # message-start snapshot before `<|start|>assistant` gives back to within two tokens.
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 2
    assert second.choices[0].message == first.choices[0].message


def test_responses_streamed_events_join_to_the_non_streamed_response(tiny, harmony_enc):
    with serve(tiny, [answer()] * 2) as (client, _, _):
        full = client.responses.create(
            model="gpt-oss-tiny", input="Hello!", temperature=0, max_output_tokens=100
        )
        events = list(
            client.responses.create(
                model="gpt-oss-tiny",
                input="Hello!",
                temperature=0,
                max_output_tokens=100,
                stream=True,
            )
        )
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    reasoning, message = full.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.id.startswith("rs_") and message.id.startswith("msg_")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == full.output_text == message.content[0].text != ""
    assert thought == reasoning.content[0].text != ""
    done = events[-1].response
    assert [i.type for i in done.output] == ["reasoning", "message"]
    assert done.output_text == full.output_text
    assert done.usage.output_tokens == full.usage.output_tokens
    assert full.usage.input_tokens == len(oracle(harmony_enc, o_system(), o_user("Hello!")))
    assert full.usage.output_tokens == 24
    assert full.usage.output_tokens_details.reasoning_tokens == 6
    for kind in ("output_item", "content_part"):
        assert types.count(f"response.{kind}.added") == types.count(f"response.{kind}.done") == 2


def test_logprobs_cover_the_answer_tokens(tiny):
    with serve(tiny, [answer(content=5)]) as (client, _, _):
        out = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Hi"}],
            temperature=0,
            max_tokens=100,
            logprobs=True,
            top_logprobs=2,
        )
    entries = out.choices[0].logprobs.content
    assert len(entries) == 5
    assert b"".join(bytes(e.bytes) for e in entries).decode() == out.choices[0].message.content
    for e in entries:  # greedy: the chosen token is the most likely one
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.logprob < 0


def test_stop_strings_cut_the_answer(tiny, tok):
    script = "<|channel|>final<|message|>Paris is lovely. Rome too.<|return|>"
    with serve(tiny, [script]) as (client, _, _):
        out = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=100, stop=[" Rome"]
        )
    assert out.choices[0].message.content == "Paris is lovely."
    assert out.choices[0].finish_reason == "stop"


def test_reasoning_exclude_and_reasoning_content_format(tiny):
    with serve(tiny, [answer()] * 2, reasoning_format="reasoning_content") as (client, _, _):
        kept = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=100
        )
        excluded = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=100,
            extra_body={"reasoning": {"exclude": True}},
        )
    assert kept.choices[0].message.reasoning_content
    assert not hasattr(kept.choices[0].message, "reasoning")
    assert not hasattr(excluded.choices[0].message, "reasoning_content")
    assert excluded.usage.completion_tokens_details.reasoning_tokens == 6


def test_the_context_bounds_the_prompt_and_by_default_the_reply(tiny):
    with serve(tiny, context=120) as (client, _, _):
        reply = client.chat.completions.create(model="m", messages=USER)  # no max_tokens
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi " * 100}]
            )
    assert reply.usage.total_tokens == 120 and reply.choices[0].finish_reason == "length"
    error = refused.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "context is 120" in error["message"]


def test_unknown_fields_and_tools_it_cannot_run_are_left_out(tiny, harmony_enc):
    others = [
        {"type": "web_search"},
        {"type": "local_shell"},
        {"type": "custom", "name": "apply_patch", "format": {"type": "text"}},
        {"type": "namespace", "name": "agents", "tools": [{"type": "function", "name": "spawn"}]},
    ]
    with serve(tiny, [answer()] * 2) as (client, _, _):
        chat = client.chat.completions.create(
            model="m",
            messages=USER,
            tools=TOOLS + others,
            max_tokens=100,
            extra_body={"user": "u", "service_tier": "auto", "prompt_cache_key": "k", "foo": 1},
        )
        response = client.responses.create(
            model="m",
            input="Hi",
            tools=RESPONSES_TOOLS + others,
            max_output_tokens=100,
            include=["reasoning.encrypted_content"],
            extra_body={"client_metadata": {"a": "b"}, "foo": [1]},
        )
    want = len(oracle(harmony_enc, o_system(), o_developer(None, [WEATHER]), o_user("Hi")))
    assert chat.usage.prompt_tokens == response.usage.input_tokens == want


def test_top_k_and_min_p_extensions(tiny):
    def sample(**extra):
        with serve(tiny, [answer()]) as (client, _, _):
            reply = client.chat.completions.create(
                model="m", messages=USER, max_tokens=100, seed=3, extra_body=extra
            )
        return reply.choices[0].message.content

    greedy = sample(temperature=0)
    assert sample(temperature=1.5, top_k=1) == greedy == sample(temperature=1.5, min_p=0.999)
    assert sample(temperature=1.5) != greedy  # sampling does sample


UNIT = {
    "name": "set_unit",
    "description": "Pick the temperature unit.",
    "parameters": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"],
        "additionalProperties": False,
    },
}
YES_NO = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
MAYBE = "<|channel|>analysis<|message|>{free:4}<|end|><|start|>assistant<|channel|>final"
MAYBE += "<|message|>Maybe later.<|return|>"


def test_tool_choice_and_response_formats_are_enforced(tiny, harmony_enc):
    """The scripted model wants to answer "Maybe later." (or to call a tool): the constraint
    decides, as `stream_generate` enforces it (gptoss_mlx.constrain); tools stay declared."""
    import jsonschema

    units = [{"type": "function", "function": UNIT}]
    with serve(
        tiny, [MAYBE] * 4 + [tool_call(name="set_unit", arguments='{"unit": "kelvin"}')]
    ) as (
        client,
        _,
        _,
    ):

        def ask(**kw):
            kw = {"model": "m", "messages": USER, "temperature": 0, "max_tokens": 200} | kw
            return client.chat.completions.create(**kw).choices[0]

        assert ask().message.content == "Maybe later."
        required = ask(tools=units, tool_choice="required")
        (call,) = required.message.tool_calls
        assert call.function.name == "set_unit" and required.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), UNIT["parameters"])
        fmt = {"type": "json_schema", "json_schema": {"name": "yes_no", "schema": YES_NO}}
        answer = ask(response_format=fmt)
        jsonschema.validate(json.loads(answer.message.content), YES_NO)
        response = client.responses.create(
            model="m",
            input="Hi",
            temperature=0,
            max_output_tokens=200,
            text={"format": {"type": "json_schema", "name": "yes_no", "schema": YES_NO}},
        )
        jsonschema.validate(json.loads(response.output_text), YES_NO)
        assert response.text.format.type == "json_schema"
        refused = ask(tools=units, tool_choice="none")  # the script calls set_unit
        assert not refused.message.tool_calls


def test_tool_choice_none_keeps_the_tools_declared(tiny, harmony_enc):
    with serve(tiny, [answer()] * 2) as (client, _, _):
        none = client.chat.completions.create(
            model="m", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=100
        )
        plain = client.chat.completions.create(model="m", messages=USER, max_tokens=100)
    tooled = oracle(harmony_enc, o_system(), o_developer(None, [WEATHER]), o_user("Hi"))
    assert none.usage.prompt_tokens == len(tooled)
    assert plain.usage.prompt_tokens == len(oracle(harmony_enc, o_system(), o_user("Hi")))


# -- tool calls, exact, in both APIs and in streams -----------------------------------------------


def test_chat_tool_call_with_exact_arguments_streamed_and_not(tiny):
    messages = [{"role": "user", "content": "Weather in Tokyo?"}]
    with serve(tiny, [tool_call()] * 2) as (client, _, _):
        full = client.chat.completions.create(
            model="m", messages=messages, tools=TOOLS, max_tokens=100
        )
        chunks = list(
            client.chat.completions.create(
                model="m", messages=messages, tools=TOOLS, max_tokens=100, stream=True
            )
        )
    (call,) = full.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.function.arguments == ARGUMENTS
    assert call.id.startswith("call_") and len(call.id) > 20
    assert full.choices[0].finish_reason == "tool_calls" and full.choices[0].message.content is None
    pieces = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].function.name == "get_weather" and pieces[0].id.startswith("call_")
    assert pieces[0].id != call.id  # ids are unique to each call the server makes
    assert {p.index for p in pieces} == {0}
    assert all(p.function.name is None for p in pieces[1:])
    assert "".join(p.function.arguments or "" for p in pieces) == ARGUMENTS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_responses_function_call_with_exact_arguments_streamed_and_not(tiny):
    with serve(tiny, [tool_call()] * 2) as (client, _, _):
        full = client.responses.create(
            model="m", input="Weather in Tokyo?", tools=RESPONSES_TOOLS, max_output_tokens=100
        )
        events = list(
            client.responses.create(
                model="m",
                input="Weather in Tokyo?",
                tools=RESPONSES_TOOLS,
                max_output_tokens=100,
                stream=True,
            )
        )
    reasoning, call = full.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    assert call.id.startswith("fc_")
    assert call.name == "get_weather" and call.arguments == ARGUMENTS
    assert call.call_id.startswith("call_") and call.status == "completed"
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == ARGUMENTS
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == ARGUMENTS
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert added[1].type == "function_call" and added[1].name == "get_weather"
    assert events[-1].response.output[1].arguments == ARGUMENTS


# -- harmony across turns: the next prompt as openai-harmony renders it ---------------------------


def test_the_next_requests_are_rendered_like_openai_harmony(tiny, tok, harmony_enc):
    """The model sees what it saw: a tool call sent back without its reasoning gets it back (by
    tool call id), earlier reasoning is dropped once there is a final answer, and every prompt
    is token for token openai-harmony's rendering of the conversation."""
    thought1, thought2 = (
        o_assistant("Need the weather tool.", "analysis"),
        o_assistant("Got it.", "analysis"),
    )
    final = o_assistant("It is 20C in Tokyo.", "final")
    scripts = [
        written(harmony_enc, tok, thought1, o_call("get_weather", ARGUMENTS)),
        written(harmony_enc, tok, thought2, final),
        answer(),
        answer(),
        answer(),
    ]
    head = [o_system(), o_developer("Use tools.", [WEATHER]), o_user("Weather in Tokyo?")]
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Tokyo?"},
    ]
    with serve(tiny, scripts, prompt_cache_gb=0) as (client, forced, _):

        def ask(messages):
            out = client.chat.completions.create(
                model="m", messages=messages, tools=TOOLS, max_tokens=100
            )
            return out.choices[0].message, forced.prompts[-1]

        first, prompt = ask(messages)
        assert prompt == oracle(harmony_enc, *head)
        assert first.reasoning == "Need the weather tool."
        call_id = first.tool_calls[0].id
        result = {"role": "tool", "tool_call_id": call_id, "content": "20C"}
        messages += [as_sent_back(first), result]
        second, prompt = ask(messages)
        turn = (thought1, o_call("get_weather", ARGUMENTS), o_result("get_weather", "20C"))
        assert prompt == oracle(harmony_enc, *head, *turn)
        assert second.content == "It is 20C in Tokyo."
        messages += [as_sent_back(second), {"role": "user", "content": "Thanks!"}]
        _, prompt = ask(messages)
        assert prompt == oracle(
            harmony_enc,
            *head,
            thought1,
            o_call("get_weather", ARGUMENTS),
            o_result("get_weather", "20C"),
            thought2,
            final,
            o_user("Thanks!"),
        )
        # A client that edited the arguments: canonical rendering, the reasoning restored.
        edited = as_sent_back(first)
        edited["tool_calls"][0]["function"]["arguments"] = '{"location": "Kyoto"}'
        _, prompt = ask(messages[:2] + [edited, result])
        want = (
            thought1,
            o_call("get_weather", '{"location": "Kyoto"}'),
            o_result("get_weather", "20C"),
        )
        assert prompt == oracle(harmony_enc, *head, *want)
        # A tool call this server did not make: nothing to restore.
        foreign = {**edited, "tool_calls": [{**edited["tool_calls"][0], "id": "call_theirs"}]}
        _, prompt = ask(messages[:2] + [foreign, {**result, "tool_call_id": "call_theirs"}])
        assert prompt == oracle(harmony_enc, *head, *want[1:])


def test_responses_input_items_render_like_openai_harmony(tiny, tok, harmony_enc):
    thought = o_assistant("Need the weather tool.", "analysis")
    scripts = [
        written(harmony_enc, tok, thought, o_call("get_weather", ARGUMENTS)),
        answer(),
        answer(),
    ]
    head = [o_system(), o_developer("Use tools.", [WEATHER]), o_user("Weather in Tokyo?")]
    user = {"type": "message", "role": "user", "content": "Weather in Tokyo?"}
    with serve(tiny, scripts, prompt_cache_gb=0) as (client, forced, _):
        first = client.responses.create(
            model="m",
            instructions="Use tools.",
            input=[user],
            tools=RESPONSES_TOOLS,
            max_output_tokens=100,
        )
        assert forced.prompts[-1] == oracle(harmony_enc, *head)
        reasoning, call = first.output
        # Sent back as Codex does, the reasoning item without its text: restored by call id.
        items = [user, {"type": "reasoning", "id": reasoning.id, "summary": []}]
        items += [call.model_dump(exclude_none=True)]
        items += [{"type": "function_call_output", "call_id": call.call_id, "output": "20C"}]
        want = oracle(
            harmony_enc,
            *head,
            thought,
            o_call("get_weather", ARGUMENTS),
            o_result("get_weather", "20C"),
        )
        client.responses.create(
            model="m",
            instructions="Use tools.",
            input=items,
            tools=RESPONSES_TOOLS,
            max_output_tokens=100,
        )
        assert forced.prompts[-1] == want
        # The same through previous_response_id: the stored conversation, then the new input.
        later = dict(
            model="m",
            instructions="Use tools.",
            previous_response_id=first.id,
            input=[items[-1]],
            tools=RESPONSES_TOOLS,
            max_output_tokens=100,
        )
        client.responses.create(**later)
        assert forced.prompts[-1] == want
        unstored = client.responses.create(model="m", input="Hi", store=False, max_output_tokens=9)
        with pytest.raises(openai.BadRequestError, match="no stored response") as refused:
            client.responses.create(**{**later, "previous_response_id": unstored.id})
        assert refused.value.body["param"] == "previous_response_id"


# -- the prompt cache across requests -------------------------------------------------------------


def agent_conversation(client, turns=6):
    """A tool-calling loop of `turns` requests (the last one answers), then a chat turn; returns
    each reply and its usage."""
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Plan my week."},
    ]
    out = []
    for turn in range(turns + 1):
        reply = client.chat.completions.create(
            model="m", messages=messages, tools=TOOLS, temperature=0, max_tokens=200
        )
        message = reply.choices[0].message
        said = message.model_dump(exclude_none=True)
        for call in said.get("tool_calls", ()):
            call.pop("id")  # unique to each server
        out.append((said, reply.usage))
        messages.append(as_sent_back(message))
        for call in message.tool_calls or ():
            messages.append({"role": "tool", "tool_call_id": call.id, "content": f"done {turn}"})
        if turn == turns - 1:
            messages.append({"role": "user", "content": "And on Sunday?"})
    return out


def agent_scripts(turns=6):
    calls = [tool_call(json.dumps({"day": day}), reasoning=12) for day in range(turns - 1)]
    return calls + [answer(10, 10), answer(6, 6)]


def test_an_agent_loop_prefills_only_new_tokens_and_equals_no_cache(tiny):
    with serve(tiny, agent_scripts()) as (client, _, _):
        cached = agent_conversation(client)
    with serve(tiny, agent_scripts(), prompt_cache_gb=0) as (client, _, _):
        uncached = agent_conversation(client)
    assert [m for m, _ in cached] == [m for m, _ in uncached]  # reasoning, answers, all of it
    usage = [u for _, u in cached]
    assert [u.prompt_tokens for u in usage] == [u.prompt_tokens for _, u in uncached]
    assert all(u.prompt_tokens_details.cached_tokens == 0 for _, u in uncached)
    assert usage[5].prompt_tokens > 300  # well beyond the 128-position window of gpt-oss
    assert usage[0].prompt_tokens_details.cached_tokens == 0
    for before, now in zip(usage[:5], usage[1:6], strict=True):
        # Each request reuses all of the previous one, its tool call included (it ended in
        # <|call|>, which was fed): only the tool result and `<|start|>assistant` are new.
        assert now.prompt_tokens_details.cached_tokens == before.total_tokens
    # After the final answer harmony drops the earlier reasoning: the prompt departs from the
    # cache right after the first request's prompt, restored from its ring snapshot.
    assert usage[6].prompt_tokens_details.cached_tokens == usage[0].prompt_tokens


def test_a_chat_prefills_only_new_tokens(tiny):
    with serve(tiny, [answer(5, 5)] * 3) as (client, _, _):
        messages, usages = [], []
        for text in ("Hi", "How are you?", "Bye"):
            messages.append({"role": "user", "content": text})
            reply = client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=100
            )
            messages.append(as_sent_back(reply.choices[0].message))
            usages.append(reply.usage)
    first, second, third = usages
    # Turn 2 drops turn 1's reasoning (harmony's rule once there is a final answer): reuse up
    # to the end of turn 1's prompt. Turn 3 keeps everything (reasoning after the first final
    # answer stays) but the stored <|end|> where the model wrote <|return|>.
    assert second.prompt_tokens_details.cached_tokens == first.prompt_tokens
    assert third.prompt_tokens_details.cached_tokens == second.total_tokens - 1


# -- one model, many clients ----------------------------------------------------------------------


def test_eight_clients_at_once_each_get_what_they_get_alone(tiny):
    questions = [f"Question number {i}: what is {i} + {i}?" for i in range(8)]

    def ask(client, i):
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": questions[i]}],
            temperature=0.8,
            seed=i,
            max_tokens=12,
        )
        return reply.choices[0].message.content, reply.usage.completion_tokens

    script = ["<|channel|>final<|message|>{free:20}<|return|>"] * 8
    with serve(tiny, script) as (client, _, _):
        alone = [ask(client, i) for i in range(8)]
    with serve(tiny, script) as (client, _, _):
        together = [None] * 8

        def run(i):
            together[i] = ask(client, i)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert together == alone
    assert len(set(alone)) == 8


def test_a_client_that_leaves_mid_stream_frees_the_model(tiny):
    with serve(tiny) as (client, _, url):
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "Talk forever."}],
            "max_tokens": 100000,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(8):
                next(lines)
        # The connection is closed: the generation stops within a token or so.
        tic = time.monotonic()
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert time.monotonic() - tic < 10
        assert reply.usage.completion_tokens == 3


def test_a_full_queue_answers_503_with_retry_after(tiny):
    with serve(tiny, max_queue=0) as (_, _, url):
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400}
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}):
            time.sleep(0.5)  # the first request holds the model
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_error"


def test_an_api_key_is_required_when_set(tiny):
    with serve(tiny, [answer()], api_key="sesame") as (_, _, url):
        assert httpx.get(url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in client.models.list()] == ["gpt-oss-tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
USER = [{"role": "user", "content": "Hi"}]
MALFORMED = [
    ("POST", CHAT, b"{not json", None),
    ("POST", CHAT, b"[1, 2]", None),
    ("POST", CHAT, {"model": "m"}, "messages"),
    ("POST", CHAT, {"messages": []}, "messages"),
    ("POST", CHAT, {"messages": "Hi"}, "messages"),
    ("POST", CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0]"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    (
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages",
    ),
    ("POST", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ("POST", CHAT, {"messages": USER, "n": 2}, "n"),
    ("POST", CHAT, {"messages": USER, "presence_penalty": 0.5}, "presence_penalty"),
    ("POST", CHAT, {"messages": USER, "frequency_penalty": 1}, "frequency_penalty"),
    ("POST", CHAT, {"messages": USER, "logit_bias": {"1": 5}}, "logit_bias"),
    ("POST", CHAT, {"messages": USER, "temperature": "hot"}, "temperature"),
    ("POST", CHAT, {"messages": USER, "temperature": 3}, "temperature"),
    ("POST", CHAT, {"messages": USER, "top_p": 0}, "top_p"),
    ("POST", CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("POST", CHAT, {"messages": USER, "max_completion_tokens": "many"}, "max_completion_tokens"),
    ("POST", CHAT, {"messages": USER, "top_logprobs": 3}, "top_logprobs"),
    ("POST", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("POST", CHAT, {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("POST", CHAT, {"messages": USER, "reasoning_effort": "extreme"}, "reasoning_effort"),
    (
        "POST",
        CHAT,
        {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}},
        "tool_choice",
    ),
    ("POST", CHAT, {"messages": USER, "response_format": {"type": "xml"}}, "response_format"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "hi " * 140_000}]}, "messages"),
    ("POST", RESPONSES, {"model": "m"}, "input"),
    ("POST", RESPONSES, {"input": [{"type": "message", "role": "robot"}]}, "input[0].role"),
    ("POST", RESPONSES, {"input": "Hi", "previous_response_id": "resp_nope"}, None),
    ("GET", "/v1/nothing-here", None, None),
    ("GET", CHAT, None, None),
]


def test_thirty_malformed_requests_get_openai_shaped_4xx_and_the_server_goes_on(tiny):
    assert len(MALFORMED) == 30
    with serve(tiny, [answer()]) as (client, _, url):
        for method, path, body, param in MALFORMED:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = httpx.request(method, url + path, timeout=60, **kwargs)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert isinstance(error["message"], str) and error["message"]
            assert "Traceback" not in r.text
            if param is not None:
                assert error["param"] == param, (body, error)
        reply = client.chat.completions.create(model="m", messages=USER, max_tokens=100)
        assert reply.choices[0].finish_reason == "stop"


# -- memory savings through the server ------------------------------------------------------------


def test_the_memory_savings_answer_as_the_resident_model(o200k_experts_dir):
    """Greedy replies over two turns (the second through the prompt cache): the model with its
    embedding on disk and an expert cache of 4, 8 or 16 slots of 32 answers token for token as
    the fully resident one; with 8-bit keys and values it answers too (its own cache, its own
    tokens)."""

    def replies(**options) -> list[tuple[dict, int]]:
        model, tok = load(o200k_experts_dir, dtype="float32", **options)
        with running(create_app(model, tok, model_name="m")) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            messages, out = [{"role": "user", "content": "Hi"}], []
            for follow_up in ("Tell me more", None):
                r = client.chat.completions.create(
                    model="m", messages=messages, temperature=0, max_tokens=10
                )
                # the message (reasoning, content, tool calls) and how many tokens made it
                out.append((r.choices[0].message.model_dump(), r.usage.completion_tokens))
                if follow_up:
                    messages += [
                        as_sent_back(r.choices[0].message),
                        {"role": "user", "content": follow_up},
                    ]
            return out

    resident = replies(embedding_from_disk=False)
    assert all(tokens > 0 for _, tokens in resident)
    for slots in (4, 8, 16):
        assert replies(expert_cache=slots) == resident, slots
    assert all(tokens > 0 for _, tokens in replies(kv_bits=8, expert_cache=8))
