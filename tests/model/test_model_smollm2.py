"""The real checkpoint: SmolLM2-135M-Instruct (a transformers 5 `config.json`, RoPE theta in
`rope_parameters`) decoded greedily by HF's `generate` and by our paged decoder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from services.executor.model import DecoderModel, load_checkpoint
from tests.support.hf_reference import our_greedy

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
# Float32 summation-order noise over 30 layers, relative to the logits' spread.
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder(smollm2: Path) -> Path:
    return smollm2  # never skipped: the test extra installs what builds it


@pytest.fixture(scope="module")
def hf(transformers: ModuleType, folder: Path) -> Iterator[tuple[Any, Any]]:
    """HF's model and tokenizer, loaded once."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    yield model.eval(), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ours(folder: Path) -> DecoderModel:
    return load_checkpoint(folder)[1]


def test_config_is_read_from_the_transformers_5_form(ours: DecoderModel) -> None:
    config = ours.config
    assert (config.rope_theta, config.rope_scaling.rope_type) == (100000.0, "default")
    assert (config.dtype, ours.dtype, config.eos_token_ids) == ("float32", torch.float32, (2,))


def test_greedy_tokens_and_logits_match_hf_generate(
    hf: tuple[Any, Any], ours: DecoderModel
) -> None:
    model, tokenizer = hf
    # A short system message: the template's default one would double the prefill, and our
    # CPU decoder costs about a second per prefill row over 30 layers.
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a yellow fruit."}]  # fmt: skip
    prompts = [
        tokenizer("The three primary colours are")["input_ids"],
        tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"],
    ]
    chunks = [(len(prompts[0]),), (9, len(prompts[1]) - 9)]  # the chat prompt in two steps
    actual = our_greedy(ours, prompts, chunks, decode_steps=NEW_TOKENS - 1, seed=2)
    for index, (prompt, got) in enumerate(zip(prompts, actual, strict=True)):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, len(prompt) :].tolist()  # fewer if it stopped at EOS
        assert len(tokens) > NEW_TOKENS // 2, "too short a continuation proves little"
        assert got.tokens[: len(tokens)] == tokens, f"prompt {index}: greedy tokens diverge"
        want = torch.cat(out.logits).float()
        torch.testing.assert_close(
            got.logits[len(prompt) - 1 :][: len(tokens)],
            want,
            rtol=0,
            atol=RELATIVE_TOLERANCE * want.std().item(),
            msg=lambda m, i=index: f"prompt {i}: {m}",
        )
