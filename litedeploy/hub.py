"""Model ids from the hubs: `internlm/internlm2-chat-1_8b` -> a local folder (or GGUF file).

Hugging Face through `huggingface_hub.snapshot_download` (its cache, HF_HOME / HF_HUB_CACHE,
HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN and progress bars, as users know them), or ModelScope with
LITEDEPLOY_USE_MODELSCOPE=True (lmdeploy's LMDEPLOY_USE_MODELSCOPE too). Only the files we load
are fetched. A path that exists always wins over an id.

`repo:QUANT` (e.g. `Qwen/Qwen2-0.5B-Instruct-GGUF:Q4_K_M`) or `gguf_file=` picks one GGUF file
of a repository holding many.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from litedeploy.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

MODELSCOPE_ENV = ("LITEDEPLOY_USE_MODELSCOPE", "LMDEPLOY_USE_MODELSCOPE")
# config, tokenizer (json / SentencePiece / tiktoken / BPE files), chat template, weights; the *.py
# files are a model's remote code, which `litedeploy check` hands to transformers (never run by us)
_COMMON = ["*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja", "*.py"]
MODEL_PATTERNS = [*_COMMON, "*.safetensors"]
BIN_PATTERNS = [*_COMMON, "*.bin"]  # older repositories: pytorch_model*.bin only
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_TRUE = ("1", "true", "yes", "on")


class HubError(ModelNotFoundError):
    """A model id that cannot be fetched; the message says which case and what to do."""


@dataclass(frozen=True)
class ModelId:
    repo_id: str
    quant: str | None = None  # `repo:Q4_K_M`: the GGUF file whose name holds this tag


def parse_model_id(text: str) -> ModelId | None:
    """`org/name` or `org/name:QUANT`; None for anything not shaped like an id."""
    if not _REPO_ID.match(text):
        return None
    repo_id, _, quant = text.partition(":")
    return ModelId(repo_id, quant or None)


def use_modelscope() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in MODELSCOPE_ENV)


def resolve_model(model: str, revision: str | None = None, gguf_file: str | None = None,
                  cache_dir: str | None = None) -> str:
    """A local path for `model`: itself when it exists, else a hub download (or its cache).
    `cache_dir` (lmdeploy's `download_dir`) replaces the hub's cache folder."""
    if Path(model).expanduser().exists():
        return model
    model_id = parse_model_id(model)
    if model_id is None:  # not an id: the loader reports the missing path
        return model
    if use_modelscope():
        return _from_modelscope(model_id, revision, gguf_file, cache_dir)
    return _from_hugging_face(model_id, revision, gguf_file, cache_dir)


# ---- Hugging Face ------------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hf_settings() -> dict:
    """snapshot_download's settings from the environment as it is now (huggingface_hub reads
    HF_ENDPOINT / HF_HOME once, when first imported)."""
    settings: dict = {"local_files_only": _offline()}
    if os.environ.get("HF_ENDPOINT"):
        settings["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/")
    if os.environ.get("HF_HUB_CACHE"):
        settings["cache_dir"] = os.environ["HF_HUB_CACHE"]
    elif os.environ.get("HF_HOME"):
        settings["cache_dir"] = os.path.join(os.environ["HF_HOME"], "hub")
    return settings


def _from_hugging_face(model_id: ModelId, revision: str | None, gguf_file: str | None,
                       cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download

    settings = hf_settings()
    if cache_dir:
        settings["cache_dir"] = cache_dir

    def download(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(model_id.repo_id, revision=revision,
                                          allow_patterns=patterns, **settings))
        except Exception as exc:  # each hub failure becomes one line
            raise hf_error(exc, model_id.repo_id, revision, settings) from exc

    gguf_patterns = _gguf_patterns(model_id, gguf_file)
    if gguf_patterns:
        return str(_pick_gguf(download(gguf_patterns), model_id, gguf_file))
    folder = download(MODEL_PATTERNS)
    if not _has_weights(folder):
        folder = download(BIN_PATTERNS)
    _check_complete(folder, model_id.repo_id)
    return str(folder)


def hf_error(exc: Exception, repo_id: str, revision: str | None, settings: dict) -> HubError:
    """One line per case: which failure, and what the user can do about it."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = settings.get("endpoint") or "https://huggingface.co"
    rev = revision or "main"
    if isinstance(exc, GatedRepoError):  # a subclass of RepositoryNotFoundError: first
        return HubError(f"{repo_id} is a gated model: accept its terms at {endpoint}/{repo_id} "
                        "and log in (`hf auth login`, or set HF_TOKEN)")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{repo_id} is neither a local path nor a model on {endpoint}: check the "
                        "spelling, or log in (HF_TOKEN) if it is private")
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {rev!r}: pass an existing branch, tag or "
                        "commit to --revision")
    if isinstance(exc, LocalEntryNotFoundError) or type(exc).__name__ == "IncompleteSnapshotError":
        cache = settings.get("cache_dir") or "the Hugging Face cache (HF_HOME)"
        if settings.get("local_files_only"):
            return HubError(f"{repo_id} is no local path, and (revision {rev}) not in the offline "
                            f"cache {cache} with HF_HUB_OFFLINE=1: download it once with network "
                            "access, or unset HF_HUB_OFFLINE")
        return HubError(f"{repo_id} is no local path, and cannot reach {endpoint} to download it, "
                        f"nor find it in the cache {cache}: check the network (or HF_ENDPOINT)")
    return HubError(f"cannot download {repo_id} from {endpoint}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _check_complete(folder: Path, repo_id: str) -> None:
    if not (folder / "config.json").is_file():
        raise HubError(f"{repo_id} has no config.json: is it a transformers model? (A GGUF "
                       "repository needs `repo:QUANT` or --gguf-file)")
    if not _has_weights(folder):
        raise HubError(f"{repo_id} has no *.safetensors or *.bin weights in {folder}: (offline) "
                       "download them once with network access")


def _gguf_patterns(model_id: ModelId, gguf_file: str | None) -> list[str] | None:
    if gguf_file:
        return [gguf_file]
    if model_id.quant:  # file names on the hubs spell the tag either way
        tags = {model_id.quant, model_id.quant.upper(), model_id.quant.lower()}
        return [f"*{tag}*.gguf" for tag in sorted(tags)]
    return None


def _pick_gguf(folder: Path, model_id: ModelId, gguf_file: str | None) -> Path:
    if gguf_file:
        path = folder / gguf_file
        if not path.is_file():
            raise HubError(f"{model_id.repo_id} has no file {gguf_file!r}: pass one of its .gguf "
                           "files to --gguf-file")
        return path
    tag = model_id.quant.lower()
    # `Q4_0` names model-Q4_0.gguf before model-Q4_0_4_4.gguf: a whole-tag match first
    files = sorted((p for p in folder.rglob("*.gguf") if tag in p.name.lower()),
                   key=lambda p: (not p.stem.lower().endswith(tag), p.name))
    if not files:
        raise HubError(f"{model_id.repo_id} has no GGUF file with {model_id.quant!r} in its name: "
                       "pick another tag, or name the file with --gguf-file")
    if len(files) > 1:
        logger.warning("%d GGUF files match %s; loading %s", len(files), model_id.quant,
                       files[0].name)
    return files[0]


# ---- ModelScope --------------------------------------------------------------------------------
def _from_modelscope(model_id: ModelId, revision: str | None, gguf_file: str | None,
                     cache_dir: str | None) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise HubError(f"{MODELSCOPE_ENV[0]} is set, but the modelscope package is not "
                       "installed: pip install modelscope (or unset the variable to use the "
                       "Hugging Face Hub)") from None
    patterns = _gguf_patterns(model_id, gguf_file) or MODEL_PATTERNS
    kwargs = {"revision": revision} if revision else {}
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    try:
        folder = Path(snapshot_download(model_id.repo_id, allow_patterns=patterns, **kwargs))
    except Exception as exc:  # modelscope's errors vary by version
        raise HubError(f"cannot download {model_id.repo_id} from ModelScope: "
                       f"{_first_line(exc)}") from exc
    if gguf_file or model_id.quant:
        return str(_pick_gguf(folder, model_id, gguf_file))
    _check_complete(folder, model_id.repo_id)
    return str(folder)


def repo_name_of(path: Path) -> str | None:
    """`org/name` for a folder inside a hub cache (`models--org--name/snapshots/<commit>`)."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    return None
