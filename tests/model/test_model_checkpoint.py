"""Loading HF-format checkpoints, and the tiny random checkpoints the tests and demo use."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.tokenizer import ByteTokenizer
from services.executor.model import (
    CheckpointError,
    KVCacheGeometry,
    SequenceStep,
    load_checkpoint,
)
from services.executor.model.tiny_checkpoint import make_tiny_checkpoint

SMALL = {"num_layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2}
REPO = Path(__file__).resolve().parents[2]


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize(("arch", "shards"), [("llama", 1), ("llama", 3), ("qwen2", 2)])
def test_round_trip_restores_every_tensor(tmp_path: Path, arch: str, shards: int) -> None:
    folder = make_tiny_checkpoint(tmp_path, arch=arch, shards=shards, **SMALL)
    stored = stored_tensors(folder)
    assert len(list(folder.glob("*.safetensors"))) == shards
    config, model = load_checkpoint(folder)
    assert config.model_type == arch
    loaded = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(loaded[name], tensor), name
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in stored
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert set(stored) == set(loaded)


def test_loading_casts_to_the_requested_dtype(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, **SMALL)
    _, model = load_checkpoint(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def edit_config(folder: Path, **fields: object) -> None:
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | fields))


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])  # transformers 5, transformers 4
def test_the_checkpoints_dtype_is_honoured_unless_overridden(tmp_path: Path, key: str) -> None:
    folder = make_tiny_checkpoint(tmp_path, **SMALL)
    assert load_checkpoint(folder)[1].dtype == torch.float32  # the config names none
    edit_config(folder, **{key: "bfloat16"})
    config, model = load_checkpoint(folder)
    assert (config.dtype, model.dtype) == ("bfloat16", torch.bfloat16)
    assert load_checkpoint(folder, dtype=torch.float16)[1].dtype == torch.float16


def test_eos_ids_merge_config_and_generation_config(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, **SMALL)
    edit_config(folder, eos_token_id=[257, 5])
    assert load_checkpoint(folder)[0].eos_token_ids == (257, 5)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 5, 257, 4]}))
    assert load_checkpoint(folder)[0].eos_token_ids == (257, 5, 9, 4)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 6}))
    assert load_checkpoint(folder)[0].eos_token_ids == (257, 5, 6)


def test_fingerprint_is_stable_and_tracks_weights_and_dtype(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path / "a", **SMALL)
    first = load_checkpoint(folder)[1].fingerprint()
    assert load_checkpoint(folder)[1].fingerprint() == first
    assert load_checkpoint(folder, dtype=torch.float64)[1].fingerprint() != first
    other_seed = make_tiny_checkpoint(tmp_path / "b", seed=1, **SMALL)
    assert load_checkpoint(other_seed)[1].fingerprint() != first
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][0] += 1
    save_file(tensors, folder / "model.safetensors")
    assert load_checkpoint(folder)[1].fingerprint() != first


def test_tiny_checkpoint_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    a = stored_tensors(make_tiny_checkpoint(tmp_path / "a", seed=5, **SMALL))
    b = stored_tensors(make_tiny_checkpoint(tmp_path / "b", seed=5, **SMALL))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("seed", [0, 1])
def test_default_tiny_model_does_not_degenerate(tmp_path: Path, seed: int) -> None:
    _, model = load_checkpoint(make_tiny_checkpoint(tmp_path, seed=seed))
    cache = KVCacheGeometry.for_model(model.config, num_blocks=8).allocate()
    table, ids = list(range(8)), ByteTokenizer().encode("The quick brown fox")
    logits, tokens = model.forward_step(cache, [SequenceStep(table, 0, ids)])[0], []
    for pos in range(len(ids), len(ids) + 48):
        tokens.append(int(logits.argmax()))
        logits = model.forward_step(cache, [SequenceStep(table, pos, tokens[-1:])])[0]
    longest_run = max(len(list(run)) for _, run in itertools.groupby(tokens))
    assert len(set(tokens[:16])) >= 8
    assert len(set(tokens)) >= 20
    assert longest_run <= 4


def test_cli_writes_a_loadable_sharded_qwen2_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    subprocess.run(
        [sys.executable, "-m", "tools.make_tiny_checkpoint", str(out), "--arch", "qwen2",
         "--shards", "2", "--layers", "1", "--hidden", "64", "--heads", "4"],
        check=True,
        cwd=REPO,
        capture_output=True,
    )  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    config, _ = load_checkpoint(out)
    assert (config.model_type, config.num_hidden_layers, config.attention_bias) == (
        "qwen2",
        1,
        True,
    )


# -- errors -----------------------------------------------------------------------------------


def test_missing_config_is_named(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, **SMALL)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(folder)


def test_missing_weights_are_reported(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, **SMALL)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_checkpoint(folder)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, shards=2, **SMALL)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        load_checkpoint(folder)


def rewrite(folder: Path, edit: dict[str, torch.Tensor | None]) -> None:
    tensors = load_file(folder / "model.safetensors")
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, **SMALL)
    rewrite(folder, {"model.layers.1.mlp.up_proj.weight": None})
    with pytest.raises(CheckpointError, match=r"lacks.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(folder)


def test_extra_tensor_is_named(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, **SMALL)
    rewrite(folder, {"model.layers.2.input_layernorm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.input_layernorm\.weight"):
        load_checkpoint(folder)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, **SMALL)
    rewrite(folder, {"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\(64, 64\).*\(32, 64\)"):
        load_checkpoint(folder)


def test_tensor_in_two_shards_is_rejected(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, shards=2, **SMALL)
    first = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(first)
    tensors["model.norm.weight"] = torch.ones(64)  # already in shard 2
    save_file(tensors, first)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*more than one file"):
        load_checkpoint(folder)
