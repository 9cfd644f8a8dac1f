"""Writes a small random Llama/Qwen2 checkpoint in HF format, for tests and the demo.

Weights are never fetched from a hub, so everything that loads a model is exercised on
one of these, through the same loader a real checkpoint would go through.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.chat_template import TEMPLATE_FILE
from common.checkpoint_cache import build_once, default_cache
from common.tokenizer import ByteTokenizer
from services.executor.model.checkpoint import SHARD_INDEX
from services.executor.model.config import ModelConfig
from services.executor.model.decoder import DecoderModel

# Byte tokenizer ids, rounded up to a multiple of 8 as real vocabularies are.
DEFAULT_VOCAB = -(-ByteTokenizer().vocab_size // 8) * 8
# A plain chat template, so that the tiny model serves role messages as a real one does.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def tiny_checkpoint() -> Path:
    """The default model (the executor's without --checkpoint), written once into the cache."""
    return build_once(default_cache() / "tiny-llama-2", make_tiny_checkpoint)  # -2: chat template


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    arch: str = "llama",
    num_layers: int = 4,
    hidden: int = 256,
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = DEFAULT_VOCAB,
    max_positions: int = 4096,
    tie_word_embeddings: bool | None = None,
    shards: int = 1,
) -> Path:
    """Writes one into `out_dir` and returns it; Qwen2 gets tied embeddings by default, as
    its small models have."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_hf(
        {
            "model_type": arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            # Llama's 8/3 expansion, rounded to a multiple of 64.
            "intermediate_size": intermediate or -(-hidden * 8 // 3 // 64) * 64,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": max_positions,
            "tie_word_embeddings": arch == "qwen2"
            if tie_word_embeddings is None
            else tie_word_embeddings,
            "bos_token_id": ByteTokenizer.BOS,
            "eos_token_id": ByteTokenizer.EOS,
        }
    )
    model = DecoderModel(config)
    _randomize(model, seed, tied=config.tie_word_embeddings)
    tensors = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    (out / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
    (out / TEMPLATE_FILE).write_text(BYTE_CHAT_TEMPLATE)
    _save(tensors, out, shards)
    return out


def _randomize(model: DecoderModel, seed: int, *, tied: bool) -> None:
    """Unit-variance activations, and q/k at twice that: the sharper attention makes greedy
    decoding follow the context, where plain scaling soon repeats one token over and over.
    Tied embeddings are drawn at 0.1 scale: at unit scale the output head's top token is
    always the input token, and greedy decoding repeats it forever."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(0.1 * noise if tied else noise)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.copy_(2 * noise / param.shape[1] ** 0.5)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)


def _save(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = names[shard * len(names) // shards : (shard + 1) * len(names) // shards]
        save_file({name: tensors[name] for name in part}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
