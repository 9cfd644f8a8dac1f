"""Loads an HF-format checkpoint folder (config.json + safetensors, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from services.executor.model.config import ModelConfig
from services.executor.model.decoder import DecoderModel

SHARD_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
# Buffers some older exports carry; the decoder recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The folder is not a checkpoint of the model its config describes."""


def load_checkpoint(
    path: str | Path, *, dtype: torch.dtype | None = None, batch_invariant: bool = False,
    attention: str = "auto",
) -> tuple[ModelConfig, DecoderModel]:
    """The folder's config and model, in `dtype`, or None: the dtype its config names
    (float32 when it names none), in the fast or the batch-invariant mode (see
    `decoder.py`), with the named attention backend. EOS ids are config.json's then
    generation_config.json's."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing")
    generation_file = folder / GENERATION_CONFIG
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
    config = ModelConfig.from_hf(json.loads(config_file.read_text()), generation)
    model = DecoderModel(config, dtype or checkpoint_dtype(config), batch_invariant=batch_invariant,
                         attention=attention)
    _assign(model, _read_tensors(folder))
    return config, model


def checkpoint_dtype(config: ModelConfig) -> torch.dtype:
    """The dtype the checkpoint's config names; float32 when it names none."""
    return getattr(torch, config.dtype) if config.dtype else torch.float32


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a checkpoint consists of: the index's shards, or the lone file."""
    index_file = folder / SHARD_INDEX
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index_file.name} lists shards that are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {folder}")
    return files


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        for name, tensor in load_file(file).items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} appears in more than one file ({file.name})"
                )
            if not name.endswith(IGNORED_SUFFIXES):
                tensors[name] = tensor
    return tensors


def _assign(model: DecoderModel, tensors: dict[str, torch.Tensor]) -> None:
    targets = model.state_dict()
    optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(targets) - set(tensors) - optional)
    if missing:
        raise CheckpointError(f"checkpoint lacks tensors: {missing}")
    extra = sorted(set(tensors) - set(targets))
    if extra:
        raise CheckpointError(f"checkpoint has tensors the model does not: {extra}")
    for name, tensor in tensors.items():
        if tensor.shape != targets[name].shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(targets[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in optional:
                continue  # tied: HF also ignores a stored lm_head and uses the embedding
            targets[name].copy_(tensor)
