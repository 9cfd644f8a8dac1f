"""Random-weight decoders of a real model's shape, built in place on their device.

No checkpoint is read or written, and no full-size float32 copy is ever made on the host:
the model is constructed under `torch.device(device)` with the target dtype as the default,
then every weight is redrawn in place from a generator on that device. Weights are drawn at
`1 / sqrt(fan_in)` (embeddings at 1, norms left at 1), so activations stay near unit scale
in every layer and logits stay finite in bfloat16.

The same seed on the same device gives the same weights; across devices the draws differ,
so compare devices by moving one model (`.to(...)`), not by building two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from services.executor.model.config import ModelConfig
from services.executor.model.decoder import DecoderModel


def llama_config(
    *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
    heads: int, kv_heads: int, rope_theta: float, max_position_embeddings: int,
    **hf: object,
) -> ModelConfig:
    """A Llama `config.json` of this shape, untied, RMS norm eps 1e-5; `hf`: other keys."""
    return ModelConfig.from_hf({
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False,
        **hf,
    })


def llama3_8b_config(num_layers: int = 32, max_position_embeddings: int = 8192) -> ModelConfig:
    """Meta-Llama-3-8B's `config.json`, with `num_layers` of its 32 layers."""
    return llama_config(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=num_layers,
        heads=32, kv_heads=8, rope_theta=500000.0,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
    )


def toy_config(num_layers: int = 2, max_position_embeddings: int = 512) -> ModelConfig:
    """A LLaMA-shaped decoder small enough for CPU dry runs (grouped-query heads included)."""
    return llama_config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=num_layers,
        heads=4, kv_heads=2, rope_theta=10000.0, max_position_embeddings=max_position_embeddings,
    )


CUDA = torch.device("cuda", 0)  # an index, not "cuda": fake CUDA tensors need one
# `--model` of the benchmarks that build random decoders: name -> config(num_layers, ...).
MODELS: dict[str, Callable[..., ModelConfig]] = {"llama3-8b": llama3_8b_config, "toy": toy_config}


def random_decoder(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    seed: int = 0,
    batch_invariant: bool = False,
) -> DecoderModel:
    """A `DecoderModel` of `config` with random weights in `dtype` on `device`, in the fast
    or the batch-invariant mode."""
    with torch.device(device), _default_dtype(dtype):
        model = DecoderModel(config, dtype, batch_invariant=batch_invariant)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():  # a tied lm_head is listed once
        if name.endswith("norm.weight"):
            continue  # RMSNorm starts at ones
        if name.endswith("bias"):
            param.zero_()
        else:
            std = 1.0 if name.endswith("embed_tokens.weight") else param.shape[1] ** -0.5
            param.normal_(0.0, std, generator=generator)
    return model


def fake_cuda_decoder(
    config: ModelConfig, dtype: torch.dtype, *, batch_invariant: bool = False
) -> tuple[FakeTensorMode, DecoderModel]:
    """A weightless `DecoderModel` of `config` on fake CUDA tensors, and the mode that holds
    them: use the model only inside that mode. Runs on a CPU-only build; its steps run
    what they would run on a GPU (the CUDA attention backend included), computing nothing."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with torch.device("meta"):
        model = DecoderModel(config, dtype, batch_invariant=batch_invariant)
    with mode:
        return mode, model.to_empty(device=CUDA)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
