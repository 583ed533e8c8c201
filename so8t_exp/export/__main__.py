"""``python -m so8t_exp.export``: the Hydra entry point. It only composes and calls.

Examples::

    python -m so8t_exp.export export.source=outputs/2026-12-03/07-26-45
    python -m so8t_exp.export export.source=<run id> export.checkpoint=best \\
        export.register=so8t-borea export.metric=eval/macro_f1 export.mode=max

Exit codes: 0 done, 2 bad config or source (the message says which).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from so8t_exp.cli_errors import hydra_config_errors
from so8t_exp.config import ConfigError
from so8t_exp.export.pipeline import run_export
from so8t_exp.paths import config_dir

EXIT_BAD_INPUT = 2


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def _app(cfg: DictConfig) -> None:
    try:
        result = run_export(OmegaConf.to_object(cfg.export), cfg.tracking.uri)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(f"exported: {result.folder}")
    if result.model_uri:
        print(f"MLflow model: {result.model_uri}")
    if result.version:
        moved = "moved to it" if result.alias_moved else "not moved"
        print(f"registered: {cfg.export.register} version {result.version} (alias {moved})")


def main() -> None:
    with hydra_config_errors():  # a misspelled key: one line, exit 2
        _app()


if __name__ == "__main__":
    main()
