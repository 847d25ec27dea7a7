"""Engram in other frameworks' shapes: LangChain's chat model and retriever (agent/adapters/langchain.py)."""
from agent.adapters.langchain import ChatEngram, EngramRetriever

__all__ = ["ChatEngram", "EngramRetriever"]
