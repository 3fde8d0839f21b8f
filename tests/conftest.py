"""Shared fixtures: tiny random checkpoints (written once per session) and the reference model."""

from __future__ import annotations

import pytest

import checkpoints as ck


@pytest.fixture(scope="session")
def hf_tensors():
    return ck.make_hf_tensors(ck.TINY, seed=0)


@pytest.fixture(scope="session")
def reference(hf_tensors):
    return ck.reference_model(hf_tensors, ck.TINY)


@pytest.fixture(scope="session")
def hf_mxfp4_dir(tmp_path_factory, hf_tensors):
    return ck.write_hf_mxfp4(tmp_path_factory.mktemp("hf-mxfp4"), ck.TINY, hf_tensors)
