"""`engram serve`: an OpenAI-compatible HTTP server over agent.chat.ChatEngine."""
from agent.server.app import ServerLimits, create_app, set_engine

__all__ = ["ServerLimits", "create_app", "set_engine"]
