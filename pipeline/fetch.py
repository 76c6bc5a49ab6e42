"""Guarded http(s) image fetcher: the one place a user-supplied URL makes this process connect out.

A URL from a request or a dataset is a server-side request forgery vector (cloud metadata at
169.254.169.254, admin ports on loopback, the cluster's private network), so every hop is checked:
scheme http(s) only, `fetch.allow_http` on, host in `fetch.allowed_domains` (when set), and every
address the name resolves to public unless `fetch.allowed_private_hosts` lists it. The socket then
connects to an address that was checked (never a second DNS answer: no rebinding window) while the
Host header, SNI and certificate check use the URL's name. Redirects are followed by hand, re-checking
each hop; a deadline and a byte cap apply while the body streams in. Stdlib only, and it ignores
HTTP(S)_PROXY on purpose: a proxy would connect to an address we never checked.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from .config import FetchConfig
from .errors import FetchError, LimitsError

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_TRANSIENT_STATUSES = {429, 502, 503, 504}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 64 * 1024
_HEADERS = {"User-Agent": "llava-ray-image-fetch/1", "Accept": "image/*", "Accept-Encoding": "identity"}


class _Transient(Exception):
    """A failure worth another attempt (connection refused or reset, 429/502/503/504)."""


@dataclass(frozen=True)
class Target:
    """A URL that passed the checks, with the addresses it may connect to."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one tunnels to (mapped, 6to4, NAT64), which is what gets reached."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped or ip.sixtofour:
        return ip.ipv4_mapped or ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why `ip` must not be fetched from by default, or None for a public address."""
    ip = _embedded_ipv4(ip) or ip
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata)"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        return "private"
    return None


def _private_allowed(host: str, ip: IPAddress, allowed: list[str]) -> bool:
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # not an address or network: a host name
            if host == entry.lower().rstrip("."):
                return True
    return False


def _domain_allowed(host: str, domains: list[str]) -> bool:
    return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in domains))


def _resolve(host: str, port: int) -> tuple[str, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError(f"cannot resolve host {host!r}: {e}") from None
    # sockaddr[0] of IPv6 may carry a %scope; dict keeps the resolver's order without duplicates.
    return tuple(dict.fromkeys(info[4][0].split("%", 1)[0] for info in infos))


def check_url(url: str, fetch: FetchConfig) -> Target:
    """Validate one hop; raise FetchError naming the rule that refuses it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"refused {scheme or 'scheme-less'} URL {_short(url)!r}: only http(s) images are fetched")
    if not fetch.allow_http:
        raise FetchError("http(s) image URLs are disabled; set fetch.allow_http=true to fetch them")
    if parts.username is not None or parts.password is not None:
        raise FetchError(f"refused URL with credentials in it: {scheme}://...@{parts.hostname}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchError(f"no host in URL {_short(url)!r}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise FetchError(f"bad port in URL {_short(url)!r}") from None
    if fetch.allowed_domains and not _domain_allowed(host, fetch.allowed_domains):
        raise FetchError(f"host {host!r} is not in fetch.allowed_domains {fetch.allowed_domains}")
    addresses = _resolve(host, port)
    for address in addresses:
        reason = blocked_reason(ipaddress.ip_address(address))
        if reason and not _private_allowed(host, ipaddress.ip_address(address), fetch.allowed_private_hosts):
            logger.warning("refused to fetch %s: %s resolves to %s (%s)", _short(url), host, address, reason)
            raise FetchError(
                f"refused {host} ({address}): {reason} addresses are not fetched; "
                f"list the host in fetch.allowed_private_hosts to allow it"
            )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Percent-encode what http.client would reject (spaces, controls), as browsers and requests do.
    return Target(url, scheme, host, port, quote(path, safe="!#$%&'()*+,/:;=?@[]~"), addresses)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to an already-checked IP, with SNI and certificate verification for the URL's name."""

    def __init__(self, ip: str, port: int, server_name: str, timeout: float):
        self._tls = ssl.create_default_context()
        super().__init__(ip, port, timeout=timeout, context=self._tls)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


def _connect(target: Target, timeout: float) -> http.client.HTTPConnection:
    failure: OSError | None = None
    for ip in target.addresses:
        if target.scheme == "https":
            conn = _PinnedHTTPSConnection(ip, target.port, target.host, timeout)
        else:
            conn = http.client.HTTPConnection(ip, target.port, timeout=timeout)
        try:
            conn.connect()
            return conn
        except ssl.SSLCertVerificationError as e:
            raise FetchError(f"TLS certificate of {target.host} did not verify: {e.verify_message}") from None
        except TimeoutError:  # the deadline is spent: no next address, no retry
            raise
        except OSError as e:
            conn.close()
            failure = e
    raise _Transient(f"cannot connect to {target.host}:{target.port}: {failure}")


def _get(target: Target, deadline: float, max_bytes: int) -> tuple[bytes | None, str | None]:
    """One GET: (body, None), or (None, Location) for a redirect.

    The deadline covers the whole exchange: a socket timeout bounds each read alone, so a server
    that drips its status line and headers a byte at a time would hold the request for ever.
    A timer shuts the socket at the deadline, which ends whatever read is blocked."""
    conn = _connect(target, max(deadline - time.monotonic(), 0.001))
    sock = conn.sock  # the response owns it once headers are read (conn.sock may go None)
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _shut, args=(sock,))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("GET", target.path, headers={"Host": target.host_header, **_HEADERS})
        resp = conn.getresponse()
        if resp.status in _REDIRECT_STATUSES:
            location = resp.getheader("Location")
            if not location:
                raise FetchError(f"HTTP {resp.status} redirect without a Location from {_short(target.url)}")
            return None, location
        if resp.status in _TRANSIENT_STATUSES:
            raise _Transient(f"HTTP {resp.status} from {_short(target.url)}")
        if resp.status != 200:
            raise FetchError(f"HTTP {resp.status} from {_short(target.url)}")
        declared = resp.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise LimitsError(f"{_short(target.url)} is {declared} bytes, over limits.max_image_bytes={max_bytes}")
        chunks, total = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = resp.read1(_CHUNK)
            if not chunk:
                if time.monotonic() >= deadline:  # the watchdog shut the socket: a cut body, not the end
                    raise TimeoutError
                return b"".join(chunks), None
            total += len(chunk)
            if total > max_bytes:
                raise LimitsError(f"{_short(target.url)} is larger than limits.max_image_bytes={max_bytes}")
            chunks.append(chunk)
    except TimeoutError:
        raise
    except (http.client.HTTPException, OSError) as e:
        if time.monotonic() >= deadline:  # the watchdog shut the socket
            raise TimeoutError from None
        raise _Transient(f"connection to {target.host} failed: {type(e).__name__}: {e}") from None
    finally:
        watchdog.cancel()
        conn.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _fetch_once(url: str, fetch: FetchConfig, max_bytes: int) -> bytes:
    deadline = time.monotonic() + fetch.timeout_s
    for _ in range(fetch.max_redirects + 1):
        target = check_url(url, fetch)
        try:
            body, location = _get(target, deadline, max_bytes)
        except TimeoutError:
            raise FetchError(f"timed out after fetch.timeout_s={fetch.timeout_s:g}s fetching {_short(url)}") from None
        if body is not None:
            return body
        url = urljoin(url, location)
    raise FetchError(f"more than fetch.max_redirects={fetch.max_redirects} redirects, last to {_short(url)}")


def fetch_url(url: str, fetch: FetchConfig, max_bytes: int) -> bytes:
    """The body of an http(s) image URL, at most `max_bytes`; FetchError names why it was refused.

    Connection failures and 429, 502, 503, 504 answers are retried `fetch.retries` times with
    backoff; refusals, other 4xx and 5xx, and timeouts are not (a timeout already spent the
    request's budget).
    """
    attempt = 0
    while True:
        try:
            return _fetch_once(url, fetch, max_bytes)
        except _Transient as e:
            if attempt == fetch.retries:
                raise FetchError(f"{e} (after {attempt + 1} attempts)") from None
            logger.info("retrying %s after: %s", _short(url), e)
            time.sleep(min(0.2 * 2**attempt, 2.0))
            attempt += 1
