"""Where things live: the config tree, bundled assets, the project root, store URIs.

Nothing here depends on the current working directory, so a boot task started from
``C:\\Windows\\System32`` finds the same files as a user in the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def config_dir() -> Path:
    """The Hydra config tree: ``so8t_exp/conf`` in a wheel, ``<checkout>/conf`` otherwise."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"Hydra config tree not found next to {PACKAGE_DIR}")


def project_root() -> Path:
    """Home of ``mlruns/`` and ``outputs/``.

    ``SO8T_EXP_HOME`` wins; then the checkout this package runs from (editable install);
    then ``~/.so8t_exp`` for a wheel installed into site-packages.
    """
    env = os.environ.get("SO8T_EXP_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if (PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return PACKAGE_DIR.parent
    return Path.home() / ".so8t_exp"


def asset_path(relative: str) -> Path:
    """A file bundled in ``so8t_exp/assets``."""
    return ASSETS_DIR / relative


def sqlite_uri(db_path: Path) -> str:
    """An absolute SQLAlchemy sqlite URI: ``sqlite:////abs/db`` (POSIX), ``sqlite:///C:/db``."""
    return "sqlite:///" + db_path.resolve().as_posix()


def default_tracking_uri() -> str:
    return sqlite_uri(project_root() / "mlruns" / "mlflow.db")


def _register_resolvers() -> None:
    # Resolvers used by conf/*.yaml; registered at import so the compose API and
    # @hydra.main both see them.
    resolvers = {
        "so8t_root": lambda: project_root().as_posix(),
        "so8t_asset": lambda rel: asset_path(rel).as_posix(),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register_resolvers()


def storage_url(storage: str | None) -> str:
    """An Optuna sweep's storage: ``storage`` as given, or sqlite beside the default MLflow
    store (absolute, posix slashes: the same URL works on Windows)."""
    return storage or sqlite_uri(project_root() / "mlruns" / "optuna.db")
