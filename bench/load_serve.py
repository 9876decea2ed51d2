"""Load benchmark of `aha serve` (not a test): many concurrent streaming clients on loopback.

    python bench/load_serve.py [RUN_OR_MODEL_DIR] --clients 64 --requests 4 --max-tokens 32
    python bench/load_serve.py --url http://127.0.0.1:8000/v1 --model NAME --api-key KEY   # a running server

Without --url it starts the server itself in a subprocess on a free loopback port (so clients and
server do not share one Python GIL); without a model dir it serves a freshly built tiny random
model (hidden 64, 2 layers). Each client sends --requests streaming chat requests one after the
other, at temperature 1 with a fixed seed per request. Prints the errors (should be 0), p50/p95
latency and time to first token, and aggregate completion tokens/s, then one JSON line.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

QUESTIONS = ["What is 12 + 30?", "hi", "Add 4096 and 1024.", "Why is the sky blue?", "2+2?", "Count to five."]


def tiny_model_dir() -> str:
    from aha.infra.model import build_model
    from aha.infra.tokenizer import build_char_tokenizer
    out = Path(tempfile.mkdtemp(prefix="aha-bench-")) / "tiny"
    tokenizer = build_char_tokenizer()
    build_model("qwen2", tokenizer, seed=0, hidden=64, layers=2).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return str(out)


def start_server(model_dir: str, max_batch: int, torch_threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        f"import torch, uvicorn; from aha.serve.server import create_app; torch.set_num_threads({torch_threads} or "
        f"torch.get_num_threads()); "
        f"uvicorn.run(create_app({model_dir!r}, model_name='bench', max_batch={max_batch}), "
        f"host='127.0.0.1', port={port}, log_level='warning')"
    )
    server = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return server, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.2)
    server.terminate()
    sys.exit("the server did not answer /health within 120 s")


def client_loop(client, model: str, k: int, args, results: list, errors: list) -> None:
    for r in range(args.requests):
        start, first, tokens = time.perf_counter(), None, 0
        try:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTIONS[(k + r) % len(QUESTIONS)]}],
                stream=True, stream_options={"include_usage": True}, max_tokens=args.max_tokens,
                temperature=1.0, seed=k * 1000 + r)
            for chunk in stream:
                if first is None and chunk.choices and (chunk.choices[0].delta.content
                                                        or getattr(chunk.choices[0].delta, "reasoning_content", None)):
                    first = time.perf_counter()
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            end = time.perf_counter()
            results.append({"latency": end - start, "ttft": (first or end) - start, "tokens": tokens})
        except Exception as exc:           # counted and shown: the benchmark must report, not crash
            errors.append(f"{type(exc).__name__}: {exc}")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="run folder or model dir (default: a tiny random model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, sent one after the other")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads of the server (default: torch's choice); 1 is fastest for tiny models on a busy CPU",
    )
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--model", default="bench", help="model name (with --url)")
    parser.add_argument("--api-key", default=os.environ.get("AHA_API_KEY", "none"))
    args = parser.parse_args()
    import openai

    server = None
    url = args.url
    if url is None:
        server, url = start_server(args.model_dir or tiny_model_dir(), args.max_batch, args.torch_threads)
    results: list[dict] = []
    errors: list[str] = []
    try:
        clients = [
            openai.OpenAI(base_url=url, api_key=args.api_key, max_retries=0, timeout=600) for _ in range(args.clients)
        ]
        threads = [threading.Thread(target=client_loop, args=(c, args.model, k, args, results, errors))
                   for k, c in enumerate(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    for line in sorted(set(errors))[:5]:
        print("error:", line)
    latencies = [r["latency"] for r in results] or [0.0]
    ttfts = [r["ttft"] for r in results] or [0.0]
    tokens = sum(r["tokens"] for r in results)
    summary = {"clients": args.clients, "requests": len(results) + len(errors), "errors": len(errors),
               "wall_s": round(wall, 2), "p50_latency_s": round(percentile(latencies, 50), 3),
               "p95_latency_s": round(percentile(latencies, 95), 3), "p50_ttft_s": round(percentile(ttfts, 50), 3),
               "p95_ttft_s": round(percentile(ttfts, 95), 3), "completion_tokens": tokens,
               "tokens_per_s": round(tokens / wall, 1)}
    print(
        f"{summary['requests']} requests from {args.clients} clients in {wall:.1f} s: {len(errors)} errors; "
        f"latency p50 {summary['p50_latency_s']} s p95 {summary['p95_latency_s']} s; "
        f"first token p50 {summary['p50_ttft_s']} s p95 {summary['p95_ttft_s']} s; {summary['tokens_per_s']} tokens/s"
    )
    print(json.dumps(summary))
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
