"""SiloTune: cross-silo federated PEFT fine-tuning of LLMs on Flower (shared code of both roles)."""

__version__ = "0.1.0"
