"""``python -m so8t_exp.serve``: the Hydra entry point. It only composes and calls.

Examples::

    python -m so8t_exp.serve serve.model=models:/so8t-borea@champion
    python -m so8t_exp.serve serve.model=<run id> serve.port=8080
    python -m so8t_exp.serve serve.model=outputs/2026-12-03/07-26-45/export/final-step00000300

Exit codes: SIGINT/SIGTERM (SIGBREAK, Ctrl+C on Windows) shut it down gracefully — requests
in progress finish, up to 10 s — and it ends as that signal's default would (130/143, as
uvicorn does); 2 bad config, a model that cannot be found or a port in use; 1 anything else
(the log says what).
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from so8t_exp.cli_errors import EXIT_BAD_INPUT, hydra_config_errors, report
from so8t_exp.config import ConfigError
from so8t_exp.paths import config_dir
from so8t_exp.serve.config import ServeAppConfig

ConfigStore.instance().store(name="serve_schema", node=ServeAppConfig)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="serve")
def _app(cfg: DictConfig) -> None:
    from so8t_exp.serve.server import serve  # after Hydra has checked the config

    try:
        code = serve(OmegaConf.to_object(cfg.serve), cfg.tracking.uri)
    except (ConfigError, OSError) as err:  # a bad key or model; a port in use
        code = report(err, EXIT_BAD_INPUT)
    sys.exit(code)  # Hydra drops a return value


def main() -> None:
    with hydra_config_errors():  # a misspelled key: one line, exit 2
        _app()


if __name__ == "__main__":
    main()
