"""Score networks and the one interface the engine calls (``ScoreModel.eps``)."""

from .base import TIME_INPUTS, EpsModel, ScoreModel, as_score_model

__all__ = ["ScoreModel", "EpsModel", "TIME_INPUTS", "as_score_model"]
