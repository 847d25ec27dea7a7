"""Chat over the model Engram keeps editing: the engine behind `engram serve` (and later `engram chat`)."""
from agent.chat.engine import (ROUTES, Answer, ChatEngine, ChatStream, EngineConfig, Event, SamplingParams,
                               UnknownModelError)
from agent.chat.prompts import ChatInputError, Prepared

__all__ = ["ROUTES", "Answer", "ChatEngine", "ChatInputError", "ChatStream", "EngineConfig", "Event", "Prepared",
           "SamplingParams", "UnknownModelError"]
