"""diffpure_fast: diffusion-based adversarial purification (DiffPure) with fused kernels and exact gradients.

    import diffpure_fast as dpf
    model = dpf.load_score_model("score_sde", "checkpoint_8.pth")
    x_pur = dpf.purify(x, model, t_star=0.1)            # x: (B, C, H, W) in [0, 1]

Importing compiles nothing: the C++/CUDA extension and Triton are used when present, the torch reference otherwise
(``dpf.info()`` says which).
"""

__version__ = "0.1.0"

from .bench import count_network_calls
from .engine import GRAD_MODES, Purifier, PurifyConfig, purify
from .eval.certify import CertifyConfig, certify
from .eval.defenses import build_defense
from .eval.harness import EvalConfig, evaluate
from .info import info
from .models import (
    EpsModel,
    FastScoreModel,
    ScoreModel,
    fast_score_model,
    load_auxiliary,
    load_classifier,
    load_score_model,
)
from .schedule import DIFFPURE_SCHEDULE, VPSchedule

__all__ = ["DIFFPURE_SCHEDULE", "GRAD_MODES", "CertifyConfig", "EpsModel", "EvalConfig", "FastScoreModel", "Purifier",
           "PurifyConfig", "ScoreModel", "VPSchedule", "__version__", "build_defense", "certify", "count_network_calls",
           "evaluate", "fast_score_model", "info", "load_auxiliary", "load_classifier", "load_score_model", "purify"]
