"""Consolidation: global facts move from the gist pool into verified ICE weight edits."""
from agent.consolidate.consolidate import CONSOLIDATED, ConsolidationResult, Consolidator, weights_check

__all__ = ["CONSOLIDATED", "ConsolidationResult", "Consolidator", "weights_check"]
