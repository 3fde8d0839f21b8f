"""A model argument as a folder: a local one, or a Hugging Face repo id fetched by hf-hub."""

from __future__ import annotations

import json
import os

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

from .errors import GptOssError
from .safetensors_check import TensorInfo

# Only what the model and tokenizer need: the published repos also carry `original/` and `metal/`
# copies of the weights, which would double the download.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
IGNORE_PATTERNS = ["original/*", "metal/*"]


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _folder_or_repo_id(path_or_repo: str) -> str:
    """`path_or_repo` with `~` expanded: an existing path, or a name shaped like a hub repo id
    (owner/name); anything else is a GptOssError."""
    path = os.path.expanduser(str(path_or_repo))
    if not os.path.exists(path) and not _looks_like_repo_id(path):
        raise GptOssError(
            f"{path_or_repo}: no such folder, and not a Hugging Face repo id (owner/name)"
        )
    return path


def _first_line(e: Exception) -> str:
    """What went wrong, in one line (the exception's first line, else its type)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def local_model_path(path_or_repo: str) -> str | None:
    """A local folder for `path_or_repo` without downloading: the folder itself, or the hub
    repo's snapshot when it is fully in the local cache; None otherwise."""
    path = _folder_or_repo_id(path_or_repo)
    if os.path.exists(path):
        return path
    try:
        return snapshot_download(
            path,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            local_files_only=True,
        )
    except Exception:  # not (fully) cached
        return None


def remote_headers(repo: str) -> tuple[dict, dict[str, TensorInfo]]:
    """A hub repo's config.json and its safetensors headers (name -> dtype and shape), fetched
    without the weights (the headers come by HTTP range requests)."""
    try:
        with open(hf_hub_download(repo, "config.json")) as f:
            config = json.load(f)
        metadata = HfApi().get_safetensors_metadata(repo)
    except Exception as e:  # offline, unknown repo, gated: all end the same way
        raise GptOssError(
            f"could not read {repo}'s headers from the Hugging Face hub ({_first_line(e)}); "
            "check your connection, or pass a local checkpoint folder instead"
        ) from None
    infos = {
        name: TensorInfo(f"{repo}/{file}", tensor.dtype, tuple(tensor.shape))
        for file, shard in metadata.files_metadata.items()
        for name, tensor in shard.tensors.items()
    }
    return config, infos


def resolve_model_path(path_or_repo: str, progress: bool = True) -> str:
    """A local folder for `path_or_repo`, downloading a hub repo (with progress) when needed."""
    path = _folder_or_repo_id(path_or_repo)
    if os.path.exists(path):
        return path
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        return snapshot_download(
            path, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS
        )
    except Exception as e:  # offline, unknown repo, gated, disk full: all end the same way
        raise GptOssError(
            f"could not fetch {path_or_repo} from the Hugging Face hub ({_first_line(e)}); "
            "check your connection, or pass a local checkpoint folder instead"
        ) from None
