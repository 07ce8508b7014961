"""Evaluation: simulate LR, run models and baselines, score, write tables and figures.

Modules: ``simulate`` (HR -> LR at a scale), ``runners`` (tricubic, baseline CNNs,
ArSSR as ``runner(lr, hr_shape)``), ``protocol`` (the loops and the metrics),
``tables`` (Markdown + CSV), ``figures`` (PNG), ``cli`` (``eval/evaluate.py``).
"""

from arssr_jax.evaluation.protocol import (
    METRICS, NO_REFERENCE, PAPER_SCALES, Results, evaluate_real, evaluate_simulated,
)
from arssr_jax.evaluation.simulate import lr_shape_for, simulate, simulate_lr

__all__ = ["METRICS", "NO_REFERENCE", "PAPER_SCALES", "Results", "evaluate_real", "evaluate_simulated",
           "lr_shape_for", "simulate", "simulate_lr"]
