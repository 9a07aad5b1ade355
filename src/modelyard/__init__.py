"""modelyard: one OpenAI-compatible endpoint in front of a fleet of local llama.cpp models."""

__version__ = "0.1.0"
