"""stream_generate / generate: greedy parity with transformers, chunked prefill, stop tokens,
seeds, statistics, and `load`."""

from __future__ import annotations

import gc
import json
import os

import checkpoints as ck
import mlx.core as mx
import numpy as np
import pytest
from scripted import ScriptedModel

from gptoss_mlx import GptOssError, generate, harmony, load, load_model, stream_generate
from gptoss_mlx.tokenizer import SPECIAL_TOKENS

RETURN, CALL, END = (
    SPECIAL_TOKENS["<|return|>"],
    SPECIAL_TOKENS["<|call|>"],
    SPECIAL_TOKENS["<|end|>"],
)


@pytest.fixture(scope="module")
def model32(hf_mxfp4_dir):
    return load_model(hf_mxfp4_dir, dtype="float32", dense_bits=16)


def prompt_ids(n, seed=1):
    return np.random.RandomState(seed).randint(0, ck.TINY.vocab_size, n).tolist()


def greedy(model, prompt, n, **kw):
    return [e.token for e in stream_generate(model, prompt, max_tokens=n, temperature=0, **kw)]


# -- parity with transformers --------------------------------------------------------------------


def transformers_greedy(reference, prompt, n):
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
    )
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("length", [5, 13, 30])  # shorter and longer than the 8-token window
def test_greedy_matches_transformers_generate(model32, reference, length):
    prompt = prompt_ids(length, seed=length)
    ref = transformers_greedy(reference, prompt, 12)
    assert len(ref) == 12
    assert greedy(model32, prompt, 12) == ref


# -- prefill -------------------------------------------------------------------------------------


def test_chunked_prefill_gives_the_same_tokens(model32):
    prompt = prompt_ids(21, seed=4)
    one_shot = greedy(model32, prompt, 10)
    for chunk in (1, 3, 8, 20):
        assert greedy(model32, prompt, 10, prefill_chunk=chunk) == one_shot, chunk


def test_chunked_prefill_bounds_peak_memory(model32):
    prompt = prompt_ids(500, seed=6)

    def generation(chunk: int) -> tuple[list, int]:
        """Its events and its peak above what the process held when it started (other tests'
        arrays not yet collected are no part of it)."""
        gc.collect()
        start = mx.get_active_memory()
        events = list(
            stream_generate(model32, prompt, max_tokens=2, temperature=0, prefill_chunk=chunk)
        )
        return events, events[-1].stats.peak_memory - start

    (one_shot, one_shot_peak), (chunked, chunked_peak) = generation(500), generation(32)
    assert [e.token for e in chunked] == [e.token for e in one_shot]
    # One-shot attention scores are [heads, 500, 500]; in chunks of 32 they are [heads, 32, <=500].
    assert chunked_peak < one_shot_peak / 3


def test_a_kept_cache_continues_the_same_sequence(model32):
    """Generating, then feeding more tokens through the same cache, equals one long prompt."""
    first, more = prompt_ids(6, seed=8), prompt_ids(7, seed=9)
    cache = model32.make_cache()
    out = greedy(model32, first, 4, cache=cache)
    # Ended at max_tokens: the last token was sampled but not yet fed (see generate.py).
    assert cache[0].offset == len(first) + len(out) - 1
    continued = greedy(model32, [out[-1]] + more, 5, cache=cache)
    assert continued == greedy(model32, first + out + more, 5)


def test_cancelled_stops_within_two_tokens_and_the_cache_holds_what_came(model32):
    """`cancelled` turning true after the 3rd event: at most 2 more come (the 5 are the
    uncancelled run's first ones), the last without a finish_reason, and the cache holds exactly
    the prompt and the tokens that came: continuing it equals one long prompt."""
    prompt, more = prompt_ids(6, seed=10), prompt_ids(5, seed=11)
    cache = model32.make_cache()
    events = []
    for event in stream_generate(
        model32,
        prompt,
        max_tokens=50,
        temperature=0,
        cache=cache,
        cancelled=lambda: len(events) >= 3,
    ):
        events.append(event)
    came = [e.token for e in events]
    assert 3 <= len(came) <= 5 and came == greedy(model32, prompt, len(came))
    assert all(e.finish_reason is None for e in events)
    assert cache[0].offset == len(prompt) + len(came)
    assert greedy(model32, more, 4, cache=cache) == greedy(model32, prompt + came + more, 4)
    result = generate(model32, prompt, max_tokens=50, temperature=0, cancelled=lambda: True)
    assert result["completion_token_ids"] == [] and result["finish_reason"] == "cancelled"


# -- stop tokens and the pipelined loop, on a scripted model ------------------------------------


@pytest.mark.parametrize("stop, reason", [(RETURN, "stop"), (CALL, "tool_calls")])
def test_stops_on_return_and_call_but_not_on_end(stop, reason):
    script = [11, END, 12, SPECIAL_TOKENS["<|start|>"], 13, stop, 14, 15]
    model = ScriptedModel(script)
    cache = model.make_cache()
    events = list(stream_generate(model, [1, 2, 3], max_tokens=50, temperature=0, cache=cache))
    assert [e.token for e in events] == script[:6]
    assert [e.finish_reason for e in events] == [None] * 5 + [reason]
    assert events[-1].stats.finish_reason == reason
    # The stop token was fed by the step queued ahead of reading it: the cache holds it.
    assert cache[0].offset == 3 + 6
    assert model.calls == 1 + 6


def test_length_finish_queues_no_extra_step():
    model = ScriptedModel([5] * 10)
    cache = model.make_cache()
    events = list(stream_generate(model, [1, 2], max_tokens=4, temperature=0, cache=cache))
    assert [e.token for e in events] == [5] * 4 and events[-1].finish_reason == "length"
    assert model.calls == 1 + 3 and cache[0].offset == 2 + 3


def test_custom_stop_tokens_and_no_stop_tokens():
    model = ScriptedModel([7, RETURN, 8, 9])
    assert [
        e.token for e in stream_generate(model, [1], max_tokens=3, temperature=0, stop_tokens=())
    ] == [7, RETURN, 8]
    events = list(
        stream_generate(ScriptedModel([7, 9, 8]), [1], max_tokens=5, temperature=0, stop_tokens=[9])
    )
    assert [e.token for e in events] == [7, 9] and events[-1].finish_reason == "stop"


def test_events_carry_parsed_deltas_by_channel(tok):
    completion = tok.encode(
        "<|channel|>analysis<|message|>Let me think: ünïcode 🙂.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>The answer is 42.<|return|>",
        allow_special=True,
    )
    events = list(
        stream_generate(
            ScriptedModel(completion), [1, 2], tokenizer=tok, max_tokens=100, temperature=0
        )
    )
    assert [e.token for e in events] == completion
    by_kind = {}
    for e in events:
        for d in e.deltas:
            by_kind[d.kind] = by_kind.get(d.kind, "") + d.text
        assert e.text == "".join(d.text for d in e.deltas)
    assert by_kind == {"reasoning": "Let me think: ünïcode 🙂.", "content": "The answer is 42."}
    assert {e.channel for e in events if e.kind == "content"} == {"final"}
    assert {e.channel for e in events if e.kind == "reasoning"} == {"analysis"}


def test_generate_returns_the_parsed_tool_call(tok):
    completion = tok.encode(
        "<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>',
        allow_special=True,
    )
    out = generate(ScriptedModel(completion), [1, 2], tokenizer=tok, max_tokens=100, temperature=0)
    assert out["completion_token_ids"] == completion and out["finish_reason"] == "tool_calls"
    assert out["tool_calls"] == harmony.parse_completion(completion, tok)["tool_calls"]
    assert out["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    assert out["prompt_token_ids"] == [1, 2]


# -- stop strings, logprobs, prefill pauses, the context ------------------------------------


def scripted_answer(tok, answer, reasoning="Think STOP twice."):
    return ScriptedModel.from_harmony(
        f"<|channel|>analysis<|message|>{reasoning}<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{answer}<|return|>",
        tok,
    )


def streamed(events, kind):
    return "".join(d.text for e in events for d in e.deltas if d.kind == kind)


@pytest.mark.parametrize(
    "stop, answer, reason",
    [
        (["STOP"], "Hello world. ", "stop"),  # cut before it; reasoning is not the answer
        ("wor", "Hello ", "stop"),  # a string that ends inside a token
        (["zz", "ld. S"], "Hello wor", "stop"),  # the first of several to appear
        (["STOPPED", "Hello!"], "Hello world. STOP here", "stop"),  # never appears: all of it
        (["here"], "Hello world. STOP ", "stop"),
    ],
)
def test_stop_strings_cut_the_answer_and_are_never_streamed(tok, stop, answer, reason):
    model = scripted_answer(tok, "Hello world. STOP here")
    events = list(stream_generate(model, [1], tokenizer=tok, max_tokens=100, stop=stop))
    assert streamed(events, "content") == answer
    assert streamed(events, "reasoning") == "Think STOP twice."
    assert events[-1].finish_reason == reason
    out = generate(scripted_answer(tok, "Hello world. STOP here"), [1], tokenizer=tok, stop=stop)
    assert out["content"] == answer and out["reasoning"] == "Think STOP twice."


def test_a_stop_string_ends_generation_early(tok):
    model = scripted_answer(tok, "one two three four five six seven")
    events = list(stream_generate(model, [1], tokenizer=tok, max_tokens=100, stop="three"))
    completion = tok.encode(
        "<|channel|>analysis<|message|>Think STOP twice.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>one two three",
        allow_special=True,
    )
    assert [e.token for e in events] == completion  # nothing after the token that completed it
    assert events[-1].finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(model32):
    prompt = prompt_ids(9, seed=5)
    events = list(stream_generate(model32, prompt, max_tokens=6, seed=1, logprobs=3))
    tokens = [e.token for e in events]
    logits = np.array(model32(mx.array([prompt + tokens]))[0, len(prompt) - 1 : -1], np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
    logprobs -= logits.max(-1, keepdims=True)
    for e, row in zip(events, logprobs, strict=True):
        assert e.logprob == pytest.approx(row[e.token], abs=1e-4)
        best = np.argsort(-row)[:3]
        assert [t for t, _ in e.top_logprobs] == best.tolist()
        assert [lp for _, lp in e.top_logprobs] == pytest.approx(row[best].tolist(), abs=1e-4)
    assert all(e.logprob is None for e in stream_generate(model32, prompt, max_tokens=2))
    zero = list(stream_generate(model32, prompt, max_tokens=2, seed=1, logprobs=0))
    assert zero[0].logprob is not None and zero[0].top_logprobs is None


def test_logprobs_and_stop_strings_under_a_response_format(tok):
    """The constrained loop (masked draws) carries logprobs and stop strings too."""
    text = '<|channel|>final<|message|>{"a": "xyz"}<|return|>'
    events = list(
        stream_generate(
            ScriptedModel.from_harmony(text, tok),
            [1],
            tokenizer=tok,
            max_tokens=50,
            response_format={"type": "json_object"},
            logprobs=2,
        )
    )
    assert streamed(events, "content") == '{"a": "xyz"}'
    assert all(e.logprob is not None and len(e.top_logprobs) == 2 for e in events)
    assert events[-1].stats.masked_tokens > 0
    cut = list(
        stream_generate(
            ScriptedModel.from_harmony(text, tok),
            [1],
            tokenizer=tok,
            max_tokens=50,
            response_format={"type": "json_object"},
            stop=["xyz"],
        )
    )
    assert streamed(cut, "content") == '{"a": "' and cut[-1].finish_reason == "stop"


def test_events_say_which_part_each_token_belongs_to(tok):
    text = (
        "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>'
    )
    completion = tok.encode(text, allow_special=True)
    events = list(stream_generate(ScriptedModel(completion), [1], tokenizer=tok, max_tokens=99))
    parts = {}
    for e in events:
        parts.setdefault(e.part, []).append(e.token)
    assert tok.decode(parts["reasoning"]) == "Hm."
    assert tok.decode(parts["tool_call"]) == '{"a": 1}'
    assert set(parts) == {None, "reasoning", "tool_call"}


def test_prefill_pauses_see_the_cache_at_each_position(model32):
    prompt = prompt_ids(40, seed=6)
    seen = []
    cache = model32.make_cache()
    paused = greedy(
        model32,
        prompt,
        4,
        cache=cache,
        prefill_chunk=16,
        prefill_pauses=[0, 3, 16, 17, 40, 41],
        on_pause=lambda p: seen.append((p, {c.offset for c in cache})),
    )
    assert seen == [(3, {3}), (16, {16}), (17, {17}), (40, {40})]
    assert paused == greedy(model32, prompt, 4)


class SmallContext(ScriptedModel):
    class config:
        vocab_size = ScriptedModel.config.vocab_size
        max_position_embeddings = 10


def test_the_context_bounds_the_prompt_and_the_reply():
    with pytest.raises(GptOssError, match="context is 10"):
        list(stream_generate(SmallContext([5] * 20), list(range(10)), max_tokens=5))
    events = list(stream_generate(SmallContext([5] * 20), list(range(7)), max_tokens=50))
    assert len(events) == 3 and events[-1].finish_reason == "length"
    events = list(stream_generate(SmallContext([5] * 20), list(range(4)), max_tokens=None))
    assert len(events) == 6 and events[-1].finish_reason == "length"
    with pytest.raises(GptOssError, match="max_tokens=None"):
        list(stream_generate(ScriptedModel([5]), [1], max_tokens=None))


# -- seeds, statistics, no tokenizer --------------------------------------------------------------


def test_seeded_sampling_is_reproducible(model32):
    prompt = prompt_ids(9, seed=2)

    def run(seed, **kw):
        return [e.token for e in stream_generate(model32, prompt, max_tokens=12, seed=seed, **kw)]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert run(3, top_p=0.9, top_k=50, min_p=0.01) == run(3, top_p=0.9, top_k=50, min_p=0.01)


def test_without_a_tokenizer_it_runs_to_max_tokens_with_statistics(model32):
    events = list(stream_generate(model32, prompt_ids(10), max_tokens=7, seed=0))
    assert len(events) == 7 and all(e.text == "" and e.deltas == [] for e in events)
    assert [e.finish_reason for e in events] == [None] * 6 + ["length"]
    assert all(e.stats is None for e in events[:-1])
    stats = events[-1].stats
    assert stats.prompt_tokens == 10 and stats.generation_tokens == 7
    assert stats.prompt_tps > 0 and stats.generation_tps > 0 and stats.time_to_first_token > 0
    assert stats.peak_memory > 0 and stats.finish_reason == "length"
    assert "finish: length" in stats.summary()


def test_generate_without_a_tokenizer(model32):
    out = generate(model32, prompt_ids(4), max_tokens=3, temperature=0)
    assert out["reasoning"] == out["content"] == "" and out["tool_calls"] == []
    assert out["completion_token_ids"] == greedy(model32, prompt_ids(4), 3)
    assert out["stats"]["generation_tokens"] == 3 and out["finish_reason"] == "length"


@pytest.mark.parametrize(
    "prompt, kw, match",
    [
        ([], {}, "empty"),
        ([1, 2], {"max_tokens": 0}, "max_tokens"),
        ([1, 2], {"max_tokens": -3}, "max_tokens"),
        ([1, 2], {"prefill_chunk": 0}, "prefill_chunk"),
        ([1, 512], {}, "vocabulary"),
        ([1, -1], {}, "vocabulary"),
        ([1, 2], {"temperature": -1}, "temperature"),
        ([1, 2], {"top_p": 2}, "top_p"),
        ([1.5, 2], {}, "integers"),
        ([1, 2], {"seed": -1}, "seed"),
        (np.array([3, 4], np.int64), {"max_tokens": 0}, "max_tokens"),
        ([object()], {}, "token ids"),
    ],
)
def test_bad_arguments_raise_gptosserror(model32, prompt, kw, match):
    with pytest.raises(GptOssError, match=match):
        stream_generate(model32, prompt, **kw)


# -- messages and load() on a checkpoint with the real vocabulary ---------------------------------


def test_messages_prompt_is_rendered_with_harmony(o200k_dir):
    model, tokenizer = load(o200k_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = generate(
        model, messages, tokenizer=tokenizer, max_tokens=4, temperature=0, reasoning_effort="high"
    )
    assert out["prompt_token_ids"] == harmony.render_prompt(
        messages, reasoning_effort="high", tokenizer=tokenizer
    )
    assert len(out["completion_token_ids"]) == 4
    assert (
        out["content"]
        == harmony.parse_completion(out["completion_token_ids"], tokenizer)["content"]
    )
    # A plain string is one user message; messages imply the default tokenizer.
    again = generate(model, "Hi!", max_tokens=4, temperature=0, reasoning_effort="high")
    assert again["prompt_token_ids"] == harmony.render_prompt(
        [messages[1]], reasoning_effort="high"
    )


def test_load_reads_the_folders_tokenizer_json(o200k_dir, tmp_path):
    model, tokenizer = load(o200k_dir)
    assert tokenizer.vocab_size == model.config.vocab_size == 201088
    for name in os.listdir(o200k_dir):
        os.symlink(os.path.join(o200k_dir, name), tmp_path / name)
    bad = {
        "model": {"type": "BPE", "vocab": {"a": 0}},
        "added_tokens": [{"id": 1, "content": "<|x|>"}],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(bad))
    with pytest.raises(GptOssError, match="not gpt-oss's o200k_harmony"):
        load(str(tmp_path))


def test_load_rejects_a_model_too_small_for_the_harmony_vocabulary(hf_mxfp4_dir):
    with pytest.raises(GptOssError, match="too few"):
        load(hf_mxfp4_dir)


# -- the context cap (--max-context) --------------------------------------------------------------


def test_a_prompt_beyond_max_context_is_refused(hf_mxfp4_dir):
    model = load_model(hf_mxfp4_dir, dtype="float32", max_context=16)
    with pytest.raises(GptOssError, match="--max-context 16"):
        list(stream_generate(model, list(range(16)), max_tokens=2))
    cache = model.make_cache()
    list(stream_generate(model, list(range(10)), max_tokens=2, cache=cache, stop_tokens=()))
    with pytest.raises(GptOssError, match="already in the cache"):  # a kept cache counts
        list(stream_generate(model, list(range(8)), max_tokens=2, cache=cache))


def test_generation_stops_at_max_context(hf_mxfp4_dir):
    model = load_model(hf_mxfp4_dir, dtype="float32", max_context=16)
    cache = model.make_cache()
    events = list(
        stream_generate(model, list(range(10)), max_tokens=50, cache=cache, stop_tokens=())
    )
    assert len(events) == 6 and events[-1].finish_reason == "length"
    assert cache[0].offset < 16
    assert model.memory_plan.context == 16


def test_the_cli_refuses_a_prompt_beyond_max_context_in_one_line(o200k_dir):
    from click.testing import CliRunner

    from gptoss_mlx import cli

    r = CliRunner().invoke(
        cli.main, ["generate", "Hello " * 20, "-m", o200k_dir, "--max-context", "40"]
    )
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and "--max-context 40" in r.stderr
