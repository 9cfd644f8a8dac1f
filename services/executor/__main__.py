"""Runs the executor: `python -m services.executor --num-gpu-blocks 512 --port 50052`.

Every flag also reads an environment variable, FASTSWITCH_EXECUTOR_<FLAG> (e.g.
FASTSWITCH_EXECUTOR_NUM_GPU_BLOCKS), so containers configure it without a command line.
Without --checkpoint it serves the tiny random Llama (services/executor/model/tiny_checkpoint.py),
generated once into $FASTSWITCH_CACHE/tiny-llama-2 (default ~/.cache/fastswitch).
Steps take the fast path unless --batch-invariant (FASTSWITCH_EXECUTOR_BATCH_INVARIANT=1)
asks for bit-identical results whatever the batch, as bit-exact preemption tests need.
With --backend cupy and Triton attention, decode-only steps replay CUDA graphs unless
--no-cuda-graphs (FASTSWITCH_EXECUTOR_CUDA_GRAPHS=0); the CPU backend ignores the flag.
On the CPU backend it computes on every core but one unless --threads says otherwise.

It serves only the scheduler: it listens on 127.0.0.1 unless --listen says otherwise, and
with an internal token (FASTSWITCH_INTERNAL_TOKEN or FASTSWITCH_INTERNAL_TOKEN_FILE, shared
by every service) refuses calls that do not carry it. A non-loopback --listen without a
token is refused at start unless --insecure (FASTSWITCH_INSECURE=1).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import torch
import uvloop

from common.auth import check_bind, env_flag, internal_token, token_interceptors
from common.grpc_serving import mark_serving, new_server, wait_for_stop_signal
from common.metrics import add_metrics_token_flags, metrics_token, serve_metrics
from common.tls import ServerTls, add_server_flags, listen, server_tls
from services.executor.engine import BackendUnavailable, ExecutorEngine, PreconditionFailed
from services.executor.metrics import ExecutorMetrics
from services.executor.model.decoder import ATTENTION_BACKENDS, ROWS_PER_TILE
from services.executor.model.layers import PACKED_FROM_ROWS, PACKED_HEIGHTS
from services.executor.model.tiny_checkpoint import tiny_checkpoint
from services.executor.options import AUTO_DTYPE, BACKENDS, DTYPE_NAMES
from services.executor.service import SERVICE_NAME, ExecutorService, add_to_server

log = logging.getLogger("services.executor")

ENV_PREFIX = "FASTSWITCH_EXECUTOR_"
DTYPES: dict[str, torch.dtype | None] = {
    AUTO_DTYPE: None, **{name: getattr(torch, name) for name in DTYPE_NAMES}}
SHUTDOWN_GRACE_S = 5.0
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.executor", description=__doc__)

    def env(flag: str, default: str | None) -> str | None:
        return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)

    parser.add_argument("--checkpoint", type=Path, default=env("checkpoint", None) or None,
                        help="HF-format folder; default: the tiny checkpoint in the cache")
    parser.add_argument("--num-gpu-blocks", type=int, default=int(env("num-gpu-blocks", "512")))
    parser.add_argument("--block-size", type=int, default=int(env("block-size", "16")))
    parser.add_argument("--backend", choices=BACKENDS, default=env("backend", "cpu"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=env("dtype", AUTO_DTYPE),
                        help="of weights and KV cache; auto: the checkpoint's (float32 if none)")
    parser.add_argument("--host-arena", default=env("host-arena", None),
                        help="name of the kvstore's shared-memory arena to attach at start")
    parser.add_argument("--listen", default=env("listen", "127.0.0.1"),
                        help="bind address; beyond loopback it needs an internal token or "
                             "--insecure")
    parser.add_argument("--port", type=int, default=int(env("port", "50052")),
                        help="0 picks a free port; the chosen one is printed on stdout")
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction,
                        default=env("batch-invariant", None) or "false",
                        help="bit-identical steps whatever the batch, at a cost in speed "
                             "(default: the fast path)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                        default=env("cuda-graphs", None) or "true",
                        help="replay decode-only steps as CUDA graphs (--backend cupy only; "
                             "default: on)")
    parser.add_argument("--threads", type=int, default=int(env("threads", "0")),
                        help="torch's intra-op threads; 0: on the cpu backend every core but "
                             "one, which the scheduler and the KV store need between steps; "
                             "on cupy torch's default")
    parser.add_argument("--packed-heights", type=packed_heights,
                        default=env("packed-heights", ",".join(map(str, PACKED_HEIGHTS))),
                        help="on the cpu backend in float32, the row counts (ascending, "
                             "comma-separated, each at least "
                             f"{PACKED_FROM_ROWS}) that projections pad to and keep a copy of "
                             "their weight packed for, each the weights' bytes again; 'none': "
                             "no copies (the batch-invariant mode uses only "
                             f"{ROWS_PER_TILE})")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default=env("attention", "auto"),
                        help="paged attention: auto (triton on CUDA, torch on CPU), torch, "
                             "or triton")
    parser.add_argument("--metrics-port", type=int, default=int(env("metrics-port", "0")),
                        help="port of the Prometheus /metrics endpoint (0: off)")
    parser.add_argument("--internal-token",
                        default=os.environ.get("FASTSWITCH_INTERNAL_TOKEN", ""),
                        help="refuse calls without 'authorization: Bearer <token>' "
                             "[env FASTSWITCH_INTERNAL_TOKEN]")
    parser.add_argument("--internal-token-file",
                        default=os.environ.get("FASTSWITCH_INTERNAL_TOKEN_FILE", ""),
                        help="file holding the token, created with a random one if absent "
                             "[env FASTSWITCH_INTERNAL_TOKEN_FILE]")
    parser.add_argument("--insecure", action="store_true",
                        default=env_flag(os.environ, "FASTSWITCH_INSECURE"),
                        help="serve a non-loopback --listen without a token "
                             "[env FASTSWITCH_INSECURE=1]")
    add_server_flags(parser, os.environ)
    add_metrics_token_flags(parser, os.environ)
    args = parser.parse_args(argv)
    for flag in ("batch_invariant", "cuda_graphs"):
        value = getattr(args, flag)
        if isinstance(value, str):  # the env default, not the flag
            if value.lower() not in BOOLEANS:
                parser.error(f"{ENV_PREFIX}{flag.upper()}={value!r} is not one of "
                             f"{sorted(BOOLEANS)}")
            setattr(args, flag, BOOLEANS[value.lower()])
    for flag, allowed in (("backend", BACKENDS), ("dtype", DTYPES),
                          ("attention", ATTENTION_BACKENDS)):
        value = getattr(args, flag)
        if value not in allowed:  # argparse checks choices of flags, not of env defaults
            parser.error(f"{ENV_PREFIX}{flag.upper()}={value!r} is not one of {sorted(allowed)}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    return args


def packed_heights(text: str) -> tuple[int, ...]:
    """`--packed-heights`: 'none' (or nothing), or ascending row counts of at least
    `PACKED_FROM_ROWS`."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        heights = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None
    if heights[0] < PACKED_FROM_ROWS or list(heights) != sorted(set(heights)):
        raise argparse.ArgumentTypeError(
            f"heights must ascend, each at least {PACKED_FROM_ROWS}: {text!r}")
    return heights


def cpu_threads() -> int:
    """Every core this process may use but one, at least one: the scheduler and the KV store
    keep a core, and OpenMP's workers, spinning after each parallel region, do not steal it.
    Which is faster depends on the model. On 2 cores, with lookahead and steps computed on
    one thread (`ExecutorService(step_threads=...)`): SmolLM2 in the fast mode ran 21.8
    tokens/s at batch 1 and 87 with 8 requests at once on 2 threads, against 13.8 and 63.5 on
    1; the tiny model in the batch-invariant mode (`benchmarks.stack`, fastswitch and
    vllm-v1, 8 clients) ran 46-51 tokens/s either way. `--threads` picks per deployment."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


async def serve(args: argparse.Namespace, engine: ExecutorEngine, token: str = "",
                tls: ServerTls | None = None) -> None:
    metrics = ExecutorMetrics()
    metrics.watch(engine)
    completions = engine.subscribe()
    recording = asyncio.create_task(metrics.record_swaps(completions))
    server = new_server([metrics.rpc_errors, *token_interceptors(token)])
    service = ExecutorService(engine, metrics, step_threads=args.threads,
                              packed_heights=args.packed_heights)
    health = add_to_server(service, server)
    serve_metrics(args.metrics_port, args.listen, metrics.registry,
                  metrics_token(args.metrics_token, args.metrics_token_file))
    port = listen(server, f"{args.listen}:{args.port}", tls)
    await server.start()
    await mark_serving(health, SERVICE_NAME)
    print(f"executor listening on {args.listen}:{port}", flush=True)
    await wait_for_stop_signal()
    log.info("shutting down")
    await health.enter_graceful_shutdown()
    service.end_streams()
    await server.stop(SHUTDOWN_GRACE_S)
    service.close()
    completions.close()
    await recording


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = internal_token(args.internal_token, args.internal_token_file)
    tls = server_tls(args)
    check_bind(args.listen, service="executor", credentials=bool(token) or tls.mutual,
               insecure=args.insecure,
               what="an internal token (FASTSWITCH_INTERNAL_TOKEN or "
                    "FASTSWITCH_INTERNAL_TOKEN_FILE) or mutual TLS")
    checkpoint = args.checkpoint or tiny_checkpoint()
    args.threads = args.threads or (cpu_threads() if args.backend == "cpu" else 0)
    if args.threads:  # the model loads on one; steps run on `threads` (ExecutorService)
        torch.set_num_threads(1)
    try:
        engine = ExecutorEngine.load(
            checkpoint,
            num_gpu_blocks=args.num_gpu_blocks,
            block_size=args.block_size,
            backend=args.backend,
            dtype=DTYPES[args.dtype],
            batch_invariant=args.batch_invariant,
            attention=args.attention,
            cuda_graphs=args.cuda_graphs,
        )
    except BackendUnavailable as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        if args.host_arena:
            try:
                engine.attach_host_arena(args.host_arena)
            except (OSError, ValueError, PreconditionFailed) as exc:  # ValueError: InvalidInput
                raise SystemExit(f"error: --host-arena {args.host_arena}: {exc}") from None
        log.info("serving %s (%s, %d device blocks, %s, %s attention%s, fingerprint %s)",
                 checkpoint, args.backend, args.num_gpu_blocks,
                 "batch-invariant" if args.batch_invariant else "fast path",
                 engine.model.attention_backend().name,
                 ", CUDA graphs" if engine.cuda_graphs else "", engine.fingerprint[:16])
        uvloop.run(serve(args, engine, token, tls))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
