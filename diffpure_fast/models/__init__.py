"""Score networks and the one interface the engine calls (``ScoreModel.eps``); the classifiers (``classifiers``)."""

from .adm import UNetModel, create_adm_model
from .auxiliary import AuxiliaryCNN, auxiliary_outputs, load_auxiliary
from .base import TIME_INPUTS, EpsModel, ScoreModel, as_score_model
from .classifiers import load_classifier
from .fast import FastScoreModel, fast_score_model, inductor_cache_dir
from .loading import build_network, load_score_model
from .ncsnpp import NCSNpp

__all__ = ["TIME_INPUTS", "AuxiliaryCNN", "EpsModel", "FastScoreModel", "NCSNpp", "ScoreModel", "UNetModel",
           "as_score_model", "auxiliary_outputs", "build_network", "create_adm_model", "fast_score_model",
           "inductor_cache_dir", "load_auxiliary", "load_classifier",
           "load_score_model"]
