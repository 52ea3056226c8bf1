"""Evaluation helpers: answer metrics (``metrics``), reused by data construction."""
