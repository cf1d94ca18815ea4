"""The official `openai` Python client against a pixmarket requester node's API.

Run by cli/tests/api.rs (`openai_python_client_buys_through_a_requester_node`) with
PIXMARKET_API_BASE (http://HOST:PORT/v1) and PIXMARKET_API_TOKEN (the node's api.token).
Exits non-zero, with the failed check, on the first thing that is not as documented.
"""

import base64
import os
import struct
import sys
import time
import urllib.request
import zlib

import openai

BASE = os.environ["PIXMARKET_API_BASE"]
TOKEN = os.environ["PIXMARKET_API_TOKEN"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(width, height, pixel):
    """A PNG written with the standard library: `pixel(x, y)` gives RGBA bytes."""
    rows = b"".join(
        b"\x00" + b"".join(pixel(x, y) for x in range(width)) for y in range(height)
    )

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def decode_png(data):
    """Decodes an 8-bit RGB or RGBA PNG (what the node sends) with the standard library:
    checks every chunk's CRC, inflates the image data and undoes each row's filter. Returns
    (width, height, channels, pixel bytes)."""
    assert data[:8] == PNG_MAGIC, "not a PNG"
    at, idat, header = 8, b"", None
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        at += 12 + length
    width, height, depth, color = header[:4]
    assert depth == 8 and color in (2, 6), f"not 8-bit RGB(A): depth {depth}, color {color}"
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    assert len(raw) == height * (stride + 1), "image data of the wrong length"
    out, prev = bytearray(), bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            else:
                assert kind == 0, f"unknown PNG filter {kind}"
        out += line
        prev = line
    return width, height, channels, bytes(out)


def size_of(data):
    assert data[:8] == PNG_MAGIC, "not a PNG"
    return struct.unpack(">II", data[16:24])


START = time.monotonic()


def check(what, condition):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what} ({time.monotonic() - START:.1f} s)")


client = openai.OpenAI(base_url=BASE, api_key=TOKEN, max_retries=0, timeout=300)

# The market's models appear once the provider's advert has reached the requester node.
model = None
for _ in range(1800):
    models = client.models.list()
    if models.data:
        model = models.data[0].id
        break
    time.sleep(0.1)
check("GET /v1/models lists the provider's model", model is not None)

r = client.images.generate(model=model, prompt="a red circle", size="64x64", response_format="b64_json")
image = base64.b64decode(r.data[0].b64_json)
check("b64_json is a 64x64 PNG", size_of(image) == (64, 64))
extra = r.model_extra["pixmarket"]
check("the response carries the metered cost and the receipt", int(extra["cost"]["micro"]) > 0 and extra["receipt"])

r = client.images.generate(model=model, prompt="a blue square", response_format="url")
request = urllib.request.Request(r.data[0].url, headers={"Authorization": f"Bearer {TOKEN}"})
with urllib.request.urlopen(request) as answer:
    check("the url serves the PNG", size_of(answer.read()) == (64, 64))

init = png(64, 64, lambda x, y: bytes([200, 40, 40, 255]))
# OpenAI's mask: transparent where the picture is to be painted (here the left half).
mask = png(64, 64, lambda x, y: bytes([0, 0, 0, 0 if x < 32 else 255]))
r = client.images.edit(
    model=model,
    image=("init.png", init, "image/png"),
    mask=("mask.png", mask, "image/png"),
    prompt="a yellow star",
)
check("an edit with a mask gives a 64x64 PNG", size_of(base64.b64decode(r.data[0].b64_json)) == (64, 64))

events = list(client.images.generate(model=model, prompt="a green triangle", size="64x64", stream=True))
check(
    "a stream ends with image_generation.completed carrying the PNG",
    events
    and events[-1].type == "image_generation.completed"
    and size_of(base64.b64decode(events[-1].b64_json)) == (64, 64),
)
# Partial images: previews the provider decodes from the latents while it denoises, passed
# through the requester node. 8 steps and 3 previews: after steps 2, 4 and 6 (never the last).
events = list(
    client.images.generate(
        model=model,
        prompt="a green triangle",
        size="64x64",
        stream=True,
        partial_images=3,
        extra_body={"num_inference_steps": 8},
    )
)
partials = [e for e in events if e.type == "image_generation.partial_image"]
check(
    "a stream with partial_images=3 sends 3 partial images, indexed 0..2, before the completed image",
    [e.partial_image_index for e in partials] == [0, 1, 2]
    and [e.type for e in events[:3]] == ["image_generation.partial_image"] * 3
    and events[-1].type == "image_generation.completed",
)
decoded = [decode_png(base64.b64decode(e.b64_json)) for e in partials]
check(
    "each partial image decodes to a 16x16 RGB picture (a 64x64 image shrunk by 4)",
    all((w, h, c, len(px)) == (16, 16, 3, 16 * 16 * 3) for w, h, c, px in decoded),
)
check(
    "the partial images are pictures (not one flat colour) and change from step to step",
    all(len(set(px)) > 8 for _, _, _, px in decoded)
    and decoded[0][3] != decoded[1][3]
    and decoded[1][3] != decoded[2][3],
)
steps = [e.model_extra["pixmarket"]["step"] for e in partials]
check(f"the previews come at steps 2, 4 and 6 of 8 (got {steps})", steps == [2, 4, 6])
final = decode_png(base64.b64decode(events[-1].b64_json))
check("the completed image is the 64x64 image", final[:2] == (64, 64))

try:
    client.images.generate(model=model, prompt="a cat", stream=True, partial_images=4)
    check("partial_images=4 is refused", False)
except openai.BadRequestError as e:
    check("partial_images above 3 is BadRequestError with param == 'partial_images'", e.param == "partial_images")

try:
    client.images.generate(model=model, prompt="a cat", size="100x100")
    check("a bad size is refused", False)
except openai.BadRequestError as e:
    check("a bad size is BadRequestError with param == 'size'", e.param == "size")

try:
    openai.OpenAI(base_url=BASE, api_key="not-the-token", max_retries=0).models.list()
    check("a wrong token is refused", False)
except openai.AuthenticationError:
    check("a wrong token is an AuthenticationError", True)

print("all openai client checks passed")
