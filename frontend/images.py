"""Image inputs for image-to-video: every `image_path` form of the API (and the `/v1/tasks/form` upload) becomes
one checked image file in the input folder, and the model gets it as RGB pixels when the task runs.

Forms of a request's image, in the order they are recognised:
- an upload (`image_file` on `/v1/tasks/form`);
- an `http(s)://` URL, fetched only when the server allows it (size and time limits, every resolved address
  and every redirect checked: no private, loopback, link-local, multicast or reserved address);
- a `data:image/...;base64,` URI;
- a path relative to the input folder, when such a file exists (real-path containment: symlinks resolved,
  no `..`, no absolute path, no NUL);
- bare base64.
Whatever the form, the bytes must decode (Pillow, a few common formats only) within a byte and pixel limit.
Uploaded, base64 and fetched images are stored as `<task_id>.<ext>` (never overwriting a file); a path names
a file that is already there. Nothing is stored until the request has passed every check.

The rules (`classify`, `path_problem`, `address_problem`, `derive_size` ...) are pure functions; the I/O glue
(Pillow, the disk, DNS and HTTP) sits below them and in `ImageInputs`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import math
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Awaitable, Callable, Iterable

import httpx
import numpy as np

from frontend.files import FileMissing, PathOutsideRoot, contained_path, durable_temporary_file, existing_file

# Formats Pillow may decode for us (its other parsers stay unused on untrusted bytes), and the stored extension.
FORMATS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
MAX_PATH_CHARS = 1024
MAX_URL_CHARS = 2048
MAX_REDIRECTS = 3
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+(;[A-Za-z0-9=._-]+)*;base64,", re.IGNORECASE)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")
# Special-purpose blocks that not every Python version counts as non-global.
_SPECIAL = tuple(ipaddress.ip_network(net) for net in ("0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24",
                                                         "198.18.0.0/15", "64:ff9b:1::/48"))

OUTSIDE_INPUTS = "image_path must name a file inside the input folder (a relative path, no '..')"
NOT_FILE_OR_BASE64 = "image_path is neither a file in the input folder nor base64 image data"
URLS_DISABLED = "image_path URLs are disabled on this server (upload the image instead)"
NOT_AN_IMAGE = "image does not decode as an image (PNG, JPEG, WebP, BMP or GIF)"


class ImageRejected(ValueError):
    """An image input that cannot be used; the message is one line for the client (no server paths)."""


class ImageTooLarge(ImageRejected):
    """Over the byte limit (an upload answers 413)."""


# ---- pure rules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """What an `image_path` value is: `kind` is "url", "base64" (a data URI's payload) or "path_or_base64"."""

    kind: str
    value: str


def classify(image_path: str) -> ImageSpec:
    """The form of a non-empty `image_path`; raises ImageRejected for a malformed URL or data URI."""
    value = image_path.strip()
    lowered = value[:8].lower()
    if lowered.startswith(("http://", "https://")):
        return ImageSpec("url", value)
    if _SCHEME.match(value):
        raise ImageRejected("image_path URLs must be http:// or https://")
    if lowered.startswith("data:"):
        header = _DATA_URI.match(value)
        if header is None:
            raise ImageRejected("image_path data URI must be data:image/...;base64,...")
        return ImageSpec("base64", value[header.end():])
    return ImageSpec("path_or_base64", value)


def path_problem(relative: str) -> str | None:
    """Why `relative` can never name a file inside the input folder (lexical rules), or None."""
    if not relative or len(relative) > MAX_PATH_CHARS:
        return OUTSIDE_INPUTS
    if any(ord(char) < 32 or char == "\x7f" for char in relative) or "\\" in relative:
        return OUTSIDE_INPUTS
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or path.name in ("", "."):
        return OUTSIDE_INPUTS
    return None


def base64_limit(max_bytes: int) -> int:
    """The longest base64 text (whitespace aside) that can decode to at most `max_bytes`."""
    return 4 * math.ceil(max_bytes / 3)


def decode_base64(text: str, max_bytes: int) -> bytes | None:
    """The bytes of strict base64 `text` (whitespace ignored), None when it is not base64; ImageTooLarge
    when it decodes (or would) to more than `max_bytes`. The length is checked before decoding."""
    compact = "".join(text.split())
    if not compact:
        return None
    if len(compact) > base64_limit(max_bytes) + 4:
        if re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", compact[:4096]) is None:
            return None
        raise ImageTooLarge(f"image is larger than the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is larger than the {max_bytes}-byte limit")
    return data or None


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`"127.0.0.1/32, 10.0.0.0/8"` -> networks; raises ValueError naming the bad entry."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"not an IP network: {item!r}") from None
    return tuple(networks)


def address_problem(address: str, allowed: Iterable[Any] = ()) -> str | None:
    """Why a URL fetch must not connect to `address`, or None. Only globally routable unicast addresses are
    reachable (IPv4 embedded in IPv6 is checked too), unless an operator-trusted network holds the address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if any(ip.version == network.version and ip in network for network in allowed):
        return None
    candidates = [ip]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _6TO4 and ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
    for candidate in candidates:
        if candidate.is_loopback:
            return "a loopback address"
        if candidate.is_link_local:
            return "a link-local address"
        if candidate.is_multicast:
            return "a multicast address"
        if (candidate.is_private or candidate.is_reserved or candidate.is_unspecified or not candidate.is_global
                or any(candidate.version == net.version and candidate in net for net in _SPECIAL)):
            return "a private or reserved address"
    return None


def check_url(url: str) -> httpx.URL:
    """A fetchable http(s) URL (no credentials, a host, a sane length); raises ImageRejected."""
    if len(url) > MAX_URL_CHARS:
        raise ImageRejected(f"image URL is longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ImageRejected("image URL is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise ImageRejected("image URLs must be http:// or https://")
    if not parsed.host:
        raise ImageRejected("image URL has no host")
    if parsed.userinfo:
        raise ImageRejected("image URL must not carry credentials")
    return parsed


def derive_size(image_width: int, image_height: int, *, height: int | None, width: int | None,
                default_height: int, default_width: int, min_height: int, max_height: int, min_width: int,
                max_width: int, multiple: int = 16) -> tuple[int, int]:
    """(height, width) of the video for a conditioning image. Requested values are kept; a missing one follows
    the image's aspect ratio: both missing gives about the default area (as Wan's `max_area`), one missing is
    derived from the other. Derived values are multiples of `multiple` within the limits."""
    if height is not None and width is not None:
        return height, width
    aspect = image_height / image_width
    if height is None and width is None:
        area = default_height * default_width
        raw_height, raw_width = math.sqrt(area * aspect), math.sqrt(area / aspect)
    elif height is None:
        raw_height, raw_width = width * aspect, width
    else:
        raw_height, raw_width = height, height / aspect

    def fit(value: float, low: int, high: int) -> int:
        low = multiple * math.ceil(low / multiple)
        high = multiple * math.floor(high / multiple)
        return int(min(max(multiple * round(value / multiple), low, multiple), max(high, low)))

    return (height if height is not None else fit(raw_height, min_height, max_height),
            width if width is not None else fit(raw_width, min_width, max_width))


# ---- Pillow ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    format: str
    extension: str
    width: int  # after EXIF orientation
    height: int


def _open(source, max_pixels: int):
    """A Pillow image of an allowed format within the pixel limit; raises ImageRejected."""
    from PIL import Image

    Image.init()  # register every plugin, so that `formats` can name them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the explicit check below decides
            image = Image.open(source, formats=[name for name in FORMATS if name in Image.OPEN])
    except Image.DecompressionBombError:
        raise ImageRejected(f"image has more than the {max_pixels}-pixel limit") from None
    except Exception:  # untrusted bytes: any decoder complaint means "not an image"
        raise ImageRejected(NOT_AN_IMAGE) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        image.close()
        raise ImageRejected(f"image has more than the {max_pixels}-pixel limit" if width * height else NOT_AN_IMAGE)
    return image


def _oriented_size(image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Decode `data` completely (not only its header) and describe it; raises ImageRejected. Blocking."""
    image = _open(io.BytesIO(data), max_pixels)
    with image:
        try:
            image.load()
        except Exception:
            raise ImageRejected(NOT_AN_IMAGE) from None
        width, height = _oriented_size(image)
        return ImageInfo(format=image.format, extension=FORMATS[image.format], width=width, height=height)


def to_rgb(image) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a Pillow image as diffusers' `load_image` prepares one (EXIF orientation applied,
    then `convert("RGB")`: alpha dropped, palette and greyscale expanded), so the pipeline sees what a
    diffusers user's would."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


# ---- files -------------------------------------------------------------------------------------------


def store_exclusive(root: Path, stem: str, extension: str, data: bytes) -> str:
    """Write `data` as `root/<stem>.<extension>` (or `<stem>-<random>.<extension>` when that name is taken),
    atomically and never replacing a file; returns the name. Blocking."""
    root.mkdir(parents=True, exist_ok=True)
    temporary = durable_temporary_file(root, stem, data)
    try:
        for attempt in range(100):
            name = f"{stem}.{extension}" if attempt == 0 else f"{stem}-{os.urandom(4).hex()}.{extension}"
            try:
                os.link(temporary, root / name)  # fails if the name exists: never replaces a file
                return name
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links
                if not (root / name).exists():
                    os.replace(temporary, root / name)
                    return name
        raise OSError("no free name for the image")
    finally:
        temporary.unlink(missing_ok=True)


def remove_input(root: Path, relative: str) -> None:
    """Delete a stored input (inside `root` only); missing is fine. Blocking."""
    try:
        contained_path(root, relative).unlink(missing_ok=True)
    except (PathOutsideRoot, OSError):
        pass


def find_input(root: Path, relative: str) -> tuple[Path, str] | None:
    """(real path, its name relative to the real root) of an existing regular file under `root`; None when there
    is none; PathOutsideRoot when the name leads out (symlinks included). Blocking."""
    try:
        path, _ = existing_file(root, relative)
    except FileMissing:
        return None
    return path, path.relative_to(os.path.realpath(root)).as_posix()


def read_capped(path: Path, max_bytes: int) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is larger than the {max_bytes}-byte limit")
    return data


# ---- URLs --------------------------------------------------------------------------------------------

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    timeout_s: float = 10.0
    allowed_networks: tuple = ()
    max_redirects: int = MAX_REDIRECTS


async def safe_address(url: httpx.URL, policy: FetchPolicy, resolver: Resolver) -> str:
    """The address to connect to for `url`: every address its host resolves to must be allowed (a host that
    mixes public and private addresses is refused: DNS may answer differently on the next lookup)."""
    host = url.host
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await resolver(host, url.port or (443 if url.scheme == "https" else 80))
        except (OSError, UnicodeError):
            raise ImageRejected("image URL host does not resolve") from None
    if not addresses:
        raise ImageRejected("image URL host does not resolve")
    for address in addresses:
        problem = address_problem(address, policy.allowed_networks)
        if problem:
            raise ImageRejected(f"image URL leads to {problem}; only public addresses may be fetched")
    return addresses[0]


async def fetch_url(url: str, policy: FetchPolicy, resolver: Resolver = system_resolver,
                    transport: httpx.AsyncBaseTransport | None = None) -> bytes:
    """The body of `url` (http/https), checked hop by hop; raises ImageRejected / ImageTooLarge.

    Each hop connects to the address that was checked (the host's name goes in `Host` and TLS SNI, so DNS
    cannot swap in another address after the check); redirects are followed by hand and checked the same way;
    the whole fetch, redirects included, must finish within `policy.timeout_s`."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            async with httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False,
                                         timeout=policy.timeout_s) as client:
                return await _fetch_hops(client, check_url(url), policy, resolver)
    except TimeoutError:
        raise ImageRejected(f"image URL did not answer within {policy.timeout_s:g} s") from None
    except httpx.HTTPError as error:
        raise ImageRejected(f"image URL could not be fetched ({type(error).__name__})") from None


async def _fetch_hops(client: httpx.AsyncClient, url: httpx.URL, policy: FetchPolicy, resolver: Resolver) -> bytes:
    for _ in range(policy.max_redirects + 1):
        address = await safe_address(url, policy, resolver)
        pinned = url.copy_with(host=address)
        host_header = url.host if url.port is None else f"{url.host}:{url.port}"
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        request = client.build_request("GET", pinned, headers={"Host": host_header, "Accept": "image/*"},
                                       extensions=extensions)
        response = await client.send(request, stream=True)
        try:
            if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                try:
                    url = check_url(str(url.join(response.headers["location"])))
                except httpx.InvalidURL:
                    raise ImageRejected("image URL redirects to an invalid URL") from None
                continue
            if response.status_code != 200:
                raise ImageRejected(f"image URL answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > policy.max_bytes:
                raise ImageTooLarge(f"image is larger than the {policy.max_bytes}-byte limit")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > policy.max_bytes:
                    raise ImageTooLarge(f"image is larger than the {policy.max_bytes}-byte limit")
            return bytes(body)
        finally:
            await response.aclose()
    raise ImageRejected(f"image URL redirects more than {policy.max_redirects} times")


# ---- uploads -----------------------------------------------------------------------------------------


async def read_upload(upload, max_bytes: int, chunk_bytes: int = 64 << 10) -> bytes:
    """The bytes of an upload (Starlette UploadFile), read in chunks; ImageTooLarge past `max_bytes`."""
    data = bytearray()
    while chunk := await upload.read(chunk_bytes):
        data += chunk
        if len(data) > max_bytes:
            raise ImageTooLarge(f"image_file is larger than the {max_bytes}-byte limit")
    return bytes(data)


# ---- the glue the service uses -----------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedImage:
    """A checked image input: `data` to store (upload, base64, URL) or `existing`, a file already in inputs/."""

    info: ImageInfo
    origin: str  # "upload", "path", "base64" or "url"
    data: bytes | None = None
    existing: str | None = None


class ImageInputs:
    """Image inputs under one input folder with the server's limits."""

    def __init__(self, root: Path, *, max_bytes: int, max_pixels: int, allow_url_fetch: bool = False,
                 fetch_timeout_s: float = 10.0, allowed_networks: tuple = (),
                 resolver: Resolver = system_resolver, transport: httpx.AsyncBaseTransport | None = None):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.allow_url_fetch = allow_url_fetch
        self.policy = FetchPolicy(max_bytes=max_bytes, timeout_s=fetch_timeout_s,
                                  allowed_networks=tuple(allowed_networks))
        self.resolver = resolver
        self.transport = transport

    @classmethod
    def from_settings(cls, settings, **kwargs: Any) -> "ImageInputs":
        return cls(settings.input_dir, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                   allow_url_fetch=settings.allow_url_fetch, fetch_timeout_s=settings.url_fetch_timeout,
                   allowed_networks=parse_networks(settings.url_fetch_allow_networks), **kwargs)

    async def resolve(self, image_path: str, upload: bytes | None = None,
                      fetch: bool = True) -> ResolvedImage | None:
        """Check an image input (an upload, or an `image_path` value); raises ImageRejected. With
        `fetch=False` a URL is checked (allowed, public address) but not fetched, and None is answered."""
        if upload is not None and image_path:
            raise ImageRejected("give either image_file or image_path, not both")
        if upload is not None:
            if len(upload) > self.max_bytes:
                raise ImageTooLarge(f"image_file is larger than the {self.max_bytes}-byte limit")
            return await self._checked(upload, "upload")
        spec = classify(image_path)
        if spec.kind == "url":
            if not self.allow_url_fetch:
                raise ImageRejected(URLS_DISABLED)
            if not fetch:
                await safe_address(check_url(spec.value), self.policy, self.resolver)
                return None
            data = await fetch_url(spec.value, self.policy, self.resolver, self.transport)
            return await self._checked(data, "url")
        if spec.kind == "base64":
            data = decode_base64(spec.value, self.max_bytes)
            if data is None:
                raise ImageRejected("image_path data URI does not hold valid base64")
            return await self._checked(data, "base64")
        return await self._path_or_base64(spec.value)

    async def _path_or_base64(self, value: str) -> ResolvedImage:
        outside = path_problem(value) is not None
        if not outside:
            try:
                found = await asyncio.to_thread(find_input, self.root, value)
            except PathOutsideRoot:
                outside, found = True, None
            if found is not None:
                path, relative = found
                data = await asyncio.to_thread(read_capped, path, self.max_bytes)
                info = await asyncio.to_thread(inspect_image, data, self.max_pixels)
                return ResolvedImage(info=info, origin="path", existing=relative)
        data = decode_base64(value, self.max_bytes)
        if data is not None:
            return await self._checked(data, "base64")
        raise ImageRejected(OUTSIDE_INPUTS if outside else NOT_FILE_OR_BASE64)

    async def _checked(self, data: bytes, origin: str) -> ResolvedImage:
        info = await asyncio.to_thread(inspect_image, data, self.max_pixels)
        return ResolvedImage(info=info, origin=origin, data=data)

    async def store(self, image: ResolvedImage, task_id: str) -> str:
        """The input-relative name of the image: stored now as `<task_id>.<ext>`, or the existing file's."""
        if image.existing is not None:
            return image.existing
        return await asyncio.to_thread(store_exclusive, self.root, task_id, image.info.extension, image.data)

    async def discard(self, image: ResolvedImage, relative: str) -> None:
        """Undo `store` (only for files this service stored, never a client's existing file)."""
        if image.existing is None:
            await asyncio.to_thread(remove_input, self.root, relative)

    def _open_stored(self, relative: str):
        try:
            path, _ = existing_file(self.root, relative)
        except (PathOutsideRoot, FileMissing):
            raise ImageRejected("the task's input image is missing from the input folder") from None
        return _open(path, self.max_pixels)

    def size(self, relative: str) -> tuple[int, int]:
        """(width, height) of a stored input, EXIF orientation applied (header only). Blocking."""
        with self._open_stored(relative) as image:
            return _oriented_size(image)

    def load_rgb(self, relative: str) -> np.ndarray:
        """The stored input as RGB uint8 [H, W, 3] for the model. Blocking."""
        with self._open_stored(relative) as image:
            try:
                return to_rgb(image)
            except ImageRejected:
                raise
            except Exception:
                raise ImageRejected("the task's input image no longer decodes") from None
