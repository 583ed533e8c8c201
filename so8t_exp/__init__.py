"""so8t_exp: crash-proof, Hydra-configured, MLflow-tracked fine-tuning of SO8T models."""

__version__ = "0.1.0"
