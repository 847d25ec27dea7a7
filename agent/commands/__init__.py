"""The subcommands of `engram`, by name: (handler, configure-parser, help)."""
from agent.commands import bench, chat, compact, consolidate, demo, editing, evaluate, facts, mcp, model, report, route, run, serve

REGISTRY = {**facts.COMMANDS, **model.COMMANDS, **editing.COMMANDS, **evaluate.COMMANDS, **bench.COMMANDS,
            **demo.COMMANDS, **route.COMMANDS, **run.COMMANDS, **report.COMMANDS,
            **consolidate.COMMANDS, **compact.COMMANDS, **serve.COMMANDS, **chat.COMMANDS, **mcp.COMMANDS}
