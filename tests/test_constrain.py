"""Structured output: answers that parse and validate, tool calls whose arguments follow their
schemas, reasoning left free, and formats that cannot be enforced refused before any token.

Answers are checked with `jsonschema` (formats included), `re` and openai-harmony, never with
llguidance, which builds the masks. The random tiny model with the real o200k vocabulary is
steered (tests/scripted.py) to write what a trained model would (a header, the end of its
reasoning); everything else it writes is its own random choice among what the mask allows.
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from openai_harmony import Author, Conversation, DeveloperContent, Message, Role, SystemContent
from openai_harmony import ToolDescription as OracleTool
from scripted import ScriptedModel, SteeredModel

from gptoss_mlx import GptOssError, generate, harmony, load, stream_generate
from gptoss_mlx import cli as cli_module
from gptoss_mlx.constrain import apply_bitmask, ll_tokenizer
from gptoss_mlx.tokenizer import SPECIAL_TOKENS

ANALYSIS = "<|channel|>analysis<|message|>"
FINAL_HEADER = "<|start|>assistant<|channel|>final<|message|>"


@pytest.fixture(scope="module")
def model(o200k_dir):
    return load(o200k_dir, dtype="float32")[0]


def reasoning_then(model, tok, end_at=6):
    """The random model, steered to open an analysis message and end it at step `end_at`."""
    return SteeredModel.writing(model, tok, (0, ANALYSIS), (end_at, "<|end|>"))


def json_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def validate(instance, schema):
    """jsonschema's verdict, string formats (date, uuid, ipv4, ...) checked too."""
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    jsonschema.Draft202012Validator(schema, format_checker=checker).validate(instance)


# -- random schemas --------------------------------------------------------------------------------

NAMES = ["id", "name", "size", "tags", "when", "kind", "score", "items", "owner", "note", "ok"]
PATTERNS = [r"^[a-z]{2,6}$", r"^[A-Z]{2}-[0-9]{3}$", r"^(red|green|blue)$", r"^[0-9a-f]{4}$"]
# Formats whose strings are bounded: a random model rarely ends an unbounded string or fraction
# (date-time's seconds take any number of digits), and a run must finish in a few hundred tokens.
FORMATS = ["date", "uuid", "ipv4", "ipv6"]


def random_value_schema(rng: random.Random, depth: int) -> dict:
    kinds = ["integer", "number", "enum", "string", "pattern", "format", "boolean", "array"]
    if depth < 2:
        kinds.append("object")
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        lo = round(rng.uniform(-10, 10), 2)
        bounds = rng.choice([("minimum", "maximum"), ("exclusiveMinimum", "exclusiveMaximum")])
        return {"type": "number", bounds[0]: lo, bounds[1]: lo + rng.randint(1, 100)}
    if kind == "enum":
        values = rng.sample(["alpha", "beta", "gamma", "delta", 1, 2, 3, True], rng.randint(1, 4))
        return {"enum": values}
    if kind == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 8)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "format":
        return {"type": "string", "format": rng.choice(FORMATS)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {
            "type": "array",
            "items": random_value_schema(rng, depth + 1),
            "minItems": lo,
            "maxItems": lo + rng.randint(0, 2),
        }
    return random_object_schema(rng, depth + 1)


def random_object_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object of 1-4 fields, some required, some optional, none beyond them."""
    names = rng.sample(NAMES, rng.randint(1, 4))
    return {
        "type": "object",
        "properties": {n: random_value_schema(rng, depth) for n in names},
        "required": [n for n in names if rng.random() < 0.6],
        "additionalProperties": False,
    }


SCHEMAS = [random_object_schema(random.Random(seed)) for seed in range(60)]


def test_the_schemas_cover_what_they_should():
    text = json.dumps(SCHEMAS)
    for keyword in (
        '"properties": {"',  # nested objects: checked below
        '"minItems"',
        '"maxItems"',
        '"enum"',
        '"exclusiveMinimum"',
        '"maximum"',
        '"pattern"',
        '"format"',
        '"required": []',  # all optional
    ):
        assert keyword in text, keyword
    nested = [
        s for s in SCHEMAS if any(p.get("type") == "object" for p in s["properties"].values())
    ]
    assert len(nested) >= 5
    optional = sum(len(s["properties"]) - len(s["required"]) for s in SCHEMAS)
    assert optional >= 30


# -- the 60 schemas through the API ----------------------------------------------------------------


def content_of(events):
    return "".join(e.text for e in events if e.kind == "content")


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_answers_validate_streaming_and_not(model, tok, i):
    schema = SCHEMAS[i]
    prompt = [{"role": "user", "content": "Fill in the form."}]
    events = list(
        stream_generate(
            reasoning_then(model, tok),
            prompt,
            tokenizer=tok,
            response_format=json_format(schema),
            seed=i,
            max_tokens=2000,
        )
    )
    assert events[-1].finish_reason == "stop"
    validate(json.loads(content_of(events)), schema)

    out = generate(
        reasoning_then(model, tok),
        prompt,
        tokenizer=tok,
        response_format=json_format(schema),
        seed=1000 + i,
        max_tokens=2000,
    )
    assert out["finish_reason"] == "stop"
    validate(json.loads(out["content"]), schema)
    assert out["parsed"] == json.loads(out["content"])
    completion = tok.decode(out["completion_token_ids"])
    assert completion.startswith(ANALYSIS) and FINAL_HEADER in completion


# -- the 60 schemas through the CLI ----------------------------------------------------------------


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_cli_answers_validate(model, tok, monkeypatch, tmp_path, i):
    """`gptoss-mlx generate --json-schema FILE`, in-process with the model steered as above:
    `--json` carries the parsed answer; without it, the streamed answer is what prints."""
    schema = SCHEMAS[i]
    path = tmp_path / "form.json"
    path.write_text(json.dumps(schema))
    monkeypatch.setattr(cli_module, "load", lambda *a, **kw: (reasoning_then(model, tok), tok))
    common = ["generate", "Fill in the form.", "--json-schema", str(path)]
    common += ["--seed", str(2000 + i), "--max-tokens", "2000"]
    as_json = i % 2 == 0
    r = CliRunner().invoke(
        cli_module.main, common + (["--json"] if as_json else ["--hide-reasoning"])
    )
    assert r.exit_code == 0, r.stderr
    if as_json:
        out = json.loads(r.stdout)
        assert out["finish_reason"] == "stop"
        validate(out["parsed"], schema)
        assert out["parsed"] == json.loads(out["content"])
    else:
        validate(json.loads(r.stdout), schema)
        assert "finish: stop" in r.stderr


# -- reasoning stays free --------------------------------------------------------------------------


SAMPLINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 1.3, "top_k": 50, "min_p": 0.01},
    {"temperature": 0},
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "sampling", SAMPLINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_reasoning_is_the_same_with_and_without_a_format(model, tok, seed, sampling):
    """Same prompt tokens, same seed: the analysis message is token for token what the model writes
    with no format at all; the constraint starts where the final message does."""
    schema = SCHEMAS[seed]
    prompt = harmony.render_prompt(
        [{"role": "user", "content": "Think, then fill in the form."}],
        response_format=json_format(schema),
        tokenizer=tok,
    )
    end_at = 25

    def run(max_tokens, **fmt):
        steered = reasoning_then(model, tok, end_at=end_at)
        return generate(
            steered, prompt, tokenizer=tok, seed=seed, max_tokens=max_tokens, **sampling, **fmt
        )

    # Without a format the random model never ends its answer: its reasoning is enough.
    free = run(end_at + 1)
    constrained = run(600, response_format=json_format(schema))
    upto = end_at + 1  # the analysis message, its <|end|> included
    assert constrained["completion_token_ids"][:upto] == free["completion_token_ids"][:upto]
    assert constrained["reasoning"] == free["reasoning"] != ""
    rest = tok.decode(constrained["completion_token_ids"][upto:])
    assert rest.startswith(FINAL_HEADER)
    validate(constrained["parsed"], schema)


def test_reasoning_is_the_same_under_a_regex(model, tok):
    """A regex adds nothing to the prompt: the same messages give the same reasoning."""
    messages = [{"role": "user", "content": "Pick a code."}]
    fmt = {"type": "regex", "pattern": r"[A-Z]{3}-[0-9]{2,4}"}
    free = generate(reasoning_then(model, tok, 20), messages, tokenizer=tok, seed=7, max_tokens=21)
    constrained = generate(
        reasoning_then(model, tok, 20),
        messages,
        tokenizer=tok,
        seed=7,
        max_tokens=60,
        response_format=fmt,
    )
    assert constrained["completion_token_ids"][:21] == free["completion_token_ids"][:21]
    assert constrained["reasoning"] == free["reasoning"]
    assert re.fullmatch(fmt["pattern"], constrained["content"])


# -- what the constraint does, on scripted models --------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def scripted_run(tok, text, max_tokens=300, **kw):
    model = ScriptedModel.from_harmony(text, tok)
    out = generate(model, "Who?", tokenizer=tok, max_tokens=max_tokens, **kw)
    return out, model


@pytest.mark.parametrize(
    "text",
    [
        ANALYSIS + "He is Bob, 42.<|end|>" + FINAL_HEADER + '{"name": "Bob", "age": 42}<|return|>',
        '<|channel|>final<|message|>{"name":"Ann","age":7}<|return|>',  # no reasoning
    ],
)
def test_a_valid_answer_is_left_as_the_model_writes_it(tok, text):
    out, model = scripted_run(tok, text, temperature=0, response_format=json_format(PERSON))
    assert tok.decode(out["completion_token_ids"]) == text
    assert out["finish_reason"] == "stop"
    # No step beyond what was generated: one forward pass per token, as without a constraint.
    assert model.calls == 1 + len(out["completion_token_ids"])


def test_after_reasoning_the_final_header_is_forced(tok):
    """The model would write a commentary preamble and prose; it gets the final header and JSON."""
    text = ANALYSIS + "Let me answer.<|end|><|start|>assistant<|channel|>commentary<|message|>"
    text += "Bob is 42 years old.<|return|>"
    for temperature in (0, 1.0):
        out, _ = scripted_run(
            tok, text, temperature=temperature, seed=3, response_format=json_format(PERSON)
        )
        completion = tok.decode(out["completion_token_ids"])
        assert completion.startswith(ANALYSIS + "Let me answer.<|end|>" + FINAL_HEADER)
        assert completion.endswith("<|return|>") and out["finish_reason"] == "stop"
        assert out["reasoning"] == "Let me answer." and out["tool_calls"] == []
        validate(json.loads(out["content"]), PERSON)


def test_a_stop_token_inside_the_reasoning_ends_the_reasoning_not_the_answer(tok):
    text = (
        ANALYSIS + "Done thinking<|return|>" + FINAL_HEADER + '{"name": "Al", "age": 3}<|return|>'
    )
    out, _ = scripted_run(tok, text, temperature=0, response_format=json_format(PERSON))
    assert out["finish_reason"] == "stop" and out["reasoning"] == "Done thinking"
    assert out["parsed"] == {"name": "Al", "age": 3}


def test_a_header_restarted_inside_the_reasoning_is_constrained(tok):
    """<|channel|> without <|end|><|start|>assistant starts a new header (as the parser reads it):
    the answer that follows is still forced to the format."""
    text = ANALYSIS + "Hmm<|channel|>commentary<|message|>nope<|return|>"
    out, _ = scripted_run(tok, text, temperature=0, response_format=json_format(PERSON))
    assert tok.decode(out["completion_token_ids"]).startswith(
        ANALYSIS + "Hmm<|channel|>final<|message|>"
    )
    validate(out["parsed"], PERSON)


def test_length_cuts_an_answer_short(tok):
    text = FINAL_HEADER[len("<|start|>assistant") :] + '{"name": "Bob", "age": 42}<|return|>'
    out, _ = scripted_run(
        tok, text, max_tokens=5, temperature=0, response_format=json_format(PERSON)
    )
    assert out["finish_reason"] == "length" and out["parsed"] is None


def test_json_object_ends_where_the_object_does(tok):
    text = '<|channel|>final<|message|>{"a": [1, 2], "b": null} and more<|return|>'
    out, _ = scripted_run(tok, text, temperature=0, response_format={"type": "json_object"})
    assert out["content"] == '{"a": [1, 2], "b": null}' and out["finish_reason"] == "stop"
    assert out["parsed"] == {"a": [1, 2], "b": None}


@pytest.mark.parametrize("seed", range(4))
def test_regex_and_grammar(model, tok, seed):
    pattern = r"(yes|no), [0-9]{1,3}(\.[0-9])? (kg|lb)"
    out = generate(
        reasoning_then(model, tok),
        "Weight?",
        tokenizer=tok,
        seed=seed,
        max_tokens=200,
        response_format={"type": "regex", "pattern": pattern},
    )
    assert out["finish_reason"] == "stop" and re.fullmatch(pattern, out["content"])
    assert "parsed" not in out  # only JSON formats are parsed

    grammar = 'start: answer ("," answer)*\nanswer: "yes" | "no" | NUMBER\nNUMBER: /[0-9]{1,2}/'
    out = generate(
        reasoning_then(model, tok),
        "List.",
        tokenizer=tok,
        seed=seed,
        max_tokens=200,
        response_format={"type": "grammar", "grammar": grammar},
    )
    assert out["finish_reason"] == "stop"
    assert re.fullmatch(r"(yes|no|[0-9]{1,2})(,(yes|no|[0-9]{1,2}))*", out["content"])


def test_json_whitespace_is_bounded_unless_the_schema_says_otherwise(tok):
    """At most 32 whitespace characters in a row (the model would write 60); none at all when the
    schema's own x-guidance asks for compact JSON."""
    (eight_spaces,) = tok.encode(" " * 8)
    script = tok.encode("<|channel|>final<|message|>{", allow_special=True) + [eight_spaces] * 8
    script += tok.encode('"name": "Al", "age": 3}<|return|>', allow_special=True)
    for schema, longest in (
        (PERSON, 32),
        ({**PERSON, "x-guidance": {"whitespace_flexible": False}}, 0),
    ):
        out = generate(
            ScriptedModel(script),
            "Who?",
            tokenizer=tok,
            temperature=0,
            max_tokens=200,
            response_format=json_format(schema),
        )
        between = re.sub(r'"(?:[^"\\]|\\.)*"', '""', out["content"])  # strings emptied
        assert max((len(ws) for ws in re.findall(r"\s+", between)), default=0) == longest
        validate(out["parsed"], PERSON)


def test_no_constraint_costs_nothing_when_none_is_asked(tok):
    """Tools without strict and no tool choice: no masks at all, the model writes freely."""
    text = ANALYSIS + "x<|end|>" + FINAL_HEADER + "not json<|return|>"
    tools = [{"type": "function", "function": {"name": "f", "parameters": PERSON}}]
    out, _ = scripted_run(tok, text, temperature=0, tools=tools)
    assert out["stats"]["masked_tokens"] == 0 and out["content"] == "not json"


# -- bad formats: clear errors before any token ----------------------------------------------------

BAD = [
    (json_format({"type": "frobnicate"}), "Invalid type"),
    (json_format({"type": "object", "properties": 5}), "properties must be an object"),
    (json_format({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (json_format({"type": "object", "if": {}}), "if"),
    (json_format({"type": "string", "format": "credit-card"}), "credit-card"),
    (json_format({"type": "string", "pattern": "(?<=a)b"}), "look-around"),
    ({"type": "regex", "pattern": "[a-"}, "unclosed character class"),
    ({"type": "regex", "pattern": "a{3,1}"}, "repetition count"),
    ({"type": "grammar", "grammar": "start: foo"}, "unknown name"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a JSON schema object"),
    ({"type": "xml"}, "response_format type must be one of"),
    ({"type": "regex"}, "needs its pattern"),
    ("json", "must be a dict"),
]


@pytest.mark.parametrize("fmt, says", BAD, ids=[b[1] for b in BAD])
def test_bad_formats_fail_before_any_token(tok, fmt, says):
    model = ScriptedModel.from_harmony("<|channel|>final<|message|>{}<|return|>", tok)
    with pytest.raises(GptOssError, match=re.escape(says)) as e:
        stream_generate(model, "Hi", tokenizer=tok, response_format=fmt)  # not even iterated
    assert "\n" not in str(e.value)
    assert model.calls == 0


WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize(
    "tools, choice, says",
    [
        (None, "required", 'tool_choice "required" needs tools'),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
        ([WEATHER], "always", "tool_choice must be"),
        ([{**WEATHER, "parameters": {"type": "object", "if": {}}}], "required", "get_weather"),
    ],
)
def test_bad_tool_choices_fail_before_any_token(tok, tools, choice, says):
    model = ScriptedModel([1])
    with pytest.raises(GptOssError, match=re.escape(says)):
        stream_generate(model, "Hi", tokenizer=tok, tools=tools, tool_choice=choice)
    assert model.calls == 0


# -- the mask on the device, the tokenizer ---------------------------------------------------------


def test_bitmask_applies_like_llguidance_numpy(tok):
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(0)
    vocab = tok.vocab_size
    words = rng.integers(-(2**31), 2**31, size=(vocab + 31) // 32 + 1, dtype=np.int64)
    words = words.astype(np.int32)
    logits = rng.standard_normal((1, vocab)).astype(np.float32)
    want = logits.copy()
    apply_token_bitmask_inplace(want, words[None, :])
    got = np.array(apply_bitmask(mx.array(logits), mx.array(words)))
    np.testing.assert_array_equal(got, want)
    assert np.isinf(got).mean() == pytest.approx(0.5, abs=0.01)


def test_llguidance_tokenizer_is_ours_and_built_once(tok):
    ll = ll_tokenizer(tok)
    assert ll_tokenizer(tok) is ll
    for name, token in SPECIAL_TOKENS.items():  # the ids gpt-oss was trained with
        assert ll.tokenize_str(name, parse_special=True) == [token]
        assert ll.is_special_token(token)
    ids = tok.encode("<|channel|>final<|message|>Grüße, 世界 🎉<|return|>", allow_special=True)
    assert ll.tokenize_str(tok.decode(ids), parse_special=True) == ids
    rng = np.random.default_rng(1)
    ordinary = rng.integers(0, 199998, 300).tolist()
    assert ll.decode_bytes(ordinary) == b"".join(tok.token_bytes(t) for t in ordinary)


# -- tool calls: forced and strict -----------------------------------------------------------------

FUNCTION_NAMES = ["get_weather", "lookup", "book_table", "convert_units", "send_note"]


def random_functions(rng: random.Random) -> list[dict]:
    """1-3 functions with random parameter schemas (one maybe without parameters)."""
    out = []
    for name in rng.sample(FUNCTION_NAMES, rng.randint(1, 3)):
        fn = {"name": name, "description": f"Does {name}.", "strict": rng.random() < 0.5}
        if rng.random() < 0.85:
            fn["parameters"] = random_object_schema(rng)
        out.append(fn)
    return out


def parameters_of(fn: dict) -> dict:
    """The schema a call's arguments must follow (a function without parameters takes {})."""
    return fn.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})


def tool_case(i: int):
    """(functions, tool_choice, steering, the functions the call may name) for random case i:
    "required", a named function, or "auto" with the model steered to call a strict function."""
    rng = random.Random(100 + i)
    fns = random_functions(rng)
    mode = ("required", "named", "auto")[i % 3]
    steer = [(0, ANALYSIS), (6, "<|end|>")]
    if mode == "required":
        return fns, "required", steer, fns
    if mode == "named":
        fn = rng.choice(fns)
        return fns, {"type": "function", "function": {"name": fn["name"]}}, steer, [fn]
    fn = rng.choice(fns)
    fn["strict"] = True
    header = f"<|end|><|start|>assistant<|channel|>commentary to=functions.{fn['name']} "
    steer = [(0, ANALYSIS), (6, header + "<|constrain|>json<|message|>")]
    return fns, "auto", steer, [fn]


def oracle_prompt_after_result(harmony_enc, fns, user_text, completion, name, result):
    """openai-harmony's prompt after the tool result: its own parse of the completion, then the
    result message, rendered for the next assistant turn."""
    tools = [OracleTool.new(f["name"], f["description"], f.get("parameters")) for f in fns]
    developer = DeveloperContent.new().with_function_tools(tools)
    messages = [
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, user_text),
        *harmony_enc.parse_messages_from_completion_tokens(completion, Role.ASSISTANT),
        Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), result)
        .with_channel("commentary")
        .with_recipient("assistant"),
    ]
    return harmony_enc.render_conversation_for_completion(
        Conversation.from_messages(messages), Role.ASSISTANT
    )


@pytest.mark.parametrize("i", range(40))
def test_forced_and_strict_tool_calls(model, tok, harmony_enc, i):
    fns, choice, steer, callable_ = tool_case(i)
    tools = [{"type": "function", "function": fn} for fn in fns]
    user_text = "Use a tool."
    messages = [{"role": "user", "content": user_text}]
    steered = SteeredModel.writing(model, tok, *steer)
    out = generate(
        steered, messages, tokenizer=tok, tools=tools, tool_choice=choice, seed=i, max_tokens=2000
    )
    assert out["finish_reason"] == "tool_calls" and len(out["tool_calls"]) == 1
    call = out["tool_calls"][0]["function"]
    fn = next(f for f in callable_ if f["name"] == call["name"])
    validate(json.loads(call["arguments"]), parameters_of(fn))

    # The loop goes on: the call and its result in the next prompt, as openai-harmony renders it.
    result = '{"ok": true}'
    messages += [
        {
            "role": "assistant",
            "content": out["content"] or None,
            "reasoning": out["reasoning"],
            "tool_calls": out["tool_calls"],
        },
        {"role": "tool", "tool_call_id": out["tool_calls"][0]["id"], "content": result},
    ]
    ours = harmony.render_prompt(messages, tools=tools, tokenizer=tok)
    oracle = oracle_prompt_after_result(
        harmony_enc, fns, user_text, out["completion_token_ids"], call["name"], result
    )
    assert ours == oracle


def test_a_required_call_may_come_first_and_replaces_an_answer(tok):
    """The model would answer in prose; "required" makes its first message a call."""
    text = "<|channel|>final<|message|>It is sunny.<|return|>"
    tools = [{"type": "function", "function": WEATHER}]
    out, _ = scripted_run(tok, text, temperature=1.0, seed=2, tools=tools, tool_choice="required")
    assert out["finish_reason"] == "tool_calls" and out["content"] == ""
    call = out["tool_calls"][0]["function"]
    assert call["name"] == "get_weather"
    validate(json.loads(call["arguments"]), WEATHER["parameters"])


def test_tool_choice_none_keeps_the_answer_free_and_calls_out(tok):
    text = ANALYSIS + "Call it.<|end|><|start|>assistant<|channel|>commentary to=functions."
    text += 'get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>'
    tools = [{"type": "function", "function": WEATHER}]
    out, _ = scripted_run(tok, text, temperature=0, tools=tools, tool_choice="none")
    assert out["tool_calls"] == [] and out["reasoning"] == "Call it."
    assert tok.decode(out["completion_token_ids"]).startswith(
        ANALYSIS + "Call it.<|end|>" + FINAL_HEADER
    )


def test_auto_leaves_calls_to_functions_that_are_not_strict_alone(tok):
    """Only strict functions' arguments are constrained under "auto"; a call to another one is
    the model's own text, however wrong."""
    loose = {**WEATHER, "name": "loose"}
    strict = {**WEATHER, "name": "strict", "strict": True}
    tools = [{"type": "function", "function": f} for f in (loose, strict)]
    call = "<|channel|>commentary to=functions.{} <|constrain|>json<|message|>{{oops<|call|>"
    out, _ = scripted_run(tok, call.format("loose"), temperature=0, tools=tools)
    assert out["tool_calls"][0]["function"]["arguments"] == "{oops"
    assert out["stats"]["masked_tokens"] == 0
    out, _ = scripted_run(tok, call.format("strict"), temperature=1.0, seed=0, tools=tools)
    validate(json.loads(out["tool_calls"][0]["function"]["arguments"]), WEATHER["parameters"])
