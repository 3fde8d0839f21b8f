"""The o200k_harmony tokenizer: special ids, tokenizer.json loading, incremental detokenization."""

import json

import pytest

from gptoss_mlx.errors import GptOssError
from gptoss_mlx.tokenizer import (
    O200K_PATTERN,
    SPECIAL_TOKENS,
    STOP_TOKENS,
    StreamingDetokenizer,
    bytes_to_hf_token,
    default_tokenizer,
    hf_token_to_bytes,
    load_tokenizer,
)

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "東京の天気は？ 雨です。 你好世界 안녕하세요",
    "Emoji: 🎉👍🏽👩‍👩‍👧‍👦🇫🇷 and ǅ Ω≈ç√∫",
    "code:\n\tdef f(x):\n        return x ** 2  # comment\r\n",
    "numbers 1234567 3.14159 -42 1e-5",
    "   leading and trailing spaces   ",
    "<|start|>not special unless asked<|end|>",
]


def test_special_ids_and_stop_tokens(tok):
    assert tok.vocab_size == 201088
    for text, want in SPECIAL_TOKENS.items():
        assert tok.special_tokens[text] == want
        assert tok.encode(text, allow_special=True) == [want]
        assert tok.decode([want]) == text
    assert (tok.start_id, tok.end_id, tok.message_id, tok.channel_id) == (
        200006,
        200007,
        200008,
        200005,
    )
    assert (tok.constrain_id, tok.return_id, tok.call_id) == (200003, 200002, 200012)
    assert (tok.startoftext_id, tok.endoftext_id) == (199998, 199999)
    assert tok.stop_tokens == STOP_TOKENS == (200002, 200012)
    assert tok.end_id not in tok.stop_tokens
    assert tok.is_special(200007) and not tok.is_special(15339)


def test_encode_decode_roundtrip(tok):
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(i < 199998 for i in ids)  # text never becomes special tokens by default
        assert tok.decode(ids) == text
    ids = tok.encode("<|start|>user<|message|>hi<|end|>", allow_special=True)
    assert ids[0] == 200006 and ids[-1] == 200007 and 200008 in ids


def test_pattern_is_o200k(tok):
    assert tok.encoding._pat_str == O200K_PATTERN


def test_byte_level_mapping_roundtrips():
    every_byte = bytes(range(256))
    token = bytes_to_hf_token(every_byte)
    assert hf_token_to_bytes(token) == every_byte
    assert bytes_to_hf_token(b" hello") == "Ġhello"
    with pytest.raises(GptOssError):
        hf_token_to_bytes("\u4e00")  # not in the byte map


@pytest.fixture(scope="module")
def hf_tokenizer_json(tok, tmp_path_factory):
    """A tokenizer.json in the published Hugging Face shape, made from the real o200k ranks."""
    ranks = tok.encoding._mergeable_ranks
    vocab = {bytes_to_hf_token(b): r for b, r in ranks.items()}
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    data = {
        "version": "1.0",
        "added_tokens": added,
        "pre_tokenizer": {"type": "Sequence"},
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "ignore_merges": True},
    }
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return folder, data


def test_tokenizer_json_matches_tiktoken(tok, hf_tokenizer_json):
    folder, _ = hf_tokenizer_json
    built = load_tokenizer(folder)
    assert built.vocab_size == tok.vocab_size
    assert built.special_tokens == tok.special_tokens
    for text in SAMPLES:
        assert built.encode(text) == tok.encode(text)
        assert built.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
        assert built.decode(tok.encode(text)) == text
    assert load_tokenizer(folder / "tokenizer.json").encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_tokenizer_json_with_wrong_special_id_raises(hf_tokenizer_json, tmp_path):
    _, data = hf_tokenizer_json
    bad = dict(data)
    bad["added_tokens"] = [
        {**t, "id": 200099} if t["content"] == "<|call|>" else t
        for t in data["added_tokens"]
        if t["id"] != 200099
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(GptOssError, match=r"<\|call\|> is 200099 \(expected 200012\)"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_missing_special_raises(tmp_path):
    data = {
        "added_tokens": [{"id": 3, "content": "<|endoftext|>", "special": True}],
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2}, "merges": []},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(GptOssError, match="not gpt-oss's o200k_harmony"):
        load_tokenizer(tmp_path)


def test_unreadable_tokenizer_json_raises(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(GptOssError, match="Could not read"):
        load_tokenizer(tmp_path)


def test_folder_without_tokenizer_json_uses_o200k_harmony(tok, tmp_path):
    for loaded in (load_tokenizer(tmp_path), load_tokenizer()):
        assert loaded.encoding.name == "o200k_harmony"
        assert loaded.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


def test_missing_vocabulary_gives_a_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    default_tokenizer.cache_clear()
    try:
        with pytest.raises(GptOssError, match="TIKTOKEN_CACHE_DIR"):
            default_tokenizer()
    finally:
        default_tokenizer.cache_clear()


@pytest.mark.parametrize("text", SAMPLES[1:3] + ["a🎉b", "ÿ€𝄞", "ﷺ 𒀱 ஸ்ரீ"])
def test_streaming_detokenizer_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    detok = StreamingDetokenizer(tok)
    deltas = [detok.add(t) for t in ids] + [detok.finalize()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_streaming_detokenizer_splits_multibyte_tokens(tok):
    """Feed a multi-byte character one byte-token at a time: nothing comes out until it is whole."""
    byte_ids = [tok.encoding._mergeable_ranks[bytes([b])] for b in "🎉".encode()]
    detok = StreamingDetokenizer(tok)
    assert [detok.add(t) for t in byte_ids[:-1]] == ["", "", ""]
    assert detok.pending
    assert detok.add(byte_ids[-1]) == "🎉"
    assert not detok.pending


def test_streaming_detokenizer_flushes_truncated_bytes(tok):
    first_byte = tok.encoding._mergeable_ranks[bytes(["🎉".encode()[0]])]
    detok = StreamingDetokenizer(tok)
    assert detok.add(first_byte) == ""
    assert detok.finalize() == "\ufffd"
    assert detok.add(tok.encode("ok")[0]) == "ok"  # reusable after finalize
    assert detok.add(10**9) == ""  # unknown ids are skipped, not raised
