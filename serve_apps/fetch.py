"""Fetching an http(s) image URL, only from the server's allow-list and never from the server's own network.

An allow-list entry is `host` (ports 80 and 443) or `host:port` (`[v6]:port` for an IPv6 address). The URL is
parsed once, by the parser the HTTP client uses, and refused (400 bad_image_url) when it is ambiguous: a
backslash, a space or control character, user info, a bad port or a bad international name. A listed name is
resolved once and refused (400 url_not_allowed) when any of its addresses is loopback, private, link-local,
reserved or multicast: an allow-listed name cannot lead to 127.0.0.1 or 169.254.169.254. Only an entry that is
that IP address itself reaches such an address (an operator who lists 127.0.0.1:8080 means it). The connection
goes to the addresses that were checked (the client's resolver answers with them alone), so a name that
resolves differently a moment later (DNS rebinding) changes nothing. The body is read whole, up to the size
limit (413 too_large past it), within the timeout (400 fetch_failed "timed out" or "incomplete" otherwise).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from pixelray.errors import PixelrayError

DEFAULT_PORTS = (80, 443)
_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_UNSAFE = re.compile(r"[\\\x00-\x20\x7f]")  # a backslash, a space or a control character


def normal_host(host: str) -> str:
    """A host as it is compared: an IP address in its compressed form, a name in lower-case ASCII (IDNA)
    without its final dot; ValueError when it is neither."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.lower().removesuffix(".")
    try:
        name = name.encode("idna").decode("ascii")
        name.encode("ascii").decode("idna")  # every xn-- label must decode
    except UnicodeError:
        raise ValueError(f"{host!r} is not a valid host name") from None
    if not _NAME.match(name):
        raise ValueError(f"{host!r} is not a valid host name")
    return name


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AllowedHost:
    """One allow-list entry: a host (normalised) and its port, or None for the default ports 80 and 443."""

    host: str
    port: int | None

    @classmethod
    def parse(cls, entry: str) -> AllowedHost:
        text = entry.strip()
        if text.count(":") > 1 and not text.startswith("["):  # a bare IPv6 address
            return cls(normal_host(text), None)
        try:
            parts = urlsplit("//" + text)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"allow-list entry {entry!r}: {e}") from None
        if not parts.hostname or parts.path or parts.query or parts.fragment or "@" in parts.netloc \
                or port == 0 or _UNSAFE.search(text):
            raise ValueError(f"allow-list entry {entry!r}: expected host or host:port")
        return cls(normal_host(parts.hostname), port)

    def allows(self, host: str, port: int) -> bool:
        return host == self.host and (port in DEFAULT_PORTS if self.port is None else port == self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_allow_list(entries: list[str]) -> list[AllowedHost]:
    return [AllowedHost.parse(e) for e in entries]


def is_public(address: str) -> bool:
    """Whether an address is on the public internet (not loopback, private, link-local, reserved, multicast)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Target:
    """A URL that passed the allow-list: what the client connects to."""

    url: object  # yarl.URL: what the client requests, parsed once
    host: str
    port: int
    entry: AllowedHost


def check_url(url: str, allowed: list[AllowedHost], what: str) -> Target:
    """An http(s) URL -> its Target, or a 400 (bad_image_url when it cannot be read one way only,
    url_not_allowed when its host and port are not on the allow-list)."""
    import yarl

    def bad(why: str) -> PixelrayError:
        return PixelrayError(f"{what}: {why}", 400, "bad_image_url")

    if _UNSAFE.search(url):
        raise bad("the URL holds a backslash, a space or a control character")
    try:
        parsed = yarl.URL(url)
        raw_host, port, _ = parsed.raw_host, parsed.port, parsed.host
        netloc = urlsplit(url).netloc
    except (ValueError, TypeError) as e:  # UnicodeError is a ValueError
        raise bad(f"not a valid URL ({e})") from None
    if parsed.scheme not in ("http", "https") or not raw_host:
        raise bad("only base64 data URLs are accepted (and http(s) URLs from allow-listed hosts)")
    if "@" in netloc or "@" in (parsed.raw_authority or ""):
        raise bad("a URL with user info (user@host) is refused")
    if not port or not 0 < port < 65536:
        raise bad("the URL's port is not valid")
    try:
        host = normal_host(raw_host)
    except ValueError as e:
        raise bad(str(e)) from None
    entry = next((e for e in allowed if e.allows(host, port)), None)
    if entry is None:
        listed = any(e.host == host for e in allowed)
        why = (f"port {port} of host {host!r} is not in the server's image_url_hosts allow-list" if listed else
               f"host {host!r} is not in the server's image_url_hosts allow-list")
        raise PixelrayError(f"{what}: remote image URLs are refused ({why}); send the image as a base64 data URL",
                            400, "url_not_allowed")
    return Target(parsed, host, port, entry)


async def checked_addresses(target: Target, what: str) -> list[str]:
    """The addresses the client may connect to: an IP literal URL's own (it is listed as such), or those
    the name resolves to, all of them public (400 url_not_allowed otherwise)."""
    if is_ip(target.host):
        return [target.host]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise PixelrayError(f"{what}: cannot resolve {target.host!r}: {e}", 400, "fetch_failed") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise PixelrayError(f"{what}: {target.host!r} resolves to no address", 400, "fetch_failed")
    local = [a for a in addresses if not is_public(a)]
    if local:
        raise PixelrayError(f"{what}: host {target.host!r} resolves to a loopback, private, link-local or reserved "
                            f"address ({local[0]}); such addresses are fetched only when the allow-list names the "
                            "IP address itself", 400, "url_not_allowed")
    return addresses


def _pinned_resolver(host: str, addresses: list[str]):
    """An aiohttp resolver that answers for the checked host alone, with the checked addresses alone."""
    from aiohttp.abc import AbstractResolver

    class Pinned(AbstractResolver):
        async def resolve(self, name: str, port: int = 0, family: int = socket.AF_INET) -> list:
            if normal_host(name) != host:
                raise OSError(f"{name!r} is not the host that was checked")
            return [{"hostname": name, "host": a, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
                     "family": socket.AF_INET6 if ":" in a else socket.AF_INET} for a in addresses]

        async def close(self) -> None:
            pass

    return Pinned()


async def fetch_url(url: str, allowed: list[AllowedHost], max_bytes: int, timeout_s: float, what: str) -> bytes:
    """The body of an allow-listed http(s) URL (status 200, no redirects), at most `max_bytes`, within
    `timeout_s` for everything (resolving, connecting, reading); every failure a 4xx PixelrayError."""
    import aiohttp

    target = check_url(url, allowed, what)

    def failed(why: str) -> PixelrayError:
        return PixelrayError(f"{what}: fetching {url} {why}", 400, "fetch_failed")

    try:
        async with asyncio.timeout(timeout_s):
            addresses = await checked_addresses(target, what)
            connector = aiohttp.TCPConnector(resolver=_pinned_resolver(target.host, addresses), use_dns_cache=False,
                                             force_close=True)
            async with aiohttp.ClientSession(connector=connector, auto_decompress=False, trust_env=False) as session, \
                    session.get(target.url, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as response:
                if response.status != 200:
                    raise failed(f"gave HTTP {response.status}")
                if response.content_length is not None and response.content_length > max_bytes:
                    raise PixelrayError(f"{what}: {url} is {response.content_length:,} bytes, over the limit of "
                                        f"{max_bytes:,}", 413, "too_large")
                data = bytearray()
                async for chunk in response.content.iter_any():
                    data += chunk
                    if len(data) > max_bytes:
                        raise PixelrayError(f"{what}: {url} is over the limit of {max_bytes:,} bytes", 413,
                                            "too_large")
                if response.content_length is not None and len(data) < response.content_length:
                    raise failed(f"was incomplete ({len(data):,} of {response.content_length:,} bytes)")
    except TimeoutError:
        raise failed(f"timed out after {timeout_s:g} s") from None
    except aiohttp.ClientPayloadError:
        raise failed("was incomplete: the server closed the connection before the end of the body") from None
    except aiohttp.InvalidURL as e:
        raise PixelrayError(f"{what}: not a valid URL ({e})", 400, "bad_image_url") from None
    except (aiohttp.ClientError, OSError) as e:
        raise failed(f"failed: {e or type(e).__name__}") from None
    except ValueError as e:  # what the client's parser refuses, should any case pass the checks above
        raise PixelrayError(f"{what}: not a valid URL ({e})", 400, "bad_image_url") from None
    return bytes(data)
