"""``webhook``: POST each decision as JSON to a URL.

The body is the decision as oomkit logs it (its ranking cut to ``max_ranking`` entries),
``Content-Type: application/json``.  A request that fails to connect, times out
(``timeout_s``) or gets a 5xx or 429 answer is retried up to ``retries`` times, waiting
``retry_backoff_s``, then twice that, and so on; any other 4xx is final (the request itself
is wrong).  Requests use the standard library (``urllib``), honour the usual proxy variables
and verify TLS certificates.

Off with an empty ``url`` (the default).  Runs off the kill path, in worker threads
(``concurrency``), like every notifier that reaches outside the process.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from oomkit import Config, Decision, __version__, hookimpl

from ._notifier import NotifierSettings, Worker, brief_json

__all__ = ["Webhook", "WebhookSettings"]

log = logging.getLogger("oomkit.plugins.webhook")


class WebhookSettings(NotifierSettings, frozen=True):
    """``[plugins.webhook]``."""

    url: str = ""
    """Where decisions are POSTed (``http://`` or ``https://``); empty: the notifier is off."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Extra request headers (an ``Authorization`` token, say)."""
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 3
    """Further attempts after a failed one (connection refused, timeout, 5xx, 429)."""
    retry_backoff_s: Annotated[float, msgspec.Meta(ge=0.0, le=60.0)] = 1.0
    """Wait before the first retry; each further retry waits twice as long."""

    def __post_init__(self) -> None:
        if self.url:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"`url` must be an http:// or https:// URL, got {self.url!r}")
        if len(self.headers) > 32:
            raise ValueError("`headers` takes at most 32 headers")
        for key, value in self.headers.items():
            if not key or any(c in key + value for c in "\r\n\0") or ":" in key:
                raise ValueError(f"`headers`: {key!r} is not a valid header")


class _Final(Exception):
    """An answer that retrying cannot change."""


class Webhook:
    """POSTs every decision whose outcome is in ``outcomes`` to ``url``."""

    name = "webhook"

    def __init__(self) -> None:
        self.settings = WebhookSettings()
        self.worker = Worker(self.name, log)

    @hookimpl
    def oomkit_configure(self, config: Config) -> None:
        self.settings = config.plugin_settings(self.name, WebhookSettings)
        self.worker.configure(self.settings)

    @hookimpl
    async def oomkit_notify(self, decision: Decision) -> None:
        s = self.settings
        if not s.url or decision.outcome not in s.outcomes:
            return
        body = brief_json(decision, s.max_ranking)
        self.worker.submit(lambda: self._post(body))

    def _post(self, body: bytes) -> None:
        s = self.settings
        headers = {"Content-Type": "application/json", "User-Agent": f"oomkit/{__version__}", **s.headers}
        wait = s.retry_backoff_s
        for attempt in range(s.retries + 1):
            try:
                self._once(body, headers)
                return
            except _Final as exc:
                raise RuntimeError(f"POST {s.url}: {exc}") from None
            except Exception as exc:
                if attempt == s.retries:
                    raise RuntimeError(f"POST {s.url}: {exc} (after {attempt + 1} attempts)") from None
            time.sleep(wait)
            wait *= 2

    def _once(self, body: bytes, headers: dict[str, str]) -> None:
        # Imported here: urllib.request (http.client, email) adds 5 MiB to a daemon that
        # has no webhook configured.
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.settings.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as answer:
                answer.read(65536)  # let the server finish; what it says is not ours to keep
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code >= 500 or exc.code == 429:
                raise RuntimeError(f"HTTP {exc.code} {exc.reason}") from None
            raise _Final(f"HTTP {exc.code} {exc.reason}") from None
