"""Training on several processes (``torchrun``): who is who, what rank 0 tells the others,
and the gradient exchange. Rank 0 is the run as a single process knows it (lock, MLflow,
session folder, evaluations, checkpoint writing); the other ranks follow its commands."""

from so8t_exp.distributed.world import PeerLost, World

__all__ = ["PeerLost", "World"]
