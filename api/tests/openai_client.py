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
try:
    client.images.generate(model=model, prompt="a cat", stream=True, partial_images=2)
    check("partial images are refused while providers send no previews", False)
except openai.BadRequestError as e:
    check("partial images are refused (param == 'partial_images')", e.param == "partial_images")

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
