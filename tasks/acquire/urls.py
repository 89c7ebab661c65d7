"""URLs and address safety for the crawler: normalisation, scope, and refusing addresses that
are not globally routable (private, loopback, link-local, cloud metadata...)."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

MAX_URL_CHARS = 2048

# hostnames that reach cloud metadata services whatever they resolve to
METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}

DEFAULT_PORTS = {"http": 80, "https": 443}


# ---------------------------------------------------------------- URLs


def remove_dot_segments(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if len(out) > 1:
                out.pop()
        elif segment != ".":
            out.append(segment)
    result = "/".join(out)
    if path.endswith(("/.", "/..")):
        result += "/"
    return result if result.startswith("/") else "/" + result


def normalize_url(url: str, base: str | None = None) -> str | None:
    """A canonical absolute http(s) URL (lowercase scheme and host, no default port, no
    fragment or user info, dot segments resolved), or None for anything else."""
    try:
        url = urljoin(base, url.strip()) if base else url.strip()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if scheme not in DEFAULT_PORTS or not host:
        return None
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port and port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path = quote(remove_dot_segments(parts.path or "/"), safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    normal = urlunsplit((scheme, netloc, path, query, ""))
    return normal if len(normal) <= MAX_URL_CHARS else None


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_allowed(host: str, domains: list[str]) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def request_target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


# ---------------------------------------------------------------- address safety


def forbidden_address(ip: str) -> bool:
    """True for any address that is not globally routable: private, loopback, link-local
    (169.254.169.254, the cloud metadata service), carrier NAT, multicast, reserved."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return not addr.is_global or addr.is_multicast


class Refused(Exception):
    """The address of a URL is not allowed (kind: private_address or dns_error)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


async def check_host(host: str, port: int) -> None:
    if host.lower().rstrip(".") in METADATA_HOSTS:
        raise Refused("private_address", f"{host} is a cloud metadata host")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused("dns_error", f"cannot resolve {host}: {exc}") from exc
    bad = sorted({info[4][0] for info in infos if forbidden_address(info[4][0])})
    if bad:
        raise Refused("private_address", f"{host} resolves to non-public address {', '.join(bad)}")
