"""ChatSession: the KV cache kept across turns, so a turn prefills only its new tokens, and the
kept cache is exactly what a fresh prefill of the conversation would give."""

from __future__ import annotations

import json

import checkpoints as ck
import mlx.core as mx
import numpy as np
import pytest
from scripted import ScriptedModel, SteeredModel

from gptoss_mlx import ChatSession, GptOssError, harmony, load, load_model, stream_generate
from gptoss_mlx.chat import trim_cache
from gptoss_mlx.tokenizer import SPECIAL_TOKENS
from gptoss_mlx.tool_loop import ToolEvent

RETURN, END = SPECIAL_TOKENS["<|return|>"], SPECIAL_TOKENS["<|end|>"]


@pytest.fixture(scope="module")
def chat_model(o200k_dir):
    return load(o200k_dir, dtype="float32")


def tokens(events):
    return [e.token for e in events]


def next_logits(model, cache, probe):
    return np.array(model(mx.array([[probe]]), cache=cache)[0, -1])


def assert_cache_is_a_fresh_prefill(model, session, probe=17):
    """The session's cache gives the same next-token logits as prefilling `session.cached` anew."""
    fresh = model.make_cache()
    model(mx.array([session.cached]), cache=fresh)
    np.testing.assert_allclose(
        next_logits(model, session.cache, probe),
        next_logits(model, fresh, probe),
        atol=1e-4,
        rtol=1e-4,
    )


def test_second_turn_prefills_only_its_new_tokens(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, system="Answer briefly.", max_tokens=5, temperature=0)
    first_prompt = session.next_prompt("Hello!")
    turn1 = tokens(session.send("Hello!"))
    assert session.stats.last_prefill_tokens == len(first_prompt)
    assert session.stats.full_prefills == 1
    assert turn1[-1] not in (RETURN, SPECIAL_TOKENS["<|call|>"])  # ended at max_tokens
    assert session.history == harmony.chat_history_tokens(first_prompt, turn1, tok)

    new_turn = harmony.render_turn([{"role": "user", "content": "And now?"}], tokenizer=tok)
    second_prompt = session.next_prompt("And now?")
    assert second_prompt == first_prompt + turn1 + [END] + new_turn
    turn2 = tokens(session.send("And now?"))
    # New: the turn itself, plus the last sampled token (never fed: it ended at max_tokens) and
    # the <|end|> that closes the message.
    assert session.stats.last_prefill_tokens == len(new_turn) + 2
    assert session.stats.prefilled_tokens == len(first_prompt) + len(new_turn) + 2
    assert session.stats.full_prefills == 1 and session.stats.turns == 2
    # And it is the same reply as a fresh one-shot generation over the whole conversation.
    assert turn2 == tokens(stream_generate(model, second_prompt, max_tokens=5, temperature=0))
    assert_cache_is_a_fresh_prefill(model, session)
    assert [m["role"] for m in session.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


class ForceReturn:
    """The model, but every reply is <|return|> at once (to exercise the <|return|> -> <|end|>
    swap, which needs trimming the fed <|return|> off the cache)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def make_cache(self):
        return self.model.make_cache()

    def hidden_states(self, ids, cache=None):
        return self.model.hidden_states(ids, cache)

    @staticmethod
    def _bump(logits):
        return logits + 1e4 * (mx.arange(logits.shape[-1]) == RETURN)

    def lm_head(self, h):
        return self._bump(self.model.lm_head(h))

    def __call__(self, ids, cache=None):  # the model's own decode step, then the bump
        return self._bump(self.model(ids, cache=cache))


def test_a_returned_answer_is_stored_with_end_and_the_cache_trimmed(chat_model):
    model, tok = chat_model
    session = ChatSession(ForceReturn(model), tok, max_tokens=5, temperature=0)
    first_prompt = session.next_prompt("Hi")
    assert tokens(session.send("Hi")) == [RETURN]
    assert session.cached == first_prompt + [RETURN]  # fed by the queued step
    assert session.history == first_prompt + [END]
    new_turn = harmony.render_turn([{"role": "user", "content": "Again"}], tokenizer=tok)
    assert tokens(session.send("Again")) == [RETURN]
    assert session.stats.last_prefill_tokens == 1 + len(new_turn)  # <|end|> + the turn
    assert session.cached == first_prompt + [END] + new_turn + [RETURN]
    assert_cache_is_a_fresh_prefill(model, session)


def test_reasoning_change_re_renders_and_re_prefills(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, max_tokens=3, temperature=0, reasoning_effort="low")
    list(session.send("One"))
    session.set_reasoning_effort("high")
    prompt = session.next_prompt("Two")
    assert prompt == harmony.render_prompt(
        session.messages + [{"role": "user", "content": "Two"}],
        reasoning_effort="high",
        tokenizer=tok,
    )
    list(session.send("Two"))
    assert session.stats.last_prefill_tokens == len(prompt) and session.stats.full_prefills == 2
    assert_cache_is_a_fresh_prefill(model, session)
    with pytest.raises(GptOssError):
        session.set_reasoning_effort("extreme")


def test_reset_and_an_interrupted_turn(chat_model):
    model, tok = chat_model
    session = ChatSession(model, tok, max_tokens=6, temperature=0)
    stream = session.send("Count")
    got = [next(stream).token, next(stream).token]
    stream.close()  # the caller stops reading mid-reply (Ctrl-C in the CLI)
    assert session.stats.turns == 1 and session.history[-1] == END
    assert session.history[-3:-1] == got
    list(session.send("More"))
    assert_cache_is_a_fresh_prefill(model, session)
    session.reset()
    assert session.cached == [] and session.messages == [] and session.stats.turns == 0


def test_seeded_sessions_replay_identically(chat_model):
    model, tok = chat_model

    def run():
        s = ChatSession(model, tok, max_tokens=4, seed=5)
        return [tokens(s.send(text)) for text in ("a", "b")]

    assert run() == run()


def test_bad_options_are_rejected(chat_model):
    model, tok = chat_model
    with pytest.raises(GptOssError):
        ChatSession(model, tok, temperature=-1)
    with pytest.raises(GptOssError):
        ChatSession(model, tok, max_token=3)


@pytest.mark.parametrize("length", [5, 13])  # inside and past the 8-slot sliding ring
def test_trimming_one_position_then_continuing_matches_a_full_forward(hf_mxfp4_dir, length):
    model = load_model(hf_mxfp4_dir, dtype="float32", dense_bits=16)
    ids = np.random.RandomState(length).randint(0, ck.TINY.vocab_size, length + 3).tolist()
    full = np.array(model(mx.array([ids]))[0])
    for chunked in (False, True):
        cache = model.make_cache()
        model(mx.array([ids[:length] + [99]]), cache=cache)  # one wrong token at the end
        assert trim_cache(cache, 1)
        assert all(c.offset == length for c in cache)
        rest = ids[length:]
        if chunked:
            got = np.array(model(mx.array([rest]), cache=cache)[0])
        else:
            got = np.stack([np.array(model(mx.array([[t]]), cache=cache)[0, -1]) for t in rest])
        np.testing.assert_allclose(got, full[length:], atol=1e-4, rtol=1e-4)


def test_trimming_more_than_the_ring_allows_is_refused(hf_mxfp4_dir):
    model = load_model(hf_mxfp4_dir, dtype="float32", dense_bits=16)
    cache = model.make_cache()
    model(mx.array([list(range(10))]), cache=cache)
    assert not trim_cache(cache, 2)
    assert all(c.offset == 10 for c in cache)


# -- structured output in a session ----------------------------------------------------------------

ANALYSIS = "<|channel|>analysis<|message|>"


def test_every_turn_answers_in_the_response_format(chat_model):
    jsonschema = pytest.importorskip("jsonschema")
    model, tok = chat_model
    schema = {
        "type": "object",
        "properties": {"mood": {"enum": ["good", "bad"]}, "n": {"type": "integer", "maximum": 9}},
        "required": ["mood", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "mood", "schema": schema}}
    steered = SteeredModel(model, {})
    session = ChatSession(steered, tok, response_format=fmt, seed=0, max_tokens=600)
    for text in ("How are you?", "And now?"):
        steered.write(tok, (0, ANALYSIS), (5, "<|end|>"))  # think a little, then answer
        events = list(session.send(text))
        content = "".join(e.text for e in events if e.kind == "content")
        jsonschema.validate(json.loads(content), schema)
        assert events[-1].finish_reason == "stop" and session.messages[-1]["content"] == content
    assert session.stats.full_prefills == 1  # the second turn reused the first one's cache
    prompt = tok.decode(session.next_prompt("Last?"))
    assert prompt.count("# Response Formats\n\n## mood\n\n") == 1


def test_a_session_refuses_a_format_it_cannot_enforce(chat_model):
    model, tok = chat_model
    bad = {"type": "regex", "pattern": "(?<=x)y"}
    with pytest.raises(GptOssError, match="look-around"):
        ChatSession(model, tok, response_format=bad)
    with pytest.raises(GptOssError, match="needs tools"):
        ChatSession(model, tok, tool_choice="required")


def test_a_required_tool_choice_forces_the_first_round_only(tok):
    """The turn's first generation must call the tool (the model would answer in prose); once the
    result is in, the model answers freely instead of being forced to call again."""
    calls = []
    spec = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }

    model = ScriptedModel.from_harmony(
        [
            "<|channel|>final<|message|>I think it is sunny.<|return|>",  # forced into a call
            "<|channel|>final<|message|>It is sunny.<|return|>",
        ],
        tok,
    )
    tools = [(spec, lambda city: calls.append(city) or "sunny")]
    session = ChatSession(model, tok, tools=tools, tool_choice="required", temperature=0)
    events = list(session.send("Weather in Oslo?"))
    assert [e.kind for e in events if isinstance(e, ToolEvent)] == ["tool_run", "tool_result"]
    assert len(calls) == 1
    assert session.messages[-1] == {"role": "assistant", "content": "It is sunny."}
