"""The network as every download sees it (backbones, dataset archives): how long to wait, whether downloads are
off, whether a server can be reached at all, and a failure in words.

A machine without internet fails at once: a name that does not resolve or a connection refused raises here, before
any retry loop; a server that answers but is slow or flaky is left to the downloader's own retries.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request

OFFLINE_ENV = "CMA_JAX_OFFLINE"
TIMEOUT_S = 15  # connect and per-read: a machine without internet fails fast, a stalled download resumes


class DownloadError(OSError):
    """A download that failed or did not verify; nothing of it is trusted by a later run."""


def offline() -> str | None:
    """The environment variable that turns downloads off, if one is set."""
    for var in (OFFLINE_ENV, "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def reason(e: BaseException) -> str:
    """What went wrong, in a few words (`HTTP 404 Not Found`, `[Errno 111] Connection refused`, ...)."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def check_reachable(url: str) -> None:
    """Raises DownloadError (the reason in words) when `url`'s server, or the proxy the environment names for
    it, cannot be reached at all: its host name does not resolve, or a connection is refused or times out
    (TIMEOUT_S). Nothing is sent; URLs other than http(s) pass."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = via.hostname or host, via.port or 80
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_S).close()
    except socket.gaierror as e:
        raise DownloadError(f"the host name {host} does not resolve ({e.strerror}; no network?)") from None
    except TimeoutError:
        raise DownloadError(f"no answer from {host}:{port} in {TIMEOUT_S} s") from None
    except OSError as e:
        raise DownloadError(f"cannot connect to {host}:{port} ({e.strerror or reason(e)})") from None
