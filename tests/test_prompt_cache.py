"""PromptCache: a request reuses the longest prefix a kept cache can be restored to, prefills only
the rest, and generates exactly what a fresh prefill of the whole prompt gives (float32; the
tiny model's sliding window is 8, so every prompt here wraps the rings).

TurnMemory: a generated turn sent back is recognized by tool call id or answer text."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss_mlx import load, stream_generate
from gptoss_mlx.prompt_cache import PromptCache
from gptoss_mlx.turn_memory import TurnMemory

START = 200006  # <|start|>: a message boundary


@pytest.fixture(scope="module", params=["resident", "kv8-expert-cache"])
def model(request, o200k_dir, o200k_experts_dir):
    """The tiny model as it loads by default, and one with 64-dim heads whose keys and values are
    cached at 8 bits (the prompt cache keeps and restores quantized rings) and whose 32 experts
    stream through 8 slots."""
    if request.param == "resident":
        return load(o200k_dir, dtype="float32")[0]
    return load(o200k_experts_dir, dtype="float32", kv_bits=8, expert_cache=8)[0]


def words(n, seed):
    return np.random.RandomState(seed).randint(1000, 190000, n).tolist()


def conversation(*lengths, seed=0):
    """Messages of the given lengths, each starting with <|start|>."""
    out = []
    for i, n in enumerate(lengths):
        out += [START] + words(n - 1, seed * 100 + i)
    return out


def run(generate, prompt, n=5):
    events = list(generate(prompt, max_tokens=n, temperature=0, logprobs=0))
    return [e.token for e in events], [e.logprob for e in events], events[-1].stats


def check_same_as_fresh(model, pc, prompt, n=5):
    """Generate through the cache; equal to a fresh generation. Returns prefilled token count."""
    tokens, logprobs, stats = run(pc.stream_generate, prompt, n)
    want_tokens, want_logprobs, _ = run(lambda p, **kw: stream_generate(model, p, **kw), prompt, n)
    assert tokens == want_tokens
    np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-4)
    return stats.prompt_tokens, tokens


def test_a_continued_conversation_prefills_only_its_new_tokens(model):
    pc = PromptCache(model, 1 << 30, boundary_token=START)
    prompt = conversation(20, 15)
    prefilled, completion = check_same_as_fresh(model, pc, prompt)
    assert prefilled == len(prompt)
    for turn in range(3):  # each next prompt: all of the last one, its reply, new messages
        held = prompt + completion[:-1]  # ended at max_tokens: the last token was never fed
        prompt = prompt + completion + conversation(7, 4, seed=turn + 1)
        prefilled, completion = check_same_as_fresh(model, pc, prompt)
        assert prefilled == len(prompt) - len(held)
    assert len(pc) == 1


def test_a_reply_that_changes_its_last_token_goes_back_one(model):
    pc = PromptCache(model, 1 << 30, boundary_token=START)
    prompt = conversation(30)
    _, completion = check_same_as_fresh(model, pc, prompt, n=6)
    # The cache holds prompt + 5 of the 6 tokens; the next prompt changes the 5th (as harmony
    # stores a sampled <|return|> as <|end|>).
    nxt = prompt + completion[:4] + [200007] + conversation(9, seed=7)
    prefilled, _ = check_same_as_fresh(model, pc, nxt)
    assert prefilled == len(nxt) - len(prompt) - 4


@pytest.mark.parametrize("depart", ["at a message start", "inside a message", "in the reply"])
def test_departing_earlier_restores_the_nearest_snapshot_at_or_before(model, depart):
    pc = PromptCache(model, 1 << 30, boundary_token=START)
    first = conversation(20, 12, 16)  # messages start at 0, 20 and 32
    _, completion = check_same_as_fresh(model, pc, first)
    if depart == "at a message start":  # a client edited the last message
        prompt, restored = first[:32] + conversation(10, seed=3), 32
    elif depart == "inside a message":  # ... from its 5th token on
        prompt, restored = first[:37] + words(6, 5), 32
    else:  # harmony dropped what the model wrote first: back to the end of the prompt
        prompt, restored = first + words(8, 6), len(first)
    prefilled, _ = check_same_as_fresh(model, pc, prompt)
    assert prefilled == len(prompt) - restored
    # The first conversation was forked, not lost: its own next request reuses all of it.
    nxt = first + completion + conversation(6, seed=9)
    prefilled, _ = check_same_as_fresh(model, pc, nxt)
    assert prefilled == len(nxt) - len(first) - len(completion) + 1


def test_the_cache_stays_within_its_bytes(model):
    pc = PromptCache(model, 1 << 30, boundary_token=START)
    check_same_as_fresh(model, pc, conversation(40, 30))
    one = pc.nbytes
    assert one > 0
    pc.max_bytes = int(1.5 * one)
    check_same_as_fresh(model, pc, conversation(40, 30, seed=1))  # a second conversation
    assert len(pc) == 1 and pc.nbytes <= pc.max_bytes  # the first one went
    prompt = conversation(40, 30, seed=1)
    off = PromptCache(model, 0, boundary_token=START)
    assert check_same_as_fresh(model, off, prompt)[0] == len(prompt)
    assert check_same_as_fresh(model, off, prompt)[0] == len(prompt) and len(off) == 0


def test_an_abandoned_generation_keeps_what_it_fed(model):
    pc = PromptCache(model, 1 << 30, boundary_token=START)
    prompt = conversation(25)
    events = pc.stream_generate(prompt, max_tokens=50, temperature=0)
    got = [next(events).token for _ in range(3)]
    events.close()
    nxt = prompt + got + conversation(5, seed=2)
    prefilled, _ = check_same_as_fresh(model, pc, nxt)
    assert prefilled == len(nxt) - len(prompt) - len(got)


# -- TurnMemory ------------------------------------------------------------------------------


def call(id_, args='{"city":"Oslo"}'):
    return {"id": id_, "type": "function", "function": {"name": "weather", "arguments": args}}


def test_a_turn_sent_back_is_recognized_by_tool_call_id_or_answer():
    memory = TurnMemory()
    memory.remember([1, 2, 3], "Need the weather.", "", [call("call_a")])
    memory.remember([4, 5], "Easy.", "It is 3C.", [])
    sent = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_a")]},
        {"role": "tool", "tool_call_id": "call_a", "content": "3C"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is 3C."}]},
    ]
    got = memory.restore(sent)
    assert got[1]["completion_token_ids"] == [1, 2, 3]
    assert got[3]["completion_token_ids"] == [4, 5]
    assert got[0] is sent[0] and got[2] is sent[2]
    assert "completion_token_ids" not in sent[1]  # the request itself is left alone


@pytest.mark.parametrize(
    "message, restored",
    [
        ({"tool_calls": [call("call_a")], "reasoning": "Need the weather."}, "ids"),
        ({"tool_calls": [call("call_a")], "reasoning_content": "Other thoughts."}, None),
        ({"tool_calls": [call("call_a", '{"city":"Rome"}')]}, "reasoning"),  # edited arguments
        ({"tool_calls": [call("call_a")], "content": "Let me check."}, "reasoning"),
        ({"tool_calls": [call("call_zzz")]}, None),  # not one of ours
        ({"content": "It is 4C."}, None),
    ],
)
def test_a_changed_turn_gets_its_reasoning_back_only_by_tool_call_id(message, restored):
    memory = TurnMemory()
    memory.remember([1, 2, 3], "Need the weather.", "", [call("call_a")])
    got = memory.restore([{"role": "assistant", **message}])[0]
    assert ("completion_token_ids" in got) == (restored == "ids")
    if restored == "reasoning":
        assert got["reasoning"] == "Need the weather."
    if restored is None:
        assert got == {"role": "assistant", **message}


def test_turn_memory_is_bounded():
    memory = TurnMemory(max_turns=2)
    for i in range(3):
        memory.remember([i], "", "", [call(f"call_{i}")])
    got = memory.restore(
        [{"role": "assistant", "tool_calls": [call(f"call_{i}")]} for i in range(3)]
    )
    assert ["completion_token_ids" in m for m in got] == [False, True, True]
