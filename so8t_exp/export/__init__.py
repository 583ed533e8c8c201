"""The result of a run, in forms that load elsewhere.

``final``: what every finished run leaves in ``<session>/final_model`` (trainable weights,
tokenizer, config, alpha). ``locate``: find a run's weights and config from a run id or a
session folder. ``merge``: rebuild the trained model and turn it into a plain Hugging Face
model (LoRA merged, SO8T rotations folded into ``o_proj``) with the safety head beside it.
``python -m so8t_exp.export`` (``__main__``) writes that folder and can log and register it
as an MLflow model.
"""

from so8t_exp.export.final import export_final

__all__ = ["export_final"]
