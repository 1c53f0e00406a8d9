"""Fitting a memory budget: calibration steps measured by the ledger turned
into steady-state peaks, and the planner that picks the configuration with
the smallest expected accuracy price (:mod:`slimfit.evidence`) that fits.
"""

from slimfit.planning.planner import BudgetError, Plan, optimizer_like, parse_budget, plan_for_budget

__all__ = ["BudgetError", "Plan", "optimizer_like", "parse_budget", "plan_for_budget"]
