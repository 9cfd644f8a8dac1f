"""The stack against HF `generate` on the real SmolLM2-135M-Instruct checkpoint, in one run.

HF alone on the machine, then the stack (LocalStack: fast path, fastswitch mode), then HF
again (the ratios take HF's mean):
greedy decoding of `--max-tokens` tokens, at batch 1 on both and with `--concurrency`
requests at once on the stack, its executor on as many threads as HF. Prompts go to the
scheduler as HF-tokenized ids. Both sides generate exactly `--max-tokens` (HF's
`min_new_tokens`, the stack's `ignore_eos`); every rate is generated tokens over wall time,
prefill included.
`--json FILE` records the raw rates and `stack_over_hf_batch1`, `stack8_over_hf_batch1`.
Timings are real but noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.client import FastSwitchClient, Sampling
from services.executor.model.smollm2 import smollm2_checkpoint
from services.launch import LocalStack, StackConfig

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step, for a curious student.",
    "Describe a walk through a busy market in a large city on a summer morning.",
    "List the steps to bake bread at home and explain why each step matters.",
    "Tell me about the history of sailing ships and how they changed trade.",
    "Write a letter from a traveler to a friend describing the mountains.",
    "Explain how plants turn sunlight into food, with examples from a garden.",
    "Describe the life of a honeybee from egg to forager in a busy hive.",
]


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def hf_threads() -> int:
    """The intra-op threads HF `generate` runs on in this process."""
    import torch

    return torch.get_num_threads()


def hf_batch1(folder: Path, prompts: list[list[int]], max_tokens: int) -> float:
    """HF `generate`, one prompt at a time: generated tokens per second."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
        tokens, wall = 0, 0.0
        for ids in prompts:
            started = time.perf_counter()
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False)
            wall += time.perf_counter() - started
            tokens += out.shape[1] - len(ids)
            log(f"[hf] {tokens} tokens in {wall:.1f} s")
    return tokens / wall


async def stack_rate(
    client: FastSwitchClient, prompts: list[list[int]], max_tokens: int, label: str
) -> float:
    """All `prompts` at once on the stack: generated tokens per second, summed."""
    started = time.perf_counter()
    done = await asyncio.gather(*(
        client.generate(ids, client_id=f"bench-{i}", max_tokens=max_tokens,
                        sampling=Sampling(ignore_eos=True)).collect()
        for i, ids in enumerate(prompts)
    ))
    wall = time.perf_counter() - started
    tokens = sum(len(g.tokens) for g in done)
    log(f"[stack {label}] {tokens} tokens in {wall:.1f} s")
    return tokens / wall


async def stack_rates(
    folder: Path, prompts: list[list[int]], max_tokens: int, concurrency: int, log_dir: str
) -> tuple[float, float]:
    # The executor computes on as many threads as HF does here (torch's default: every
    # core), not on its own default, which leaves one core to the scheduler.
    config = StackConfig(checkpoint=str(folder), batch_invariant=False, log_dir=log_dir,
                         num_gpu_blocks=64 + concurrency * 16,
                         extra_env={"FASTSWITCH_EXECUTOR_THREADS": str(hf_threads())})
    log(f"[stack] starting (logs in {log_dir}) ...")
    with LocalStack(config) as stack:
        async with FastSwitchClient(stack.scheduler_address) as client:
            await stack_rate(client, prompts[:1], 4, "warm-up")
            batch1 = sum([await stack_rate(client, [ids], max_tokens, "batch 1")
                          for ids in prompts[:2]]) / 2
            many = await stack_rate(client, prompts[:concurrency], max_tokens, f"x{concurrency}")
    return batch1, many


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", default="", help="write the rates and ratios here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    # HF before and after the stack: the machine's speed drifts by tens of percent within
    # minutes here, and the ratios take HF's mean of the two.
    log(f"[hf] batch 1, {args.max_tokens} tokens per prompt ...")
    hf_before = hf_batch1(folder, prompts[:2], args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="fastswitch-real-") as log_dir:
        batch1, many = asyncio.run(
            stack_rates(folder, prompts, args.max_tokens, args.concurrency, log_dir)
        )
    log("[hf] again, after the stack ...")
    hf_after = hf_batch1(folder, prompts[:2], args.max_tokens)
    hf = (hf_before + hf_after) / 2
    result: dict[str, Any] = {
        "checkpoint": str(folder),
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "hf_batch1_tok_s": hf,
        "hf_batch1_tok_s_before": hf_before,
        "hf_batch1_tok_s_after": hf_after,
        "stack_batch1_tok_s": batch1,
        "stack_concurrent_tok_s": many,
        "threads": hf_threads(),
        "stack_over_hf_batch1": batch1 / hf,
        "stack8_over_hf_batch1": many / hf,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
