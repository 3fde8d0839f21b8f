"""Shared fixtures: tiny random checkpoints (written once per session), the reference model, and
the o200k vocabulary (those fixtures skip, with the reason, only where it cannot load)."""

from __future__ import annotations

import checkpoints as ck
import numpy as np
import pytest


@pytest.fixture(scope="session")
def hf_tensors():
    return ck.make_hf_tensors(ck.TINY, seed=0)


@pytest.fixture(scope="session")
def reference(hf_tensors):
    return ck.reference_model(hf_tensors, ck.TINY)


@pytest.fixture(scope="session")
def ids():
    """Token ids `[2, 21]` for the TINY model: batch 2, longer than its 8-key window."""
    return np.random.RandomState(1).randint(0, ck.TINY.vocab_size, (2, 21))


@pytest.fixture(scope="session")
def ref_logits(reference, ids):
    """transformers' float32 logits for `ids`: what every layout and path must reproduce."""
    return ck.reference_logits(reference, ids)


@pytest.fixture(scope="session")
def hf_mxfp4_dir(tmp_path_factory, hf_tensors):
    return ck.write_hf_mxfp4(tmp_path_factory.mktemp("hf-mxfp4"), ck.TINY, hf_tensors)


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, hf_mxfp4_dir):
    """`hf_mxfp4_dir` converted to the gptoss-mlx layout."""
    from gptoss_mlx import convert

    return convert(hf_mxfp4_dir, str(tmp_path_factory.mktemp("converted") / "tiny"))


@pytest.fixture(scope="session")
def real_120b_layer_dir(tmp_path_factory):
    """One layer at gpt-oss-120b's shapes (128 experts of 2880: 1.7 GB), vocabulary 8000."""
    import mlx.core as mx

    folder = ck.write_real_shapes(tmp_path_factory.mktemp("real-120b-layer"), "120b", layers=1)
    mx.clear_cache()
    return folder


@pytest.fixture(scope="session")
def tok():
    from gptoss_mlx.errors import GptOssError
    from gptoss_mlx.tokenizer import default_tokenizer

    try:
        return default_tokenizer()
    except GptOssError as e:
        pytest.skip(f"o200k_harmony vocabulary not available offline: {e}")


@pytest.fixture(scope="session")
def harmony_enc():
    """openai-harmony's encoding: the oracle for rendering and parsing."""
    oh = pytest.importorskip("openai_harmony")
    try:
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # the library raises its own error type when the vocabulary is missing
        pytest.skip(
            f"openai-harmony cannot load o200k_base ({e}); set TIKTOKEN_ENCODINGS_BASE to a folder "
            "holding o200k_base.tiktoken"
        )


@pytest.fixture(scope="session")
def experts32_dir(tmp_path_factory):
    """`checkpoints.EXPERTS32` (float32 weights, 512-token vocabulary) in the published layout."""
    tensors = ck.make_hf_tensors(ck.EXPERTS32, seed=4)
    return ck.write_hf_mxfp4(tmp_path_factory.mktemp("experts32"), ck.EXPERTS32, tensors, shards=1)


@pytest.fixture(scope="session")
def o200k_experts_dir(tmp_path_factory, tok):
    """32 experts, 64-dim heads and gpt-oss's real vocabulary (for chat), bfloat16, hidden 64."""
    import mlx.core as mx

    config = ck.EXPERTS32.replace(
        vocab_size=tok.vocab_size, hidden_size=64, num_attention_heads=8, num_key_value_heads=1
    )
    tensors = ck.make_hf_tensors(config, seed=5, dtype=mx.bfloat16)
    return ck.write_hf_mxfp4(tmp_path_factory.mktemp("o200k-experts"), config, tensors, shards=1)


@pytest.fixture(scope="session")
def o200k_dir(tmp_path_factory, tok):
    """A tiny random checkpoint with gpt-oss's real vocabulary size (201088), so the o200k_harmony
    tokenizer and harmony prompts apply; bfloat16 and hidden size 32 keep it ~26 MB."""
    import mlx.core as mx

    config = ck.TINY.replace(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=32)
    tensors = ck.make_hf_tensors(config, seed=3, dtype=mx.bfloat16)
    return ck.write_hf_mxfp4(tmp_path_factory.mktemp("o200k"), config, tensors, shards=1)
