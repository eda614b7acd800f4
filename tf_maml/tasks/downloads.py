"""A quick reachability check before TensorFlow Datasets downloads.

Without network, TFDS' downloader retries every file for about four minutes
before it fails. Checking the download servers first turns that wait into an
immediate, one-line error that says what to pass instead.
"""

import socket
import urllib.parse
import urllib.request

# TFDS first looks for a prepared copy of the dataset on its Cloud Storage bucket.
TFDS_MIRROR_HOST = "storage.googleapis.com"


def host_unreachable(host, port=443, timeout=5.0):
    """Why `host` cannot be reached over TCP, or None when it can (or a proxy is set).

    With a proxy (the environment's, or the system's on macOS and Windows) a
    direct connection says nothing about the download, so nothing is checked.

    Args:
        host: the server's name.
        port: its port.
        timeout: seconds to wait for the connection.

    Returns:
        A short reason (`str`), or None.
    """
    if any(scheme != "no" for scheme in urllib.request.getproxies()):  # "no": no_proxy
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
        ValueError: TFDS' Cloud Storage mirror cannot be reached, and neither
            can a server of the builder's download URLs.
    """
    hosts = sorted({(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))
                    for parsed in map(urllib.parse.urlparse, getattr(builder, "url_infos", None)
                                      or {})
                    if parsed.hostname and parsed.scheme in ("http", "https")})
    if not hosts:
        return  # nothing known to check (a manual download, say): TFDS reports
    reasons = {}

    def unreachable(host, port):
        if (host, port) not in reasons:
            reasons[host, port] = host_unreachable(host, port)
        return reasons[host, port]

    if not unreachable(TFDS_MIRROR_HOST, 443):
        return  # TFDS may find the dataset there; otherwise its own download reports
    for host, port in hosts:
        reason = unreachable(host, port)
        if reason:
            raise ValueError(
                f"TFDS {builder.name} is not prepared in {builder.data_dir} and {host}, where "
                f"TFDS downloads it from, cannot be reached ({reason}). {instead}")
