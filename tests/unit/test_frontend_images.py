"""Image inputs (frontend/images.py) and image-to-video through the app on a fake Triton client: every form of
`image_path` and the upload, every bad input refused with a one-line 4xx and no file left behind, URL fetching
with a fake resolver and transport (no network), stored inputs, derived video sizes, the pixels the model gets."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image

from frontend import images
from frontend.images import (
    FetchPolicy, ImageInputs, ImageRejected, ImageTooLarge, address_problem, check_url, classify, decode_base64,
    derive_size, inspect_image, parse_networks, path_problem, store_exclusive, to_rgb,
)
from frontend.serving import I2V_NEEDS_IMAGE, I2V_NOT_SERVED
from frontend.settings import parse_settings
from tests.unit.frontend_fakes import TINY_INFO, AppHarness, FakeTritonClient, files_outside, wait_status

I2V_INFO = dataclasses.replace(TINY_INFO, model_kind="i2v")


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 32) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 77)], axis=-1), "RGB")


def png(width: int = 64, height: int = 32) -> bytes:
    return encode(gradient(width, height))


def run(coroutine):
    return asyncio.run(coroutine)


# ---- pure rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, kind", [
    ("http://example.com/a.png", "url"), ("HTTPS://example.com/a.png", "url"), ("  https://x.org/a  ", "url"),
    ("data:image/png;base64,AAAA", "base64"), ("DATA:image/jpeg;charset=x;base64,AAAA", "base64"),
    ("cat.png", "path_or_base64"), ("sub/dir/cat.png", "path_or_base64"), ("/9j/4AAQSkZJRg==", "path_or_base64"),
])
def test_classify_names_the_form_of_an_image_path(value, kind):
    assert classify(value).kind == kind


@pytest.mark.parametrize("value, words", [
    ("file:///etc/passwd", "http:// or https://"), ("ftp://example.com/a.png", "http:// or https://"),
    ("gopher://127.0.0.1:6379/_", "http:// or https://"),
    ("data:text/plain;base64,aGVsbG8=", "data:image"), ("data:image/png,rawbytes", "data:image"),
    ("data:image/svg+xml;utf8,<svg/>", "data:image"),
])
def test_classify_refuses_other_schemes_and_data_uris_that_are_not_base64_images(value, words):
    with pytest.raises(ImageRejected, match=words):
        classify(value)


@pytest.mark.parametrize("relative", [
    "", "/etc/passwd", "../x.png", "a/../../x.png", "a/../b.png", "..", ".", "./", "a\\..\\b.png",
    "bad\x00name.png", "line\nbreak.png", "x" * 1100,
])
def test_path_problem_refuses_absolute_dotdot_nul_and_control_characters(relative):
    assert path_problem(relative) is not None


@pytest.mark.parametrize("relative", ["cat.png", "./cat.png", "sub/dir/cat.jpg", "a..b.png", "...png"])
def test_path_problem_accepts_plain_relative_names(relative):
    assert path_problem(relative) is None


def test_decode_base64_is_strict_ignores_whitespace_and_caps_before_and_after_decoding():
    data = png()
    text = base64.b64encode(data).decode()
    assert decode_base64(text, 1 << 20) == data
    assert decode_base64(text[:20] + "\n " + text[20:], 1 << 20) == data
    assert decode_base64("not base64!", 1 << 20) is None
    assert decode_base64("abc", 1 << 20) is None  # bad padding
    assert decode_base64("", 1 << 20) is None
    with pytest.raises(ImageTooLarge):
        decode_base64(text, len(data) - 1)  # decodes to one byte too many
    with pytest.raises(ImageTooLarge):
        decode_base64("A" * (10 << 20), 1024)  # refused by its length, never decoded


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "198.18.0.1", "192.0.0.8",
    "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1",
    "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:7f00:1::1", "not-an-ip",
])
def test_address_problem_refuses_private_loopback_link_local_multicast_and_reserved(address):
    assert address_problem(address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946"])
def test_address_problem_accepts_public_unicast(address):
    assert address_problem(address) is None


def test_operator_trusted_networks_open_only_themselves():
    allowed = parse_networks("127.0.0.1/32, 10.1.0.0/16")
    assert address_problem("127.0.0.1", allowed) is None
    assert address_problem("10.1.2.3", allowed) is None
    assert address_problem("127.0.0.2", allowed) is not None
    assert address_problem("10.2.0.1", allowed) is not None
    assert address_problem("::1", allowed) is not None
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks("localhost")


@pytest.mark.parametrize("url, words", [
    ("http://user:pw@example.com/a.png", "credentials"), ("http:///a.png", "host"),
    ("https://example.com/" + "a" * 3000, "longer"), ("http://[::1/", "valid URL"),
])
def test_check_url_refuses_credentials_missing_hosts_and_huge_urls(url, words):
    with pytest.raises(ImageRejected, match=words):
        check_url(url)


LIMITS = dict(default_height=96, default_width=160, min_height=32, max_height=480, min_width=32, max_width=832)


@pytest.mark.parametrize("image, requested, expected", [
    ((160, 96), (None, None), (96, 160)),  # the default's own aspect: the default size
    ((64, 64), (None, None), (128, 128)),  # square at about the default area (96*160)
    ((32, 64), (None, None), (176, 80)),  # portrait
    ((4000, 100), (None, None), (32, 784)),  # extreme aspect: clamped to the limits
    ((64, 32), (64, None), (64, 128)),  # one side given: the other follows the aspect ratio
    ((64, 32), (None, 96), (48, 96)),
    ((64, 32), (48, 48), (48, 48)),  # both given: kept as asked
])
def test_derive_size_follows_the_image_aspect_at_about_the_default_area(image, requested, expected):
    height, width = derive_size(*image, height=requested[0], width=requested[1], **LIMITS)
    assert (height, width) == expected
    assert height % 16 == 0 and width % 16 == 0


# ---- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, extension", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"),
                                            ("GIF", "gif")])
def test_common_formats_decode_and_name_their_extension(fmt, extension):
    info = inspect_image(encode(gradient(40, 24), fmt), 1 << 20)
    assert (info.extension, info.width, info.height) == (extension, 40, 24)


@pytest.mark.parametrize("data", [
    b"", b"not an image", b"MZ\x90\x00" + b"\0" * 100, png()[:60],  # truncated PNG
    encode(gradient(8, 8), "TIFF"), encode(gradient(16, 16), "ICO"), b"%PDF-1.4\n",
    b"<svg xmlns='http://www.w3.org/2000/svg'/>",
])
def test_bytes_that_do_not_decode_or_are_an_unlisted_format_are_refused(data):
    with pytest.raises(ImageRejected, match="does not decode"):
        inspect_image(data, 1 << 20)


def test_images_over_the_pixel_limit_are_refused_before_decoding():
    bomb = encode(Image.new("L", (4000, 4000)), "PNG")  # a few KB, 16 M pixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageRejected, match="pixel limit"):
        inspect_image(bomb, 1_000_000)


def test_exif_orientation_is_applied_to_the_size_and_the_pixels():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(gradient(40, 24), "JPEG", exif=exif.tobytes())
    assert (inspect_image(data, 1 << 20).width, inspect_image(data, 1 << 20).height) == (24, 40)
    with Image.open(io.BytesIO(data)) as image:
        assert to_rgb(image).shape == (40, 24, 3)


def test_to_rgb_gives_uint8_hwc_as_diffusers_load_image_does():
    from diffusers.utils import load_image

    for image in (Image.new("RGBA", (4, 2), (10, 20, 30, 0)), Image.new("L", (3, 3), 7),
                  Image.new("P", (5, 3), 2), gradient(6, 4)):
        pixels = to_rgb(image)
        assert pixels.dtype == np.uint8 and pixels.shape == (image.height, image.width, 3)
        assert np.array_equal(pixels, np.asarray(load_image(image)))
    assert (to_rgb(Image.new("RGBA", (4, 2), (10, 20, 30, 0))) == [10, 20, 30]).all()  # alpha dropped


# ---- stored inputs ----------------------------------------------------------------------------------


def test_store_exclusive_never_replaces_a_file_and_leaves_no_temporary(tmp_path):
    assert store_exclusive(tmp_path, "T1", "png", b"first") == "T1.png"
    second = store_exclusive(tmp_path, "T1", "png", b"second")
    assert second.startswith("T1-") and second.endswith(".png")
    assert (tmp_path / "T1.png").read_bytes() == b"first" and (tmp_path / second).read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["T1.png", second])


@pytest.fixture
def inputs(tmp_path):
    root = tmp_path / "data" / "inputs"
    root.mkdir(parents=True)
    return ImageInputs(root, max_bytes=64 << 10, max_pixels=1 << 20)


def test_a_relative_path_names_an_existing_file_and_is_not_copied(inputs):
    (inputs.root / "sub").mkdir()
    (inputs.root / "sub" / "cat.png").write_bytes(png(40, 24))
    resolved = run(inputs.resolve("./sub//cat.png"))
    assert resolved.existing == "sub/cat.png" and resolved.data is None and resolved.origin == "path"
    assert run(inputs.store(resolved, "T1")) == "sub/cat.png"
    assert sorted(p.name for p in inputs.root.rglob("*")) == ["cat.png", "sub"]
    run(inputs.discard(resolved, "sub/cat.png"))  # never deletes a client's own file
    assert (inputs.root / "sub" / "cat.png").exists()


def test_a_symlink_inside_the_input_folder_is_followed_to_its_real_name(inputs):
    (inputs.root / "real.png").write_bytes(png())
    os.symlink(inputs.root / "real.png", inputs.root / "alias.png")
    assert run(inputs.resolve("alias.png")).existing == "real.png"


def test_paths_that_lead_out_are_refused_symlinks_and_sibling_prefix_folders_included(inputs, tmp_path):
    data = inputs.root.parent
    (data / "inputs_evil").mkdir()
    (data / "inputs_evil" / "secret.png").write_bytes(png())
    (tmp_path / "outside.png").write_bytes(png())
    os.symlink(tmp_path / "outside.png", inputs.root / "leak.png")
    os.symlink(data / "inputs_evil", inputs.root / "leakdir")
    for value in ("../inputs_evil/secret.png", "leak.png", "leakdir/secret.png", str(tmp_path / "outside.png"),
                  "../../outside.png", "sub/../../outside.png", "a\x00.png"):
        with pytest.raises(ImageRejected, match="inside the input folder") as caught:
            run(inputs.resolve(value))
        assert str(tmp_path) not in str(caught.value)


@pytest.mark.parametrize("value, words", [
    ("missing.png", "neither a file"), ("sub", "neither a file"), ("not base64 at all!", "neither a file"),
    ("aGVsbG8gd29ybGQ=", "does not decode"), ("data:image/png;base64,aGVsbG8=", "does not decode"),
    ("data:image/png;base64,!!!", "valid base64"),
])
def test_values_that_are_no_file_and_no_image_are_refused(inputs, value, words):
    (inputs.root / "sub").mkdir()
    with pytest.raises(ImageRejected, match=words):
        run(inputs.resolve(value))


def test_base64_and_data_uri_images_decode(inputs):
    data = encode(gradient(40, 24), "JPEG")
    text = base64.b64encode(data).decode()  # JPEG base64 starts with "/9j/": not an absolute path
    for value in (text, "data:image/jpeg;base64," + text):
        resolved = run(inputs.resolve(value))
        assert resolved.data == data and resolved.info.extension == "jpg" and resolved.origin == "base64"


def test_too_large_files_base64_and_uploads_are_refused(inputs):
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(big), "PNG")
    assert len(data) > inputs.max_bytes
    (inputs.root / "big.png").write_bytes(data)
    for value, upload in (("big.png", None), (base64.b64encode(data).decode(), None), ("", data)):
        with pytest.raises(ImageTooLarge):
            run(inputs.resolve(value, upload))


def test_an_upload_and_an_image_path_together_are_refused(inputs):
    with pytest.raises(ImageRejected, match="not both"):
        run(inputs.resolve("cat.png", png()))


# ---- URLs (fake resolver and transport: no network) -------------------------------------------------


class FakeWeb:
    """DNS answers and HTTP responses by host; records every request the fetcher sends."""

    def __init__(self, dns: dict[str, list[str]], pages: dict[str, httpx.Response | callable]):
        self.dns = dns
        self.pages = pages
        self.requests: list[httpx.Request] = []
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.dns:
            raise OSError("no such host")
        return self.dns[host]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        page = self.pages[f"{request.headers['host']}{request.url.path}"]
        return await page(request) if callable(page) else page

    def inputs(self, root, **options) -> ImageInputs:
        values = dict(max_bytes=64 << 10, max_pixels=1 << 20, allow_url_fetch=True, fetch_timeout_s=2.0)
        values.update(options)
        return ImageInputs(root, resolver=self.resolve, transport=httpx.MockTransport(self.handle), **values)


PUBLIC = "93.184.216.34"


def test_a_url_is_fetched_from_the_checked_address_with_the_host_header(inputs):
    web = FakeWeb({"img.example.com": [PUBLIC]}, {"img.example.com/cat.png": httpx.Response(200, content=png())})
    resolved = run(web.inputs(inputs.root).resolve("https://img.example.com/cat.png"))
    assert resolved.origin == "url" and resolved.data == png()
    (request,) = web.requests
    assert request.url.host == PUBLIC and request.headers["host"] == "img.example.com"
    assert request.extensions["sni_hostname"] == "img.example.com"


@pytest.mark.parametrize("url, dns", [
    ("http://internal.example/a.png", {"internal.example": ["10.0.0.5"]}),
    ("http://localhost/a.png", {"localhost": ["127.0.0.1", "::1"]}),
    ("http://mixed.example/a.png", {"mixed.example": [PUBLIC, "169.254.169.254"]}),  # every address counts
    ("http://127.0.0.1:8080/a.png", {}),
    ("http://[::1]/a.png", {}),
    ("http://169.254.169.254/latest/meta-data", {}),
    ("http://2130706433/a.png", {"2130706433": ["127.0.0.1"]}),  # decimal IPv4, as the resolver reads it
])
def test_urls_that_lead_to_private_addresses_are_refused_without_a_request(inputs, url, dns):
    web = FakeWeb(dns, {})
    with pytest.raises(ImageRejected, match="only public addresses"):
        run(web.inputs(inputs.root).resolve(url))
    assert web.requests == []


def test_redirects_are_checked_hop_by_hop_and_limited(inputs):
    web = FakeWeb({"a.example": [PUBLIC], "b.example": [PUBLIC], "evil.example": ["192.168.0.1"]}, {
        "a.example/start": httpx.Response(302, headers={"location": "http://b.example/img.png"}),
        "b.example/img.png": httpx.Response(200, content=png()),
        "a.example/to-private": httpx.Response(301, headers={"location": "http://evil.example/x"}),
        "a.example/to-metadata": httpx.Response(307, headers={"location": "http://169.254.169.254/"}),
        "a.example/to-file": httpx.Response(302, headers={"location": "file:///etc/passwd"}),
        "a.example/loop": httpx.Response(302, headers={"location": "/loop"}),
    })
    fetcher = web.inputs(inputs.root)
    assert run(fetcher.resolve("http://a.example/start")).data == png()
    for path, words in (("to-private", "only public"), ("to-metadata", "only public"),
                        ("to-file", "http:// or https://"), ("loop", "redirects more than")):
        before = len(web.requests)
        with pytest.raises(ImageRejected, match=words):
            run(fetcher.resolve(f"http://a.example/{path}"))
        assert all(r.url.host == PUBLIC for r in web.requests[before:])


def test_url_size_status_time_and_dns_failures_are_refused(inputs):
    async def slow(request):
        await asyncio.sleep(5)
        return httpx.Response(200, content=png())

    async def chunks():
        for _ in range(100):
            yield b"\0" * 1024

    async def streamed(request):
        return httpx.Response(200, content=chunks())  # no Content-Length

    web = FakeWeb({"x.example": [PUBLIC]}, {
        "x.example/big": httpx.Response(200, content=b"\0" * (65 << 10)),
        "x.example/streamed": streamed,
        "x.example/missing": httpx.Response(404),
        "x.example/slow": slow,
        "x.example/text": httpx.Response(200, content=b"<html>hello</html>"),
    })
    fetcher = web.inputs(inputs.root, fetch_timeout_s=0.3)
    for path, error, words in (("big", ImageTooLarge, "byte limit"), ("streamed", ImageTooLarge, "byte limit"),
                               ("missing", ImageRejected, "HTTP 404"), ("slow", ImageRejected, "within 0.3 s"),
                               ("text", ImageRejected, "does not decode")):
        with pytest.raises(error, match=words):
            run(fetcher.resolve(f"http://x.example/{path}"))
    with pytest.raises(ImageRejected, match="does not resolve"):
        run(fetcher.resolve("http://nowhere.example/a.png"))


def test_urls_are_refused_while_fetching_is_off_and_trusted_networks_open_only_themselves(inputs):
    web = FakeWeb({"store.internal": ["10.1.2.3"]}, {"store.internal/a.png": httpx.Response(200, content=png())})
    with pytest.raises(ImageRejected, match="URLs are disabled"):
        run(web.inputs(inputs.root, allow_url_fetch=False).resolve("http://store.internal/a.png"))
    trusted = web.inputs(inputs.root, allowed_networks=parse_networks("10.1.0.0/16"))
    assert run(trusted.resolve("http://store.internal/a.png")).data == png()
    with pytest.raises(ImageRejected, match="loopback"):
        run(trusted.resolve("http://127.0.0.1/a.png"))


def test_a_url_checked_without_fetching_sends_no_request(inputs):
    web = FakeWeb({"x.example": [PUBLIC], "in.example": ["10.0.0.1"]}, {})
    fetcher = web.inputs(inputs.root)
    assert run(fetcher.resolve("http://x.example/a.png", fetch=False)) is None
    with pytest.raises(ImageRejected, match="private"):
        run(fetcher.resolve("http://in.example/a.png", fetch=False))
    assert web.requests == []


def test_fetch_policy_defaults_to_three_redirects():
    assert FetchPolicy(max_bytes=1).max_redirects == images.MAX_REDIRECTS == 3


# ---- through the app: image-to-video on a fake i2v model ---------------------------------------------


def assert_clean_error(response, status: int, tmp_path) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    assert str(tmp_path) not in response.text
    return detail


@pytest.fixture
def i2v(tmp_path):
    """An i2v app with traps around its input folder: a sibling `inputs_evil/`, a file outside the data folder and
    a symlink to it inside `inputs/`."""
    data_dir = tmp_path / "data"
    (data_dir / "inputs").mkdir(parents=True)
    (data_dir / "inputs_evil").mkdir()
    (data_dir / "inputs_evil" / "secret.png").write_bytes(png())
    (tmp_path / "outside.png").write_bytes(png())
    os.symlink(tmp_path / "outside.png", data_dir / "inputs" / "leak.png")
    with AppHarness(tmp_path, fake=FakeTritonClient(info=I2V_INFO), max_upload_bytes=256 << 10,
                    max_image_bytes=64 << 10) as harness:
        before = files_outside(tmp_path, harness.settings.data_dir)
        yield harness
        assert files_outside(tmp_path, harness.settings.data_dir) == before, "wrote outside the data folder"


def input_files(app) -> list[str]:
    return sorted(p.relative_to(app.settings.input_dir).as_posix() for p in app.settings.input_dir.rglob("*")
                  if p.name != "leak.png")


def test_an_uploaded_image_is_stored_under_the_task_id_and_its_pixels_reach_the_model(i2v):
    image = gradient(64, 32)
    answer = i2v.client.post("/v1/tasks/form", data={"prompt": "a cat", "infer_steps": "2", "task_id": "up-1"},
                             files={"image_file": ("../../evil name.png", encode(image), "image/png")})
    assert answer.status_code == 200, answer.text
    record = wait_status(i2v.client, "up-1")
    assert record["status"] == "completed", record
    assert record["message"]["image_path"] == "up-1.png" and input_files(i2v) == ["up-1.png"]
    # 64x32 (2:1) at about the default area 96x160 (15360 px): 80x176
    assert (record["message"]["height"], record["message"]["width"]) == (80, 176)
    _, inputs = i2v.fake.calls[-1]
    assert inputs["height"] == 80 and inputs["width"] == 176
    assert inputs["image"].dtype == np.uint8 and inputs["image"].shape == (32, 64, 3)
    assert np.array_equal(inputs["image"], np.asarray(image))


@pytest.mark.parametrize("form", ["bare", "data_uri"])
def test_base64_images_complete_and_keep_the_stored_input(i2v, form):
    data = encode(gradient(48, 48), "JPEG")
    text = base64.b64encode(data).decode()
    value = text if form == "bare" else "data:image/jpeg;base64," + text
    answer = i2v.client.post("/v1/tasks/", json={"image_path": value, "infer_steps": 1, "height": 64, "width": 64})
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["task_id"]
    record = wait_status(i2v.client, task_id)
    assert record["status"] == "completed" and record["message"]["image_path"] == f"{task_id}.jpg"
    assert (record["message"]["height"], record["message"]["width"]) == (64, 64)  # asked for: kept
    assert (i2v.settings.input_dir / f"{task_id}.jpg").read_bytes() == data
    assert text not in str(i2v.client.get("/v1/tasks/").json())


def test_a_path_in_the_input_folder_is_used_in_place(i2v):
    (i2v.settings.input_dir / "cats").mkdir(parents=True)
    (i2v.settings.input_dir / "cats" / "tom.png").write_bytes(png(32, 64))
    answer = i2v.client.post("/v1/tasks/", json={"image_path": "cats/tom.png", "infer_steps": 1})
    record = wait_status(i2v.client, answer.json()["task_id"])
    assert record["status"] == "completed" and record["message"]["image_path"] == "cats/tom.png"
    assert input_files(i2v) == ["cats", "cats/tom.png"]
    assert i2v.fake.calls[-1][1]["image"].shape == (64, 32, 3)


def test_an_i2v_server_refuses_a_task_without_an_image(i2v, tmp_path):
    for response in (i2v.client.post("/v1/tasks/", json={"prompt": "x"}),
                     i2v.client.post("/v1/tasks/", json={"prompt": "x", "image_path": ""}),
                     i2v.client.post("/v1/tasks/form", data={"prompt": "x"}, files={"image_file": ("", b"")})):
        assert assert_clean_error(response, 400, tmp_path) == I2V_NEEDS_IMAGE
    assert i2v.client.get("/v1/tasks/").json() == {}


BIG = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (160, 160, 3), dtype=np.uint8)))


@pytest.mark.parametrize("kind, value, status, words", [
    ("upload", b"not an image", 400, "does not decode"),
    ("upload", png()[:50], 400, "does not decode"),
    ("upload", BIG, 413, "byte limit"),
    ("upload", encode(Image.new("L", (5000, 5000)), "PNG"), 400, "pixel limit"),
    ("json", "../outside.png", 400, "inside the input folder"),
    ("json", "sub/../../outside.png", 400, "inside the input folder"),
    ("json", "/etc/passwd", 400, "inside the input folder"),
    ("json", "leak.png", 400, "inside the input folder"),
    ("json", "../inputs_evil/secret.png", 400, "inside the input folder"),
    ("json", "missing.png", 400, "neither a file"),
    ("json", base64.b64encode(b"hello world, not an image").decode(), 400, "does not decode"),
    ("json", base64.b64encode(BIG).decode(), 400, "byte limit"),
    ("json", "data:text/html;base64,PGgxPg==", 400, "data:image"),
    ("json", "http://example.com/cat.png", 400, "URLs are disabled"),
    ("json", "file:///etc/passwd", 400, "http:// or https://"),
    ("both", "cat.png", 400, "not both"),
], ids=["upload-garbage", "upload-truncated", "upload-too-large", "upload-too-many-pixels", "dotdot",
        "dotdot-inside-then-out", "absolute", "symlink-out", "sibling-prefix", "missing", "base64-not-image",
        "base64-too-large", "data-uri-not-image", "url-disabled", "file-scheme", "upload-and-path"])
def test_every_bad_image_input_is_a_one_line_4xx_and_leaves_no_file(i2v, tmp_path, kind, value, status, words):
    data_dir = i2v.settings.data_dir
    before = input_files(i2v)
    if kind == "json":
        response = i2v.client.post("/v1/tasks/", json={"image_path": value})
    elif kind == "both":
        response = i2v.client.post("/v1/tasks/form", data={"image_path": value},
                                   files={"image_file": ("cat.png", png(), "image/png")})
    else:
        response = i2v.client.post("/v1/tasks/form", data={"prompt": "x"},
                                   files={"image_file": ("cat.png", value, "image/png")})
    assert words in assert_clean_error(response, status, tmp_path)
    assert input_files(i2v) == before and i2v.client.get("/v1/tasks/").json() == {}
    assert not any(p.name.startswith(".") for p in data_dir.rglob("*")), "a temporary file was left"


def test_a_url_to_a_private_address_is_refused_while_fetching_is_on(tmp_path):
    with AppHarness(tmp_path, fake=FakeTritonClient(info=I2V_INFO), allow_url_fetch=True) as app:
        for url in ("http://127.0.0.1:9/cat.png", "http://[::1]/cat.png", "http://169.254.169.254/latest/",
                    "http://localhost/cat.png", "http://10.0.0.1/cat.png"):
            detail = assert_clean_error(app.client.post("/v1/tasks/", json={"image_path": url}), 400, tmp_path)
            assert "only public addresses" in detail
        assert input_files(app) == []


def test_a_fetched_url_completes_and_is_stored(tmp_path):
    with AppHarness(tmp_path, fake=FakeTritonClient(info=I2V_INFO), allow_url_fetch=True) as app:
        web = FakeWeb({"img.example": [PUBLIC]}, {"img.example/cat.webp": httpx.Response(
            200, content=encode(gradient(32, 32), "WEBP"))})
        app.service.images = web.inputs(app.settings.input_dir)
        answer = app.client.post("/v1/tasks/", json={"image_path": "http://img.example/cat.webp", "infer_steps": 1})
        record = wait_status(app.client, answer.json()["task_id"])
        assert record["status"] == "completed" and record["message"]["image_path"] == f"{record['task_id']}.webp"
        assert (record["message"]["height"], record["message"]["width"]) == (128, 128)


def test_a_refused_submission_removes_the_image_it_stored(i2v, tmp_path):
    first = i2v.client.post("/v1/tasks/form", data={"task_id": "dup", "infer_steps": "1"},
                            files={"image_file": ("a.png", png(), "image/png")})
    assert first.status_code == 200
    wait_status(i2v.client, "dup")
    again = i2v.client.post("/v1/tasks/form", data={"task_id": "dup"},
                            files={"image_file": ("b.png", encode(gradient(16, 16)), "image/png")})
    assert "already exists" in assert_clean_error(again, 400, tmp_path)
    assert input_files(i2v) == ["dup.png"] and (i2v.settings.input_dir / "dup.png").read_bytes() == png()


def test_a_full_queue_leaves_no_image_behind(tmp_path):
    with AppHarness(tmp_path, fake=FakeTritonClient(info=I2V_INFO, step_delay_s=0.05), max_queue_size=0) as app:
        text = base64.b64encode(png()).decode()
        running = app.client.post("/v1/tasks/", json={"image_path": text, "infer_steps": 200}).json()["task_id"]
        refused = app.client.post("/v1/tasks/", json={"image_path": text})
        assert refused.status_code == 429
        assert input_files(app) == [f"{running}.png"]
        app.client.delete("/v1/tasks/running")


def test_a_task_queued_while_triton_was_down_is_checked_when_it_starts(tmp_path):
    fake = FakeTritonClient(info=I2V_INFO, ready=False)
    with AppHarness(tmp_path, fake=fake) as app:
        with_image = app.client.post("/v1/tasks/", json={"image_path": base64.b64encode(png(64, 32)).decode(),
                                                          "infer_steps": 1}).json()["task_id"]
        without = app.client.post("/v1/tasks/", json={"prompt": "t2v", "infer_steps": 1}).json()["task_id"]
        fake.ready = True
        record = wait_status(app.client, with_image)
        assert record["status"] == "completed", record
        assert (record["message"]["height"], record["message"]["width"]) == (80, 176)  # derived at start
        failed = wait_status(app.client, without)
        assert failed["status"] == "failed" and failed["error"] == I2V_NEEDS_IMAGE


def test_an_image_queued_for_what_turns_out_a_t2v_model_fails_with_the_reason(tmp_path):
    fake = FakeTritonClient(ready=False)
    with AppHarness(tmp_path, fake=fake) as app:
        task_id = app.client.post("/v1/tasks/", json={"image_path": base64.b64encode(png()).decode()}).json()["task_id"]
        fake.ready = True
        record = wait_status(app.client, task_id)
        assert record["status"] == "failed" and record["error"] == I2V_NOT_SERVED
        assert fake.calls == []


def test_an_input_removed_before_the_task_runs_fails_the_task_cleanly(tmp_path):
    fake = FakeTritonClient(info=I2V_INFO, ready=False)
    with AppHarness(tmp_path, fake=fake) as app:
        task_id = app.client.post("/v1/tasks/", json={"image_path": base64.b64encode(png()).decode(),
                                                       "height": 64, "width": 64}).json()["task_id"]
        (app.settings.input_dir / f"{task_id}.png").unlink()
        fake.ready = True
        record = wait_status(app.client, task_id)
        assert record["status"] == "failed" and "input image is missing" in record["error"]
        assert str(tmp_path) not in record["error"]


def test_t2v_server_refuses_images_but_checks_urls_without_fetching(tmp_path):
    with AppHarness(tmp_path, allow_url_fetch=True) as app:
        detail = assert_clean_error(app.client.post("/v1/tasks/", json={"image_path": "http://127.0.0.1/a.png"}),
                                    400, tmp_path)
        assert "loopback" in detail
        web = FakeWeb({"img.example": [PUBLIC]}, {})
        app.service.images = web.inputs(app.settings.input_dir)
        response = app.client.post("/v1/tasks/", json={"image_path": "http://img.example/a.png"})
        assert assert_clean_error(response, 400, tmp_path) == I2V_NOT_SERVED
        assert web.requests == [] and input_files(app) == []


def test_metadata_of_an_i2v_model_lists_the_image_inputs_and_limits(i2v):
    metadata = i2v.client.get("/v1/service/metadata").json()
    assert metadata["model_kind"] == "i2v" and "image_path" in metadata["supported_inputs"]
    assert metadata["limits"]["max_image_bytes"] == 64 << 10 and metadata["limits"]["image_url_fetch"] is False


def test_image_settings_come_from_flags_and_are_checked(capsys):
    settings = parse_settings(["--max-image-bytes", "2048", "--max-image-pixels", "100", "--allow-url-fetch",
                               "--url-fetch-allow-networks", "10.0.0.0/8,127.0.0.1", "--url-fetch-timeout", "3"])
    assert settings.max_image_bytes == 2048 and settings.max_image_pixels == 100 and settings.allow_url_fetch
    assert settings.url_fetch_timeout == 3.0 and settings.url_fetch_allow_networks == "10.0.0.0/8,127.0.0.1"
    assert parse_settings([]).allow_url_fetch is False
    with pytest.raises(SystemExit):
        parse_settings(["--url-fetch-allow-networks", "intranet"])
    assert "not an IP network" in capsys.readouterr().err
