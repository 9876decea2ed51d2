"""`aha serve` arguments and entry point; FastAPI and uvicorn are imported only when it runs (extra `aha[serve]`)."""

from aha.infra.errors import AhaError


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible chat API (thinking in reasoning_content)",
                              description="Serve a trained model with an OpenAI-compatible /v1/chat/completions API; "
                                          "the thinking comes back in reasoning_content, like DeepSeek's API.")
    p.add_argument("model", metavar="RUN_OR_MODEL_DIR", help="a run folder (with model/) or a transformers model dir")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $AHA_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--device", help="cpu, cuda or mps (default: detected)")
    p.add_argument("--tools", help="run the model's tool calls server-side: python (sandboxed), py:module:function or "
                                   "env:module:Class (default: none)")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args, console) -> None:
    import os
    try:
        import uvicorn

        from aha.serve.server import create_app
    except ImportError:
        raise AhaError("aha serve needs fastapi and uvicorn: pip install 'aha[serve]'") from None
    from aha.serve.live_tools import tool_runner
    api_key = args.api_key or os.environ.get("AHA_API_KEY") or None
    runner = tool_runner(args.model, args.tools) if args.tools else None
    trained = None if args.tools else tool_runner(args.model)
    app = create_app(args.model, api_key=api_key, device=args.device, max_batch=args.max_batch,
                     max_tokens_cap=args.max_tokens_cap, tools=runner)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]warning: serving on {args.host} without an API key: anyone who can reach it can use it[/]"
        )
    from rich.markup import escape

    from aha.serve.chat import model_summary
    if trained:
        console.print(f"[yellow]note: this run trained with tools={escape(trained.toolbox.spec)}; its calls go "
                      f"unanswered unless you serve it with --tools {escape(trained.toolbox.spec)}[/]")
    elif runner:
        console.print(f"tools: {escape(runner.toolbox.spec)} runs server-side ({runner.call_format} format, "
                      f"up to {runner.max_turns} calls an answer)")
    console.print(
        f"serving {app.state.model_id!r}{escape(model_summary(args.model))} at http://{args.host}:{args.port}/v1 "
        f"(API key {'required' if api_key else 'off'}); Ctrl-C stops"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
