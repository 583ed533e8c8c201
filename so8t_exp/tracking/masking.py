"""Which params and command-line values are secrets: masked as ``***`` before they reach
MLflow or a log.

Narrow on purpose: a key is secret when its *last* segment is a known secret name
(``notify.notifiers.webhook.token``), not when it merely contains one
(``model.source.tokenizer_path`` is a path; ``notify.notifiers.webhook.url_env`` names an
environment variable). A value is secret when it looks like one wherever it is: a known
token prefix, a URL carrying credentials, a token in a query string, or a webhook URL
(the URL itself is the bearer secret).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
SECRET_NAMES = frozenset(
    {
        "token",
        "auth_token",
        "access_token",
        "hf_token",
        "api_key",
        "apikey",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "secret_key",
        "private_key",
        "credentials",
        "webhook_url",
    }
)
# ``webhook.url``: the webhook notifier's URL is a secret as a whole (anyone holding it posts).
_SECRET_PATH = re.compile(r"(^|\.)webhook\.url$", re.I)
_SECRET_VALUE = re.compile(
    r"^(sk-|xox[abpr]-|ghp_|github_pat_|hf_)"  # well-known token prefixes
    r"|://[^/\s@]+@"  # user[:password]@ in a URL
    r"|[?&](token|access_token|auth|key|api_?key|sig|signature|password|secret)=",  # query
    re.I,
)
# Slack (hooks.slack.com/services/...), Discord (/api/webhooks/...), generic /hooks/ paths.
_WEBHOOK_VALUE = re.compile(r"^https?://(hooks\.|[^/\s]+/(\S*/)?(hooks?|webhooks?)/)", re.I)


def is_secret(key: str, value: Any) -> bool:
    """Whether ``key=value`` must not be shown."""
    if value is None:
        return False
    name = key.rsplit(".", 1)[-1].lstrip("+~").lower()
    text = str(value)
    return (
        name in SECRET_NAMES
        or bool(_SECRET_PATH.search(key))
        or bool(_SECRET_VALUE.search(text))
        or bool(_WEBHOOK_VALUE.search(text))
    )


def mask_secrets(flat: Mapping[str, Any]) -> dict[str, str]:
    """Params safe to show: values of secret keys or secret-looking values become ``***``."""
    return {
        key: MASK if is_secret(key, value) else str(value)[:6000] for key, value in flat.items()
    }


def mask_override(arg: str) -> str:
    """A Hydra override (``key=value``) with a secret value masked; other args unchanged."""
    key, eq, value = arg.partition("=")
    return f"{key}={MASK}" if eq and is_secret(key, value) else arg
