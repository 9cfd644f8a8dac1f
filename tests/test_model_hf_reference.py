"""Our paged decoder against HF transformers on the same tiny checkpoint.

The decoder's other tests compare it with itself (chunking, batching, placement) and with a
hand-written dense model; this one checks the architecture against the implementation real
checkpoints are published for. HF runs each sequence alone and unpadded, the plainest
reference; our side runs them together, in one block-major cache, with scattered blocks.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
import torch

from services.executor.model import DecoderModel, KVCacheGeometry, SequenceStep, load_checkpoint
from tools.make_tiny_checkpoint import make_tiny_checkpoint

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
BLOCK = 16
NUM_BLOCKS = 32
DECODE_STEPS = 64
# Prompt lengths: inside one block, across one block boundary, across two; and the chunks each
# is prefilled in, one per step, so the last sequence's prefill shares steps with the others'
# decodes.
PROMPT_CHUNKS = ((5,), (23,), (17, 9, 14))
# Float32 summation-order noise over 4 layers, relative to the logits' spread: HF and we reduce
# in different orders (its GEMMs and SDPA; our padded tiles and per-row attention, or on the
# fast path our unpadded GEMMs and per-sequence SDPA). Measured: up to 4e-5.
RELATIVE_TOLERANCE = 1e-4
# The writer draws unit-variance embeddings. Tied to the LM head, they make every position's
# argmax its own input token (e.e dwarfs the rest), so greedy decoding repeats one token and
# proves nothing; at a tenth of the scale the continuation follows the context.


@pytest.fixture(scope="module")
def transformers() -> Iterator[ModuleType]:
    """transformers, imported with the hub switched off: the checkpoint is a local folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        module = importlib.import_module("transformers")
        # huggingface_hub reads the variable at import; it may have been imported before us.
        patch.setattr(importlib.import_module("huggingface_hub.constants"), "HF_HUB_OFFLINE", True)
        yield module


@dataclass(frozen=True, slots=True)
class Greedy:
    """Greedy generation from one prompt: the logits of every position and the tokens picked."""

    logits: torch.Tensor  # [prompt + DECODE_STEPS, vocab]
    tokens: list[int]  # argmax after the prompt, then after each decode step


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> Greedy:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        rows = [out.logits[0]]
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(DECODE_STEPS):
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            rows.append(out.logits[0])
            tokens.append(int(out.logits[0, -1].argmax()))
    return Greedy(torch.cat(rows).float(), tokens)


@dataclass
class Running:
    """One sequence as the executor sees it across steps."""

    table: list[int]
    prompt: list[int]
    chunks: tuple[int, ...]
    fed: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) == DECODE_STEPS + 1

    def next_input(self) -> list[int]:
        if self.fed < len(self.prompt):
            chunk = self.chunks[len(self.rows)]
            return self.prompt[self.fed : self.fed + chunk]
        return [self.tokens[-1]]

    def take(self, fed: list[int], logits: torch.Tensor) -> None:
        self.fed += len(fed)
        self.rows.append(logits)
        if self.fed >= len(self.prompt):
            self.tokens.append(int(logits[-1].argmax()))

    def result(self) -> Greedy:
        return Greedy(torch.cat(self.rows), self.tokens)


def our_greedy(model: DecoderModel, prompts: list[list[int]], seed: int) -> list[Greedy]:
    """All prompts in one batch per step, each over blocks scattered through the cache."""
    geometry = KVCacheGeometry.for_model(model.config, num_blocks=NUM_BLOCKS, block_size=BLOCK)
    # NaN everywhere no step has written: a read of a stale slot would poison the logits.
    cache = geometry.allocate().fill_(float("nan"))
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    blocks_each = -(-(max(map(len, prompts)) + DECODE_STEPS) // BLOCK)
    running = [
        Running(order[i * blocks_each : (i + 1) * blocks_each], prompt, chunks)
        for i, (prompt, chunks) in enumerate(zip(prompts, PROMPT_CHUNKS, strict=True))
    ]
    while active := [seq for seq in running if not seq.done]:
        inputs = [seq.next_input() for seq in active]
        batch = [
            SequenceStep(seq.table, seq.fed, fed) for seq, fed in zip(active, inputs, strict=True)
        ]
        logits = model.forward_step(cache, batch, all_positions=True)
        per_sequence = logits.split([len(fed) for fed in inputs])
        for seq, fed, rows in zip(active, inputs, per_sequence, strict=True):
            seq.take(fed, rows)
    return [seq.result() for seq in running]


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize(("arch", "seed"), [("llama", 11), ("qwen2", 12)])
def test_logits_and_greedy_tokens_match_hf_transformers(
    tmp_path: Path, transformers: ModuleType, arch: str, seed: int, batch_invariant: bool
) -> None:
    folder = make_tiny_checkpoint(tmp_path, seed=seed, arch=arch)
    hf_model = getattr(transformers, HF_CLASSES[arch]).from_pretrained(
        folder, torch_dtype=torch.float32
    )
    hf_model.eval()
    config, ours = load_checkpoint(folder, batch_invariant=batch_invariant)
    assert config.tie_word_embeddings == config.attention_bias == (arch == "qwen2")
    generator = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, config.vocab_size, (sum(chunks),), generator=generator).tolist()
        for chunks in PROMPT_CHUNKS
    ]

    expected = [hf_greedy(hf_model, prompt) for prompt in prompts]
    actual = our_greedy(ours, prompts, seed)

    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        torch.testing.assert_close(
            got.logits,
            want.logits,
            rtol=0,
            atol=RELATIVE_TOLERANCE * want.logits.std().item(),
            msg=lambda m, i=index: f"sequence {i}: {m}",
        )
        assert got.tokens == want.tokens, f"sequence {index}: greedy tokens diverge"
        assert len(set(want.tokens)) > 8, "a degenerate continuation proves little"
