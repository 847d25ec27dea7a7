"""Periodic self-evaluation of the agent: retention, locality and fluency every N applied facts, stored as
eval_points of one "agent" eval run (evaluator.py), and the curves drawn from them (report.py)."""
from agent.selfeval.evaluator import SelfEvalConfig, SelfEvaluator

__all__ = ["SelfEvalConfig", "SelfEvaluator"]
