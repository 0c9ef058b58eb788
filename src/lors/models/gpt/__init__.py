"""A GPT language model with dense, LORS or tied layers (`build_gpt`), and its config."""
from lors.models.gpt.config import LMConfig, load_lm_config
from lors.models.gpt.model import GPT, build_gpt, embedding_parameters

__all__ = ["GPT", "LMConfig", "build_gpt", "embedding_parameters", "load_lm_config"]
