"""The o200k_harmony tokenizer (tiktoken) and incremental detokenization.

gpt-oss uses o200k_base's byte-level BPE (ids 0..199997) plus harmony's special tokens
(199998..201087). We run it on ``tiktoken``:

* ``load_tokenizer(folder)`` builds the encoding from the checkpoint's own ``tokenizer.json``
  when the folder has one (so a checkpoint with a different vocabulary is caught, not silently
  mis-tokenized), and checks its special-token ids against :data:`SPECIAL_TOKENS`;
* otherwise it uses ``tiktoken.get_encoding("o200k_harmony")`` (downloaded once, then cached
  under ``TIKTOKEN_CACHE_DIR``).

:class:`StreamingDetokenizer` turns ids into text one token at a time without ever emitting half
of a UTF-8 character (a CJK character or an emoji is often split over several tokens).
"""

from __future__ import annotations

import codecs
import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from gptoss_mlx.errors import GptOssError

# The special tokens harmony relies on and their ids in o200k_harmony.
SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}

# Generation stops on <|return|> (final answer done) and <|call|> (tool call), never on <|end|>:
# the model ends each analysis message with <|end|> and then starts another message.
STOP_TOKENS: tuple[int, ...] = (SPECIAL_TOKENS["<|return|>"], SPECIAL_TOKENS["<|call|>"])

# o200k_base's pre-tokenization regex (the same string tiktoken uses for o200k_base/_harmony).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_ENCODING_NAME = "o200k_harmony"


class Tokenizer:
    """o200k_harmony on a ``tiktoken.Encoding``.

    ``encode`` treats text as text unless ``allow_special=True`` (so user text containing
    ``<|end|>`` cannot inject harmony structure). The ``*_id`` attributes name the harmony
    special tokens; ``stop_tokens`` are the ids generation must stop on.
    """

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.special_tokens: dict[str, int] = dict(encoding._special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        _check_special_ids(self.special_tokens, source=f"tiktoken encoding {encoding.name!r}")
        ids = SPECIAL_TOKENS
        self.startoftext_id = ids["<|startoftext|>"]
        self.endoftext_id = ids["<|endoftext|>"]
        self.return_id = ids["<|return|>"]
        self.constrain_id = ids["<|constrain|>"]
        self.channel_id = ids["<|channel|>"]
        self.start_id = ids["<|start|>"]
        self.end_id = ids["<|end|>"]
        self.message_id = ids["<|message|>"]
        self.call_id = ids["<|call|>"]
        self.stop_tokens: tuple[int, ...] = STOP_TOKENS

    @property
    def vocab_size(self) -> int:
        """Number of token ids (201088 for o200k_harmony: specials included)."""
        return self.encoding.n_vocab

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens as their text; invalid UTF-8 becomes U+FFFD)."""
        return self.encoding.decode(list(ids), errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (a special token's bytes are its text). KeyError if unknown."""
        return self.encoding.decode_single_token_bytes(token)

    def is_special(self, token: int) -> bool:
        return token in self._special_ids

    def special_id(self, text: str) -> int:
        """Id of a special token by its text, e.g. ``special_id("<|start|>")``."""
        try:
            return self.special_tokens[text]
        except KeyError:
            raise GptOssError(f"{text!r} is not a special token of this tokenizer") from None

    def __repr__(self) -> str:
        return f"Tokenizer({self.encoding.name!r}, vocab_size={self.vocab_size})"


def _check_special_ids(specials: dict[str, int], *, source: str) -> None:
    wrong = [
        f"{name} is {specials.get(name, 'missing')} (expected {want})"
        for name, want in SPECIAL_TOKENS.items()
        if specials.get(name) != want
    ]
    if wrong:
        raise GptOssError(
            f"The tokenizer from {source} is not gpt-oss's o200k_harmony: "
            + "; ".join(wrong)
            + ". Use the checkpoint's original tokenizer.json, or remove it to use tiktoken's "
            "o200k_harmony."
        )


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def hf_token_to_bytes(token: str) -> bytes:
    """Bytes of a byte-level BPE vocabulary string (inverse of the GPT-2 byte mapping)."""
    inverse = _unicode_to_bytes()
    try:
        return bytes(inverse[ch] for ch in token)
    except KeyError as e:
        raise GptOssError(
            f"tokenizer.json token {token!r} is not byte-level BPE (character {e.args[0]!r} "
            "is outside the GPT-2 byte map); gpt-oss needs the o200k_harmony tokenizer"
        ) from None


def bytes_to_hf_token(data: bytes) -> str:
    """The byte-level BPE vocabulary string of ``data`` (used to write tokenizer.json files)."""
    mapping = _bytes_to_unicode()
    return "".join(mapping[b] for b in data)


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {ch: b for b, ch in _bytes_to_unicode().items()}


def tokenizer_from_hf_json(path: str | os.PathLike) -> Tokenizer:
    """Build the tiktoken encoding from a Hugging Face ``tokenizer.json`` (byte-level BPE).

    BPE ranks are the vocabulary ids (o200k's merges are rank-ordered, so tiktoken needs no merge
    list); ``added_tokens`` not in the vocabulary become the special tokens.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        added = data.get("added_tokens") or []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GptOssError(f"Could not read the tokenizer file {path}: {e}") from None
    if data["model"].get("type", "BPE") != "BPE" or not isinstance(vocab, dict):
        raise GptOssError(f"{path} is not a BPE tokenizer; gpt-oss needs o200k_harmony")

    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        ranks[hf_token_to_bytes(token)] = int(rank)
    taken = set(ranks.values())
    specials = {t["content"]: int(t["id"]) for t in added if int(t["id"]) not in taken}
    _check_special_ids(specials, source=str(path))
    try:
        encoding = tiktoken.Encoding(
            name=_ENCODING_NAME,
            pat_str=O200K_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
    except Exception as e:  # tiktoken rejects inconsistent ranks with various exception types
        raise GptOssError(f"Could not build a tokenizer from {path}: {e}") from None
    return Tokenizer(encoding)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """tiktoken's o200k_harmony (cached: the vocabulary is loaded once per process)."""
    try:
        encoding = tiktoken.get_encoding(_ENCODING_NAME)
    except Exception as e:  # no network and no cache, or a tiktoken older than 0.12
        raise GptOssError(
            f"Could not load the {_ENCODING_NAME} vocabulary ({type(e).__name__}: {str(e)[:160]}). "
            "tiktoken downloads it once (needs internet) and caches it; offline, set "
            "TIKTOKEN_CACHE_DIR to a folder holding the cached o200k_base file, use "
            "tiktoken>=0.12, or load a checkpoint folder that has tokenizer.json."
        ) from None
    return Tokenizer(encoding)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The checkpoint's tokenizer: ``path/tokenizer.json`` when present, else o200k_harmony.

    ``path`` may be a checkpoint folder, a ``tokenizer.json`` file, or None.
    """
    if path is not None:
        p = Path(path)
        candidate = p if p.is_file() else p / "tokenizer.json"
        if candidate.is_file():
            return tokenizer_from_hf_json(candidate)
    return default_tokenizer()


class StreamingDetokenizer:
    """Token ids in, text deltas out; never emits half of a UTF-8 character.

    ``add(token)`` returns the text that became complete with that token ("" while a
    multi-byte character is still incomplete); ``finalize()`` flushes what is left (invalid or
    truncated bytes become U+FFFD). The concatenation of all deltas equals ``decode(ids)``.
    Unknown ids are skipped rather than raising, so a stream never breaks mid-generation.
    """

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer or default_tokenizer()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        try:
            data = self.tokenizer.token_bytes(int(token))
        except (KeyError, ValueError, TypeError, OverflowError):
            return ""
        return self._decoder.decode(data)

    def finalize(self) -> str:
        """Flush buffered bytes and reset, ready for a new stream."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are buffered."""
        return bool(self._decoder.getstate()[0])
