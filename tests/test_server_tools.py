"""`gptoss-mlx serve --tools`: the built-in tools run server-side, through the real `openai` client.

A forced model (tests/scripted.py) writes what a trained model would: a call to `python` or the
browser, then, once the server has run it and fed the result back, an answer. The calls run for
real: a Python process, fetches from a local HTTP server (127.0.0.1, so the browser is given
`allow_private_network=True`, a `Browser` option the server takes from `create_app`). Checked:
the calls and their results as OpenAI's output items and stream events (Responses) or in the
reasoning (Chat Completions); each round's prompt token-identical to openai-harmony's rendering,
prefilling only the tool result and the next header; tool types left out when not enabled;
failures and limits; a fresh Python session per request; and the requests after such a turn,
rendered from what the server generated.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from scripted import ForcedModel
from serving import WEATHER, running

from gptoss_mlx import load
from gptoss_mlx.server import create_app
from gptoss_mlx.tools import Browser, Python

openai = pytest.importorskip("openai")
oh = pytest.importorskip("openai_harmony")
from oracle import completion_tokens, o_assistant, o_call, o_developer, o_result, o_user  # noqa: E402
from oracle import prompt as oracle  # noqa: E402

CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}


@pytest.fixture(scope="module")
def tiny(o200k_dir):
    return load(o200k_dir, dtype="float32")


@contextlib.contextmanager
def serve(tiny, scripts, **options):
    """(openai client, the forced model) of a server whose model writes `scripts`, one per
    generation (harmony text)."""
    model, tok = tiny
    forced = ForcedModel(model, [ForcedModel.script(s, tok) for s in scripts])
    with running(create_app(forced, tok, model_name="m", **options)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120), forced


def python_namespace(**limits):
    """openai-harmony's python namespace with the description of the server's python tool."""
    tool = Python(scope="reply", **limits)
    description = tool.describe()
    tool.close()
    return oh.ToolNamespaceConfig(name="python", description=description, tools=[])


def o_system(*namespaces):
    content = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.MEDIUM)
    for namespace in namespaces:
        content = content.with_tools(namespace)
    return oh.Message.from_role_and_content(oh.Role.SYSTEM, content)


def o_builtin_call(recipient, arguments):
    """A built-in tool call as the model writes it: on analysis, `code`."""
    return (
        oh.Message.from_role_and_content(oh.Role.ASSISTANT, arguments)
        .with_channel("analysis")
        .with_recipient(recipient)
        .with_content_type("code")
    )


def o_builtin_result(author, text):
    return (
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, author), text)
        .with_channel("analysis")
        .with_recipient("assistant")
    )


def written(harmony_enc, tok, *messages):
    """A script: the completion a model writes for `messages`, as openai-harmony renders them."""
    return tok.decode(completion_tokens(harmony_enc, tok, messages))


COMPUTE = o_assistant("Compute it.", "analysis")
SIX_TIMES_SEVEN = o_builtin_call("python", "print(6 * 7)")
DONE = o_assistant("Done.", "analysis")
ANSWER = o_assistant("It is 42.", "final")
SHORT = (
    "<|channel|>analysis<|message|>{free:3}<|end|>"
    "<|start|>assistant<|channel|>final<|message|>{free:3}<|return|>"
)


def python_scripts(harmony_enc, tok):
    return [
        written(harmony_enc, tok, COMPUTE, SIX_TIMES_SEVEN),
        written(harmony_enc, tok, DONE, ANSWER),
    ]


# -- Responses: code_interpreter -----------------------------------------------------------------


def test_code_interpreter_runs_python_server_side(tiny, tok, harmony_enc):
    scripts = python_scripts(harmony_enc, tok) * 2
    with serve(tiny, scripts, builtin_tools=[Python(timeout=30)]) as (client, forced):
        ask = dict(model="m", input="6 times 7?", tools=[CODE_INTERPRETER], max_output_tokens=200)
        out = client.responses.create(**ask)
        events = list(client.responses.create(**ask, stream=True))
    assert [i.type for i in out.output] == [
        "reasoning",
        "code_interpreter_call",
        "reasoning",
        "message",
    ]
    call = out.output[1]
    assert call.code == "print(6 * 7)" and call.status == "completed"
    assert [(o.type, o.logs) for o in call.outputs] == [("logs", "42\n")]
    assert call.id.startswith("ci_") and call.container_id
    assert out.output_text == "It is 42." and out.status == "completed"

    # Round 1 is openai-harmony's prompt, python declared in the system message; round 2 is the
    # same conversation with the call and its result, of which it prefilled only the result and
    # the next header: the rest (round 1's prompt and completion) came from the cache.
    head = [o_system(python_namespace(timeout=30)), o_user("6 times 7?")]
    first = oracle(harmony_enc, *head)
    assert forced.prompts[0] == first
    round1 = completion_tokens(harmony_enc, tok, [COMPUTE, SIX_TIMES_SEVEN])
    whole = oracle(harmony_enc, *head, COMPUTE, SIX_TIMES_SEVEN, o_builtin_result("python", "42\n"))
    assert whole[: len(first) + len(round1)] == first + round1
    assert forced.prompts[1] == whole[len(first) + len(round1) :]
    assert tok.decode(forced.prompts[1]) == (
        "<|start|>python to=assistant<|channel|>analysis<|message|>42\n<|end|><|start|>assistant"
    )
    round2 = completion_tokens(harmony_enc, tok, [DONE, ANSWER])
    assert out.usage.input_tokens == len(whole) - len(round1)  # what the model read
    assert out.usage.output_tokens == len(round1) + len(round2)  # what it wrote
    assert out.usage.total_tokens == len(whole) + len(round2)
    assert out.usage.input_tokens_details.cached_tokens == 0  # the cache was empty

    # Streamed: the call's events in OpenAI's order, its code as the model wrote it.
    (streamed,) = [e.item for e in events if e.type == "response.output_item.done"][1:2]
    mine = [e for e in events if getattr(e, "item_id", None) == streamed.id]
    mine += [e for e in events if getattr(e, "item", None) and e.item.id == streamed.id]
    mine.sort(key=lambda e: e.sequence_number)
    kinds = [e.type for e in mine]
    code_deltas = kinds.count("response.code_interpreter_call_code.delta")
    assert code_deltas >= 2
    assert kinds == [
        "response.output_item.added",
        "response.code_interpreter_call.in_progress",
        *["response.code_interpreter_call_code.delta"] * code_deltas,
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
    ]
    assert mine[0].item.status == "in_progress" and mine[0].item.type == "code_interpreter_call"
    assert "".join(e.delta for e in mine[2 : 2 + code_deltas]) == "print(6 * 7)"
    assert mine[2 + code_deltas].code == "print(6 * 7)"
    assert streamed.outputs[0].logs == "42\n" and streamed.status == "completed"
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "It is 42."
    # The same prompt again: what its first round did not prefill came from the cache.
    assert final.usage.input_tokens_details.cached_tokens == len(first) - len(forced.prompts[2])
    assert 0 < len(forced.prompts[2]) < 3
    assert [i.type for i in final.output] == [i.type for i in out.output]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_fresh_python_session_per_request(tiny, tok, harmony_enc):
    """No two requests share a Python process: the first one's variables are gone in the
    second, and its scratch directory was removed when it ended. The tool says so."""
    first = o_builtin_call("python", "import os\nx = 5\nprint(os.getcwd())")
    second = o_builtin_call("python", "print(x)")
    scripts = [
        written(harmony_enc, tok, COMPUTE, first),
        written(harmony_enc, tok, ANSWER),
        written(harmony_enc, tok, COMPUTE, second),
        written(harmony_enc, tok, ANSWER),
    ]
    with serve(tiny, scripts, builtin_tools=["python"]) as (client, forced):
        ask = dict(model="m", input="Go", tools=[CODE_INTERPRETER], max_output_tokens=200)
        one, two = client.responses.create(**ask), client.responses.create(**ask)
    scratch = one.output[1].outputs[0].logs.strip()
    assert os.path.basename(scratch).startswith("gptoss-python-")
    assert not os.path.exists(scratch)
    assert "NameError: name 'x' is not defined" in two.output[1].outputs[0].logs
    assert one.output[1].container_id != two.output[1].container_id
    assert "until you answer or call a function" in tok.decode(forced.prompts[0])


# -- Chat Completions: the enabled built-in tools --------------------------------------------------


def test_chat_completions_get_the_enabled_builtin_tools(tiny, tok, harmony_enc):
    scripts = python_scripts(harmony_enc, tok) * 2 + [SHORT]
    user = [{"role": "user", "content": "6 times 7?"}]
    with serve(tiny, scripts, builtin_tools=[Python(timeout=30)]) as (client, forced):
        full = client.chat.completions.create(model="m", messages=user, max_tokens=200)
        chunks = list(
            client.chat.completions.create(model="m", messages=user, max_tokens=200, stream=True)
        )
        message = full.choices[0].message
        follow_up = user + [
            {"role": "assistant", "content": message.content},
            {"role": "user", "content": "Thanks!"},
        ]
        after = client.chat.completions.create(model="m", messages=follow_up, max_tokens=200)
    head = [o_system(python_namespace(timeout=30)), o_user("6 times 7?")]
    assert forced.prompts[0] == oracle(harmony_enc, *head)
    assert message.content == "It is 42." and not message.tool_calls
    assert full.choices[0].finish_reason == "stop"
    # The call and its result are part of the reasoning, where the model made them.
    reasoning = message.reasoning
    pieces = ["Compute it.", "[python]\nprint(6 * 7)", "[python result]\n42\n", "Done."]
    assert [reasoning.index(piece) for piece in pieces] == sorted(
        reasoning.index(piece) for piece in pieces
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == "It is 42."
    assert not any(d.tool_calls for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The next turn: the answer sent back renders as the model wrote it, earlier reasoning and
    # the python exchange dropped as harmony drops reasoning before a final answer; the cache
    # gives back everything up to the end of the first prompt.
    want = oracle(harmony_enc, *head, ANSWER, o_user("Thanks!"))
    assert after.usage.prompt_tokens == len(want)
    cached = after.usage.prompt_tokens_details.cached_tokens
    assert cached == len(forced.prompts[0])
    assert forced.prompts[-1] == want[cached:]


def test_client_functions_stay_client_side_and_the_turn_comes_back_whole(tiny, tok, harmony_enc):
    """A turn that ran python and then called a client function ends with that call; sent back
    (Responses items, `previous_response_id`, or a Chat message without its reasoning), it
    renders as the model wrote it, the python call and its result included."""
    arguments = '{"location": "Tokyo"}'
    thought = o_assistant("Now the weather.", "analysis")
    weather = o_call("get_weather", arguments)
    turn = [
        written(harmony_enc, tok, COMPUTE, SIX_TIMES_SEVEN),
        written(harmony_enc, tok, thought, weather),
    ]
    scripts = turn + [SHORT, SHORT] + turn + [SHORT]
    head = [o_system(python_namespace()), o_developer(None, [WEATHER]), o_user("Weather?")]
    want = oracle(
        harmony_enc,
        *head,
        COMPUTE,
        SIX_TIMES_SEVEN,
        o_builtin_result("python", "42\n"),
        thought,
        weather,
        o_result("get_weather", "20C"),
    )
    tools = [CODE_INTERPRETER, {"type": "function", **WEATHER}]
    with serve(tiny, scripts, builtin_tools=["python"], prompt_cache_gb=0) as (client, forced):
        first = client.responses.create(model="m", input="Weather?", tools=tools)
        assert [i.type for i in first.output] == [
            "reasoning",
            "code_interpreter_call",
            "reasoning",
            "function_call",
        ]
        call = first.output[-1]
        assert call.name == "get_weather" and call.arguments == arguments
        answer = {"type": "function_call_output", "call_id": call.call_id, "output": "20C"}
        user = {"type": "message", "role": "user", "content": "Weather?"}
        items = [user, *(i.model_dump(exclude_none=True) for i in first.output), answer]
        client.responses.create(model="m", input=items, tools=tools)
        assert forced.prompts[-1] == want
        client.responses.create(
            model="m", previous_response_id=first.id, input=[answer], tools=tools
        )
        assert forced.prompts[-1] == want

        messages = [{"role": "user", "content": "Weather?"}]
        chat = client.chat.completions.create(
            model="m", messages=messages, tools=[{"type": "function", "function": WEATHER}]
        )
        message = chat.choices[0].message
        (call,) = message.tool_calls
        assert (
            call.function.arguments == arguments and chat.choices[0].finish_reason == "tool_calls"
        )
        assert "[python result]\n42\n" in message.reasoning
        sent_back = {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}
        messages += [sent_back, {"role": "tool", "tool_call_id": call.id, "content": "20C"}]
        client.chat.completions.create(
            model="m", messages=messages, tools=[{"type": "function", "function": WEATHER}]
        )
    # Chat Completions gets every built-in tool the server runs: the same prompt.
    assert forced.prompts[-1] == want


# -- the browser against a local site --------------------------------------------------------------

PAGE = "<html><title>Tools</title><body><h1>Tools</h1>" + "".join(
    f"<p>Line {i} of the page{' holds the Needle' if i == 7 else ''}.</p>" for i in range(12)
)


class Site(BaseHTTPRequestHandler):
    """A page, a fake SearXNG (`/search?format=json`), and 404 for the rest."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlparse(self.path)
        base = f"http://127.0.0.1:{self.server.server_port}"
        if url.path == "/page.html":
            status, body, kind = 200, PAGE.encode(), "text/html"
        elif url.path == "/search":
            query = parse_qs(url.query)["q"][0]
            results = [
                {"url": f"{base}/page.html", "title": "Tools page", "content": f"About {query}."},
                {"url": f"{base}/other.html", "title": "Other", "content": "Elsewhere."},
            ]
            status, body, kind = 200, json.dumps({"results": results}).encode(), "application/json"
        else:
            status, body, kind = 404, b"<p>Not found</p>", "text/html"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_web_search_browses_server_side(tiny, tok, harmony_enc, site):
    calls = [
        o_builtin_call("browser.search", '{"query": "needle"}'),
        o_builtin_call("browser.open", '{"id": 0}'),
        o_builtin_call("browser.find", '{"pattern": "Needle"}'),
        o_builtin_call("browser.open", json.dumps({"id": f"{site}/missing"})),
    ]
    scripts = [written(harmony_enc, tok, o_assistant("Search.", "analysis"), calls[0])]
    scripts += [written(harmony_enc, tok, c) for c in calls[1:]]
    scripts += [written(harmony_enc, tok, o_assistant("Found it.", "final"))]
    browser = Browser(search_url=site, allow_private_network=True, timeout=10)
    with serve(tiny, scripts * 2, builtin_tools=[browser]) as (client, forced):
        ask = dict(model="m", input="Find the needle.", tools=[{"type": "web_search"}])
        out = client.responses.create(**ask)
        events = list(client.responses.create(**ask, stream=True))
    head = [o_system(oh.ToolNamespaceConfig.browser()), o_user("Find the needle.")]
    assert forced.prompts[0] == oracle(harmony_enc, *head)
    searches = [i for i in out.output if i.type == "web_search_call"]
    assert [i.type for i in out.output] == ["reasoning", *["web_search_call"] * 4, "message"]
    page = f"{site}/page.html"
    assert [s.action.model_dump(exclude_none=True) for s in searches] == [
        {
            "type": "search",
            "query": "needle",
            "queries": ["needle"],
            "sources": [{"type": "url", "url": page}, {"type": "url", "url": f"{site}/other.html"}],
        },
        {"type": "open_page", "url": page},
        {"type": "find_in_page", "pattern": "Needle", "url": page},
        {"type": "open_page", "url": f"{site}/missing"},
    ]
    assert [s.status for s in searches] == ["completed"] * 3 + ["failed"]
    assert all(s.id.startswith("ws_") for s in searches)
    assert out.output_text == "Found it."
    # What the model read: the results, the page, the find, and the 404 as a tool error.
    read = [tok.decode(p) for p in forced.prompts[1:5]]
    assert "<|start|>browser.search to=assistant<|channel|>analysis<|message|>" in read[0]
    assert "Search results for `needle`" in read[0]
    assert "holds the Needle" in read[1] and "[1] Tools" in read[1]
    assert "Find results for text: `Needle`" in read[2]
    assert "Error: " in read[3] and "404" in read[3]

    final = events[-1].response
    assert [i.type for i in final.output] == [i.type for i in out.output]
    for item in [i for i in final.output if i.type == "web_search_call"]:
        kinds = [
            e.type
            for e in events
            if getattr(e, "item_id", None) == item.id
            or (getattr(e, "item", None) is not None and e.item.id == item.id)
        ]
        completed = ["response.web_search_call.completed"] if item.status == "completed" else []
        assert kinds == [
            "response.output_item.added",
            "response.web_search_call.in_progress",
            "response.web_search_call.searching",
            *completed,
            "response.output_item.done",
        ]


# -- which tools a request gets ------------------------------------------------------------------


def test_tool_types_the_server_does_not_run_are_left_out(tiny, harmony_enc):
    browser = Browser(search_url="http://127.0.0.1:9")  # never contacted: nothing calls it
    both = o_system(oh.ToolNamespaceConfig.browser(), python_namespace())
    with serve(tiny, [SHORT] * 8, builtin_tools=["python"], prompt_cache_gb=0) as (client, forced):
        for tools in (
            [{"type": "web_search_preview"}, CODE_INTERPRETER],
            [{"type": "web_search_2025_08_26"}],
        ):
            client.responses.create(model="m", input="Hi", tools=tools, max_output_tokens=20)
        # A call this server did not make, sent back alone: nothing to render.
        theirs = {"type": "web_search_call", "id": "ws_theirs", "status": "completed"}
        theirs["action"] = {"type": "search", "query": "x"}
        items = [{"role": "user", "content": "Hi"}, theirs, {"role": "user", "content": "Bye"}]
        client.responses.create(model="m", input=items, max_output_tokens=20)
    python_only, neither, foreign = forced.prompts
    assert python_only == oracle(harmony_enc, o_system(python_namespace()), o_user("Hi"))
    assert neither == oracle(harmony_enc, o_system(), o_user("Hi"))
    assert foreign == oracle(harmony_enc, o_system(), o_user("Hi"), o_user("Bye"))
    with serve(tiny, [SHORT] * 8, builtin_tools=[browser, "python"], prompt_cache_gb=0) as (
        client,
        forced,
    ):
        for tools in ([{"type": "web_search_preview_2025_03_11"}], [{"type": "browser_search"}]):
            client.responses.create(model="m", input="Hi", tools=tools, max_output_tokens=20)
        client.responses.create(model="m", input="Hi", max_output_tokens=20)
        messages = [{"role": "user", "content": "Hi"}]
        client.chat.completions.create(model="m", messages=messages, max_tokens=20)
    dated, browser_search, none, chat = forced.prompts
    only_browser = oracle(harmony_enc, o_system(oh.ToolNamespaceConfig.browser()), o_user("Hi"))
    assert dated == browser_search == only_browser
    assert none == oracle(harmony_enc, o_system(), o_user("Hi"))
    assert chat == oracle(harmony_enc, both, o_user("Hi"))


# -- failures and limits -----------------------------------------------------------------------


def test_tool_failures_go_back_to_the_model_and_rounds_are_bounded(tiny, tok, harmony_enc):
    forever = o_builtin_call("python", "while True:\n    pass")
    again = o_builtin_call("python", "print(1)")
    scripts = [written(harmony_enc, tok, COMPUTE, forever), written(harmony_enc, tok, again)]
    scripts += [written(harmony_enc, tok, COMPUTE, again), written(harmony_enc, tok, again)]
    scripts += [written(harmony_enc, tok, ANSWER)]
    with serve(tiny, scripts, builtin_tools=[Python(timeout=1)], max_tool_rounds=5) as (
        client,
        forced,
    ):
        out = client.responses.create(
            model="m", input="Go", tools=[CODE_INTERPRETER], max_tool_calls=1
        )
        assert len(forced.prompts) == 2  # no third generation: the turn ended on the 2nd call
        chat = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Go"}]
        )
    timed_out, not_run = [i for i in out.output if i.type == "code_interpreter_call"]
    assert timed_out.status == "failed" and "time limit of 1 seconds" in timed_out.outputs[0].logs
    assert "Error: " in tok.decode(forced.prompts[1])  # the model read the failure
    assert not_run.status == "incomplete" and not_run.outputs is None
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_tool_calls"
    # Chat: within the server's limit (5 rounds), both calls ran, then the answer.
    assert chat.choices[0].message.reasoning.count("[python result]\n1\n") == 2
    assert chat.choices[0].message.content == "It is 42."


def test_the_token_limit_bounds_all_rounds(tiny, tok, harmony_enc):
    script = written(harmony_enc, tok, COMPUTE, SIX_TIMES_SEVEN)
    budget = len(completion_tokens(harmony_enc, tok, [COMPUTE, SIX_TIMES_SEVEN]))
    with serve(tiny, [script] * 4, builtin_tools=["python"], max_tool_rounds=1) as (client, _):
        out = client.responses.create(
            model="m", input="Go", tools=[CODE_INTERPRETER], max_output_tokens=budget
        )
        chat = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Go"}], max_tokens=200
        )
    (call,) = [i for i in out.output if i.type == "code_interpreter_call"]
    assert call.status == "incomplete" and call.outputs is None  # not run: no tokens left
    assert out.usage.output_tokens == budget
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    # --max-tool-rounds 1: the second call is not run; the reply ends as cut short.
    assert chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.reasoning.count("[python result]") == 1
    assert "[python not run" in chat.choices[0].message.reasoning
