"""The subcommands of `engram`, by name: (handler, configure-parser, help)."""
from agent.commands import demo, facts, model

REGISTRY = {**facts.COMMANDS, **model.COMMANDS, **demo.COMMANDS}
