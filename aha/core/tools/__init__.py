"""Reasoning with tools: multi-turn rollouts in which the model calls Python (or your tools) mid-thought.

    aha train --model DIR tools=python max_turns=4             # the R1 format: <tool>CODE</tool>
    aha train --model DIR template=chat tools=python tool_format=chat   # an instruct model's <tool_call>
    aha eval RUN_DIR                                            # a run with tools: held-out pass@1 through the same
    loop
    aha chat RUN_DIR / aha serve RUN_DIR --tools python         # its calls run live (aha/serve/live_tools.py)

- aha/core/tools/tools.py — the tools: the sandboxed `python` tool, `py:module:function`, `env:module:Class`;
- aha/core/tools/formats.py — how calls are written and results shown (`tool_format=r1|chat`);
- aha/core/tools/interact.py — the interaction loop, an engine with `generate`'s signature: the training
  loop, dynamic sampling and `aha eval` call it exactly as they call `generate`.

- aha/serve/live_tools.py — the same loop for `aha chat` and `aha serve` (server-side tools), turns on the
  continuous-batching engine.

Not yet: `aha experiment tools` (the demo in which RL discovers that the tool pays; its task,
`multiplication`, and its corpus, `aha pretrain --task multiplication --tool-frac 0.2`, exist).

Departure from TRL and verl: a tool's output tokens stay in the completion (the policy reads them)
but are masked out of the loss, the KL and the entropy by `Rollout.action_mask`, as TRL's
`tool_mask` and verl's `response_mask` do; there is no separate loss on them.
"""

from aha.infra.errors import AhaError

CONFIG_KEYS = ("tools", "tool_format", "max_turns", "tool_timeout", "tool_output_tokens", "tool_workers")


def tool_loop(cfg):
    """The interaction loop for `cfg` (tools, tool_format, max_turns, …), or None without tools."""
    if not cfg.tools:
        return None
    from aha.core.tools.interact import ToolLoop
    from aha.core.tools.tools import get_toolbox
    return ToolLoop(get_toolbox(cfg.tools, cfg.tool_timeout), cfg.tool_format, cfg.max_turns, cfg.tool_output_tokens,
                      cfg.tool_workers)


def eval_sampler(cfg):
    """The sampler of held-out evaluation: the same tool loop as training, or `generate`."""
    from aha.core.rollout import generate
    return tool_loop(cfg) or generate


def tool_schemas(cfg) -> list[dict] | None:
    """The function schemas a chat template shows the model (tool_format=chat), else None."""
    if not cfg.tools or cfg.tool_format != "chat":
        return None
    from aha.core.tools.tools import get_toolbox
    return get_toolbox(cfg.tools, cfg.tool_timeout).schemas()


def validate(cfg) -> None:
    """The tool keys of aha/infra/config.py's Config, checked with the rest."""
    from aha.core.tools.formats import FORMATS
    if cfg.tool_format not in FORMATS:
        raise AhaError(f"config: tool_format={cfg.tool_format!r} is not one of {', '.join(FORMATS)}")
    if cfg.max_turns < 1 or cfg.tool_output_tokens < 1 or cfg.tool_workers < 1 or not cfg.tool_timeout > 0:
        raise AhaError(f"config: max_turns={cfg.max_turns}, tool_output_tokens={cfg.tool_output_tokens} and "
                       f"tool_workers={cfg.tool_workers} must be at least 1, tool_timeout={cfg.tool_timeout} above 0")
    if cfg.tools:
        from aha.core.tools.tools import get_toolbox
        toolbox = get_toolbox(cfg.tools, cfg.tool_timeout)       # imports py:/env: specs: a bad one fails here
        if cfg.tool_format == "r1" and len(toolbox.names) > 1:
            raise AhaError(f"config: tools={cfg.tools} names {len(toolbox.names)} tools, but tool_format=r1 "
                           "(<tool>CODE</tool>) has no tool names: give one tool, or use tool_format=chat")
        if cfg.rollout != "torch":
            raise AhaError(f"config: tools={cfg.tools} runs on the torch engine only: use rollout=torch")
