"""Hugging Face model folders: config.json (+ generation_config.json) and *.safetensors shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from tokenmill.config import ModelConfig, model_config_from_hf

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def load_hf_config(folder: str | Path) -> ModelConfig:
    """ModelConfig from config.json; eos ids also taken from generation_config.json (config first)."""
    folder = Path(folder)
    cfg = _read_json(folder / "config.json")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "unknown")
        raise ValueError(f"{folder}: pre-quantized Hugging Face checkpoints ({method}) are not supported; "
                         "use a float checkpoint or a GGUF file")
    config = model_config_from_hf(cfg)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        eos = _read_json(gen_path).get("eos_token_id")
        extra = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        config.eos_token_ids = list(dict.fromkeys([*config.eos_token_ids, *extra]))
    return config


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's shard files: those named by the index, else every *.safetensors file."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        names = sorted(set(_read_json(folder / INDEX_FILE).get("weight_map", {}).values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{folder}: {INDEX_FILE} names missing shard files {missing}")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def load_hf_tensors(folder: str | Path, config: ModelConfig,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every parameter under its Hugging Face name, floating-point tensors cast to ``dtype``.

    Rotary ``inv_freq`` buffers are skipped (recomputed from the config) and ``lm_head.weight`` is
    dropped when the embeddings are tied.
    """
    import torch  # here, not at the top: load_hf_config serves the API process, which does not load torch

    dtype = dtype or torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if "rotary_emb." in name or (name == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    t = f.get_tensor(name)
                    tensors[name] = t.to(dtype) if t.is_floating_point() else t
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot read safetensors file {file}: {e}") from e
    return tensors
