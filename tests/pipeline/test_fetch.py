"""The http(s) image fetcher as a security boundary, against real local HTTP(S) servers."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading
import time

import numpy as np
import pytest

from pipeline.config import FetchConfig, LimitsConfig, StorageConfig
from pipeline.fetch import blocked_reason, fetch_url
from pipeline.images import ImageError, decode_image, load_bytes
from tests.conftest import encode, photo
from tests.image_server import ImageServer

IMG = encode(photo("coffee")[:64, :96])
CAP = 1 << 20


def _cfg(**kw) -> FetchConfig:
    return FetchConfig(**{"allow_http": True, "timeout_s": 3.0, "retries": 0, **kw})


def _refused(url: str, fetch: FetchConfig, max_bytes: int = CAP) -> str:
    with pytest.raises(ImageError) as e:
        fetch_url(url, fetch, max_bytes)
    return str(e.value)


@pytest.fixture
def server():
    with ImageServer("127.0.0.1") as s:
        s.add("/img.png", IMG)
        yield s


@pytest.fixture
def public_server():
    """Stands for an allowed host: 127.0.0.2 is listed in allowed_private_hosts where used."""
    with ImageServer("127.0.0.2") as s:
        s.add("/img.png", IMG)
        yield s


def test_http_is_off_by_default(server):
    msg = _refused(server.url("/img.png"), FetchConfig())
    assert msg == "image: http(s) image URLs are disabled; set fetch.allow_http=true to fetch them"
    assert server.seen == []


@pytest.mark.parametrize(
    "host, reason",
    [
        ("127.0.0.1", "loopback"),
        ("localhost", "loopback"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("100.100.100.200", "private"),  # Alibaba's metadata service, in carrier-grade NAT space
        ("0.0.0.0", "reserved"),  # "this host": reaches loopback on Linux
    ],
)
def test_non_public_addresses_are_refused_before_connecting(server, host, reason):
    address = "127.0.0.1" if host == "localhost" else host
    msg = _refused(server.url("/img.png", host=host), _cfg())
    assert msg == (
        f"image: refused {host} ({address}): {reason} addresses are not fetched; "
        "list the host in fetch.allowed_private_hosts to allow it"
    )
    assert server.seen == []


@pytest.mark.parametrize(
    "address, reason",
    [
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),  # NAT64 of 169.254.169.254
        ("2002:a9fe:a9fe::1", "link-local (cloud metadata)"),  # 6to4 of 169.254.169.254
        ("fd00:ec2::254", "private"),  # AWS metadata over IPv6
        ("fe80::1", "link-local (cloud metadata)"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_classification(address, reason):
    assert blocked_reason(ipaddress.ip_address(address)) == reason


def test_other_schemes_and_credentials_are_refused():
    assert _refused("file:///etc/passwd", _cfg()) == (
        "image: refused file URL 'file:///etc/passwd': only http(s) images are fetched"
    )
    assert _refused("ftp://example.com/a.png", _cfg()).startswith("image: refused ftp URL")
    assert _refused("http://user:pw@example.com/a.png", _cfg()) == (
        "image: refused URL with credentials in it: http://...@example.com"
    )


def test_allowlisted_private_host_is_fetched_and_decodes_like_local_bytes(server):
    fetch = _cfg(allowed_private_hosts=["127.0.0.1"])
    assert fetch_url(server.url("/img.png"), fetch, CAP) == IMG
    limits, storage = LimitsConfig(), StorageConfig()
    fetched = load_bytes(server.url("/img.png"), limits, fetch, storage, local_ok=False)
    assert np.array_equal(np.asarray(decode_image(fetched, limits).image), np.asarray(decode_image(IMG, limits).image))


def test_networks_can_be_allowlisted_and_domains_restrict_names(server):
    assert fetch_url(server.url("/img.png"), _cfg(allowed_private_hosts=["127.0.0.0/8"]), CAP) == IMG
    msg = _refused(server.url("/img.png", host="localhost"), _cfg(allowed_domains=["example.com"]))
    assert msg == "image: host 'localhost' is not in fetch.allowed_domains ['example.com']"


def test_connects_to_the_checked_address_but_sends_the_name(server):
    """The name is resolved and checked once; the socket goes to that address with Host: name."""
    fetch = _cfg(allowed_private_hosts=["localhost"])
    assert fetch_url(server.url("/img.png", host="localhost"), fetch, CAP) == IMG
    assert server.seen == [("/img.png", f"localhost:{server.port}")]


@pytest.mark.parametrize(
    "target, expected",
    [
        ("http://127.0.0.1:{port}/img.png", "image: refused 127.0.0.1 (127.0.0.1): loopback addresses"),
        ("http://169.254.169.254/latest/meta-data/", "image: refused 169.254.169.254 (169.254.169.254): link-local"),
        ("file:///etc/passwd", "image: refused file URL 'file:///etc/passwd'"),
    ],
)
def test_every_redirect_hop_is_checked(server, public_server, target, expected):
    start = public_server.redirect("/go", target.format(port=server.port))
    msg = _refused(start, _cfg(allowed_private_hosts=["127.0.0.2"]))
    assert msg.startswith(expected)
    assert public_server.seen == [("/go", f"127.0.0.2:{public_server.port}")]
    assert server.seen == []


def test_redirects_within_allowed_hosts_are_followed_up_to_the_limit(public_server):
    fetch = _cfg(allowed_private_hosts=["127.0.0.2"], max_redirects=2)
    public_server.redirect("/a", "/b", status=301)
    public_server.redirect("/b", "/img.png", status=307)
    assert fetch_url(public_server.url("/a"), fetch, CAP) == IMG
    public_server.redirect("/loop", "/loop")
    assert _refused(public_server.url("/loop"), fetch) == (
        f"image: more than fetch.max_redirects=2 redirects, last to {public_server.url('/loop')}"
    )


def test_byte_cap_applies_to_declared_and_streamed_sizes(server):
    fetch = _cfg(allowed_private_hosts=["127.0.0.1"])
    declared = server.add("/declared", b"x" * 5000)
    streamed = server.add("/streamed", b"x" * 5000, content_length=False)
    assert _refused(declared, fetch, 4096) == f"image: {declared} is 5000 bytes, over limits.max_image_bytes=4096"
    assert _refused(streamed, fetch, 4096) == f"image: {streamed} is larger than limits.max_image_bytes=4096"


def test_deadline_covers_a_slow_drip(server):
    url = server.add("/drip", b"x" * 20_000, drip_s=0.1)  # 20 pieces, 2 s in all
    start = time.monotonic()
    msg = _refused(url, _cfg(allowed_private_hosts=["127.0.0.1"], timeout_s=0.5))
    assert msg == f"image: timed out after fetch.timeout_s=0.5s fetching {url}"
    assert time.monotonic() - start < 1.5


def test_deadline_covers_a_server_that_drips_its_headers(server):
    """Each byte arrives well within the timeout, so only a deadline over the whole exchange
    (connect, headers and body together) stops it."""
    url = server.add("/drip-head", b"x" * 100, drip_headers_s=0.05)  # about 2 s of headers
    start = time.monotonic()
    msg = _refused(url, _cfg(allowed_private_hosts=["127.0.0.1"], timeout_s=0.5))
    assert msg == f"image: timed out after fetch.timeout_s=0.5s fetching {url}"
    assert time.monotonic() - start < 1.5


def test_status_errors_and_retries(server):
    fetch = _cfg(allowed_private_hosts=["127.0.0.1"], retries=2)
    missing = server.url("/nope")
    assert _refused(missing, fetch) == f"image: HTTP 404 from {missing}"
    busy = server.add("/busy", b"", status=503)
    assert _refused(busy, fetch) == f"image: HTTP 503 from {busy} (after 3 attempts)"
    assert [p for p, _ in server.seen] == ["/nope", "/busy", "/busy", "/busy"]


@pytest.mark.parametrize("status, retried", [(429, True), (502, True), (503, True), (504, True), (500, False), (403, False)])
def test_the_transient_statuses_are_retried_and_others_not(server, status, retried):
    fetch = _cfg(allowed_private_hosts=["127.0.0.1"], retries=1)
    url = server.add(f"/s{status}", b"", status=status)
    assert _refused(url, fetch) == f"image: HTTP {status} from {url}" + (" (after 2 attempts)" if retried else "")
    assert [p for p, _ in server.seen] == [f"/s{status}"] * (2 if retried else 1)


def test_a_refused_connection_is_retried(server):
    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/img.png"
    message = _refused(url, _cfg(allowed_private_hosts=["127.0.0.1"], retries=1))
    assert message.startswith(f"image: cannot connect to 127.0.0.1:{port}: ") and message.endswith(" (after 2 attempts)"), message


def test_pixel_cap_stops_a_decompression_bomb(server):
    bomb = encode(np.zeros((3000, 3000, 3), dtype=np.uint8))  # 9 MP that compress to a few KiB
    assert len(bomb) < 100_000
    url = server.add("/bomb.png", bomb)
    fetch = _cfg(allowed_private_hosts=["127.0.0.1"])
    with pytest.raises(ImageError) as e:
        limits = LimitsConfig(max_pixels=4_000_000)
        decode_image(load_bytes(url, limits, fetch, StorageConfig(), local_ok=False), limits)
    assert str(e.value) == "image: 3000x3000 exceeds limits.max_pixels=4000000"


def _self_signed(tmp_path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def https_server(tmp_path, monkeypatch):
    """HTTPS on 127.0.0.1 with a certificate for 'localhost', trusted through SSL_CERT_FILE."""
    cert, key = _self_signed(tmp_path, "localhost")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    names = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMG)))
            self.end_headers()
            self.wfile.write(IMG)

        def log_message(self, *args):
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, name, _: names.append(name)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield httpd.server_address[1], names
    httpd.shutdown()
    httpd.server_close()


def test_https_sends_sni_and_verifies_the_certificate_for_the_name(https_server):
    port, names = https_server
    fetch = _cfg(allowed_private_hosts=["127.0.0.1"])
    assert fetch_url(f"https://localhost:{port}/img.png", fetch, CAP) == IMG
    assert names == ["localhost"]
    # Same server by address: the certificate names 'localhost', not 127.0.0.1.
    msg = _refused(f"https://127.0.0.1:{port}/img.png", fetch)
    assert msg.startswith("image: TLS certificate of 127.0.0.1 did not verify: ")


def test_the_retried_statuses_are_the_documented_ones():
    """README and the fetcher's docstring name exactly the statuses that are retried."""
    from pipeline.fetch import _TRANSIENT_STATUSES, fetch_url
    from tests.conftest import ROOT

    listed = ", ".join(str(s) for s in sorted(_TRANSIENT_STATUSES))
    assert f"retries on connection errors and {listed}," in " ".join((ROOT / "README.md").read_text().split())
    assert f"Connection failures and {listed} answers are retried" in " ".join(fetch_url.__doc__.split())
