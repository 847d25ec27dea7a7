"""The agent loop of `engram run`: sources, durable stages, the loop itself, and its view."""
