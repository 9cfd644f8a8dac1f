"""The executor's model: a Llama/Qwen2 decoder over a paged, block-major KV cache.

Typical use by the executor service::

    config, model = load_checkpoint(path)                 # HF folder, never a hub
    geometry = KVCacheGeometry.for_model(config, num_blocks=512, block_size=16)
    cache = geometry.allocate()                           # one contiguous tensor
    logits = model.forward_step(cache, [SequenceStep(block_table, start_pos, token_ids), ...])
    inputs = SamplingInputs.build(params, output_indices, banned, config.vocab_size)
    tokens, logprobs = sample_rows(logits, inputs.to(logits.device),
                                   all_greedy=False, want_logprobs=False)  # no host sync

Guarantee: a sequence's logits (and so its tokens) are bit-identical however its prompt is
chunked, whatever shares its batch and wherever its KV blocks sit, within one process.
"""

from __future__ import annotations

from services.executor.model.batch import PackedInputs, SequenceStep, StepInputs, StepPlan
from services.executor.model.checkpoint import CheckpointError, load_checkpoint
from services.executor.model.config import ConfigError, ModelConfig
from services.executor.model.decoder import ROWS_PER_TILE, DecoderModel
from services.executor.model.kv_cache import KVCacheGeometry
from services.executor.model.sampler import (
    SamplingInputs,
    SamplingParams,
    sample_rows,
)

__all__ = [
    "ROWS_PER_TILE",
    "CheckpointError",
    "ConfigError",
    "DecoderModel",
    "KVCacheGeometry",
    "ModelConfig",
    "PackedInputs",
    "SamplingInputs",
    "SamplingParams",
    "SequenceStep",
    "StepInputs",
    "StepPlan",
    "load_checkpoint",
    "sample_rows",
]
