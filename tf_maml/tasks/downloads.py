"""A quick reachability check before TensorFlow Datasets downloads.

Without network, TFDS' downloader retries every file for about four minutes
before it fails. Checking the download servers first turns that wait into an
immediate, one-line error that says what to pass instead.
"""

import os
import socket
import urllib.parse

_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy",
                    "ALL_PROXY")


def host_unreachable(host, port=443, timeout=10.0):
    """Why `host` cannot be reached over TCP, or None when it can (or a proxy is set).

    With a proxy in the environment a direct connection says nothing about the
    download, so nothing is checked.

    Args:
        host: the server's name.
        port: its port.
        timeout: seconds to wait for the connection.

    Returns:
        A short reason (`str`), or None.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def check_tfds_downloadable(builder, instead):
    """Raises a one-line ValueError if an unprepared TFDS dataset's servers are unreachable.

    Args:
        builder: a `tfds.core.DatasetBuilder` that is not prepared yet.
        instead: what the user can pass instead of downloading (ends the message).

    Raises:
        ValueError: a server in the builder's download URLs cannot be reached.
    """
    urls = getattr(builder, "url_infos", None) or {}
    hosts = sorted({(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
                    for parsed in map(urllib.parse.urlparse, urls)
                    if parsed.hostname and parsed.scheme in ("http", "https")})
    for host, port in hosts:
        reason = host_unreachable(host, port)
        if reason:
            raise ValueError(
                f"TFDS {builder.name} is not prepared in {builder.data_dir} and {host}, where "
                f"TFDS downloads it from, cannot be reached ({reason}). {instead}")
