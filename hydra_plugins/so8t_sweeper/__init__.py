"""so8t_exp's Optuna sweeper, as a Hydra plugin (``hydra/sweeper=so8t_optuna``)."""
