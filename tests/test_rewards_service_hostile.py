"""The real reward service under hostile input: malformed, oversized, slow and unauthenticated requests each get
their JSON error, and well-formed requests made during and after a flood of them still get correct rewards."""
import json
import threading
import time

import pytest
import torch

from flowgrpo.rewards.http_client import image_to_png_b64
from flowgrpo.rewards.remote import RemoteReward
from flowgrpo.rewards.server import make_server
from tests.service_helpers import Brightness, RawConnection, post_bytes, quantised

READ_TIMEOUT = 0.5
MAX_BYTES = 50_000
MAX_PIXELS = 10_000


@pytest.fixture
def server():
    server = make_server(Brightness(), token="s3cret", max_batch=4, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS,
                         read_timeout=READ_TIMEOUT).start()
    yield server
    server.close()


def good_body(n=3, seed=0, size=8) -> tuple[bytes, list[float]]:
    images = quantised(n, size, size, seed=seed)
    body = json.dumps({"images": [image_to_png_b64(img) for img in images], "prompts": ["p"] * n}).encode()
    return body, images.mean(dim=(1, 2, 3)).tolist()


def assert_scores_correctly(server, seed=0):
    images = quantised(5, seed=seed)
    out = RemoteReward(server.url, token="s3cret", batch_size=2, retries=0)(images, ["p"] * 5)
    assert torch.allclose(out, images.mean(dim=(1, 2, 3)), atol=1e-6)


def exchange(server, data: bytes, drip_s: float = 0.0) -> tuple[int, dict, dict, float, bool]:
    """Send raw bytes; (status, headers, JSON body, seconds to the answer, whether the server then hung up)."""
    conn = RawConnection(server.address)
    start = time.monotonic()
    try:
        conn.send(data, drip_s)
        status, headers, body = conn.response()
        return status, headers, body, time.monotonic() - start, conn.closed_by_server()
    finally:
        conn.close()


def test_missing_or_wrong_token_is_401(server):
    body, _ = good_body()
    for token in (None, "wrong", "s3cre", "S3CRET"):
        status, headers, answer, _, closed = exchange(server, post_bytes(body, token=token))
        assert status == 401 and headers["www-authenticate"] == "Bearer" and closed
        assert answer == {"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"}
    status, _, answer, _, _ = exchange(server, b"GET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
    assert status == 200 and answer["reward"] == "brightness"  # health needs no token
    assert_scores_correctly(server)


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello sent to plain HTTP
    b"POST /score HTTP/1.1\r\nHost: r\r\nContent-Length: lots\r\n\r\n",
    b"POST /score HTTP/1.1\r\nHost: r\r\nno colon here\r\n\r\n",
    b"POST /score HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nContent-Length: 9\r\n\r\n",
])
def test_unparseable_http_is_json_400(server, request_bytes):
    status, headers, answer, _, closed = exchange(server, request_bytes)
    assert status == 400 and headers["content-type"] == "application/json" and closed
    assert answer["error"].startswith("malformed HTTP request: the request line and headers must be HTTP/1.1")
    assert_scores_correctly(server)


def test_malformed_bodies_are_400(server):
    nested = b"[" * 20_000 + b"]" * 20_000  # deeper than the JSON parser recurses
    for body, message in [(nested, "malformed request: maximum recursion depth exceeded"),
                          (b"\xff\xfe{", "malformed request: "), (b"", "malformed request: Expecting value"),
                          (json.dumps({"images": "x" * 100, "prompts": []}).encode(),
                           "malformed request: 'images' must be a non-empty")]:
        status, _, answer, _, _ = exchange(server, post_bytes(body))
        assert status == 400 and answer["error"].startswith(message), (body[:20], answer)
    assert_scores_correctly(server)


def test_oversized_bodies_are_413_even_with_a_lying_content_length(server):
    limit = f"exceeds the limit of {MAX_BYTES} bytes (send fewer images per request)"
    body, _ = good_body(n=16, seed=1, size=32)  # incompressible PNGs
    assert len(body) > MAX_BYTES
    status, _, answer, _, closed = exchange(server, post_bytes(body))  # read and discarded, then answered
    assert status == 413 and answer["error"] == f"body of {len(body)} bytes {limit}" and closed
    # Claims a terabyte, sends 10 bytes: refused at once, without waiting for (or reading) the body.
    status, _, answer, seconds, closed = exchange(server, post_bytes(b"0123456789", length=10**12))
    assert status == 413 and answer["error"] == f"body of {10**12} bytes {limit}" and closed
    assert seconds < READ_TIMEOUT
    # Claims 500 kB, sends 10 bytes: the server waits for the body to discard it until the read timeout, no longer.
    status, _, answer, seconds, closed = exchange(server, post_bytes(b"0123456789", length=10 * MAX_BYTES))
    assert status == 413 and answer["error"] == f"body of {10 * MAX_BYTES} bytes {limit}" and closed
    assert READ_TIMEOUT * 0.9 < seconds < READ_TIMEOUT + 1.0
    assert_scores_correctly(server)


def test_images_decoding_to_too_many_pixels_are_413(server):
    flat = image_to_png_b64(torch.full((3, 64, 64), 0.5))  # 4096 pixels in about 100 bytes of PNG
    body = json.dumps({"images": [flat] * 3, "prompts": ["p"] * 3}).encode()
    assert len(body) < 1000
    status, _, answer, _, closed = exchange(server, post_bytes(body))
    assert status == 413 and closed
    assert answer["error"] == ("images[:3] decode to 12288 pixels, over the limit of 10000 per request (send fewer or "
                               "smaller images per request)")
    body = json.dumps({"images": [flat] * 2, "prompts": ["p"] * 2}).encode()
    status, _, answer, _, _ = exchange(server, post_bytes(body))
    assert status == 200 and answer["rewards"] == pytest.approx([128 / 255] * 2)


def test_content_length_shorter_than_the_body_frames_the_request(server):
    """The server reads exactly Content-Length bytes, however much follows: the request is scored, and the bytes
    after it (more than --max-bytes) are a malformed next request, refused before they are buffered."""
    body, expected = good_body()
    conn = RawConnection(server.address)
    conn.send(post_bytes(body) + b"{" * (2 * MAX_BYTES))
    status, _, answer = conn.response()
    assert status == 200 and answer["rewards"] == pytest.approx(expected, abs=1e-6)
    status, _, answer = conn.response()
    assert status == 400 and answer["error"].startswith("malformed HTTP request") and conn.closed_by_server()
    conn.close()
    assert_scores_correctly(server)


def test_no_content_length_is_411(server):
    status, _, answer, _, closed = exchange(
        server, b"POST /score HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer s3cret\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\n\r\n")
    assert status == 411 and answer == {"error": "a Content-Length header (a byte count) is required"} and closed


def test_wrong_paths_and_methods_are_404_and_405(server):
    body, _ = good_body()
    status, _, answer, _, _ = exchange(server, post_bytes(body, path="/predict"))
    assert status == 404 and answer["error"] == "unknown path /predict; use GET /health or POST /score"
    status, headers, answer, _, _ = exchange(server, b"GET /score HTTP/1.1\r\nHost: r\r\n\r\n")
    assert status == 405 and headers["allow"] == "POST" and "use GET /health or POST /score" in answer["error"]


HEADERS_TOO_SLOW = {"error": f"request headers not received within {READ_TIMEOUT:g} s"}


def test_silent_connection_is_408_after_the_read_timeout(server):
    conn = RawConnection(server.address)
    start = time.monotonic()
    status, _, answer = conn.response()
    assert status == 408 and answer == HEADERS_TOO_SLOW and conn.closed_by_server()
    assert READ_TIMEOUT * 0.9 < time.monotonic() - start < READ_TIMEOUT + 1.0
    conn.close()


def test_headers_sent_byte_by_byte_are_408_at_the_read_timeout(server):
    """Each byte arrives well within the timeout, but the headers as a whole do not: trickling does not extend it."""
    body, _ = good_body()
    status, _, answer, seconds, closed = exchange(server, post_bytes(body), drip_s=0.02)
    assert status == 408 and answer == HEADERS_TOO_SLOW and closed
    assert READ_TIMEOUT * 0.9 < seconds < READ_TIMEOUT + 1.0


def test_body_held_open_is_408(server):
    body, _ = good_body()
    request = post_bytes(body)
    conn = RawConnection(server.address)
    start = time.monotonic()
    conn.send(request[:-len(body) // 2])  # headers and half the body, then nothing
    status, _, answer = conn.response()
    assert status == 408 and answer == {"error": f"request body not received within {READ_TIMEOUT:g} s"}
    assert conn.closed_by_server() and time.monotonic() - start < READ_TIMEOUT + 1.0
    conn.close()
    assert_scores_correctly(server)


def test_kept_alive_connection_gets_the_header_deadline_again(server):
    body, expected = good_body()
    conn = RawConnection(server.address)
    conn.send(post_bytes(body))
    status, _, answer = conn.response()
    assert status == 200 and answer["rewards"] == pytest.approx(expected, abs=1e-6)
    start = time.monotonic()
    conn.send(post_bytes(body), drip_s=0.02)  # the next request on the same connection, trickled
    status, _, answer = conn.response()
    assert status == 408 and answer == HEADERS_TOO_SLOW
    assert READ_TIMEOUT * 0.9 < time.monotonic() - start < READ_TIMEOUT + 1.0
    conn.close()


def test_service_keeps_answering_under_a_flood(server):
    """A burst of every kind of bad request at once — 200 silent connections, 20 byte-by-byte senders, and 4 threads
    each of garbage, unauthenticated, oversized, lying-Content-Length and malformed-JSON requests — while one client
    scores well-formed batches. Every bad request gets its status, every good one the right rewards."""
    body, _ = good_body()
    kinds = {  # name -> (request bytes, expected status)
        "garbage": (b"\x00\xffGARBAGE\r\n\r\n", 400),
        "no_token": (post_bytes(body, token=None), 401),
        "oversized": (post_bytes(b"x" * (MAX_BYTES + 1)), 413),
        "lying_length": (post_bytes(b"x" * 100, length=10**12), 413),
        "bad_json": (post_bytes(b"{\"images\": [1, 2"), 400),
    }
    statuses: dict[str, list[int]] = {name: [] for name in [*kinds, "silent", "drip"]}
    good: list[bool] = []
    lock = threading.Lock()

    def record(name, fn):
        try:
            status = fn()
        except OSError as exc:  # a reset or refused connection would be a failure of the server
            status = type(exc).__name__
        with lock:
            statuses[name].append(status)

    def bad(name):
        for _ in range(25):
            record(name, lambda: exchange(server, kinds[name][0])[0])

    def hold(conn):
        record("silent", lambda: conn.response()[0])

    def drip():
        record("drip", lambda: exchange(server, post_bytes(body), drip_s=0.02)[0])

    def score_well_formed():  # until the flood is over, and at least 10 times
        client = RemoteReward(server.url, token="s3cret", batch_size=3, retries=0)
        while len(good) < 10 or any(t.is_alive() for t in threads[:-1]):
            images = quantised(6, seed=len(good))
            out = client(images, ["p"] * 6)
            good.append(torch.allclose(out, images.mean(dim=(1, 2, 3)), atol=1e-6))

    silent = [RawConnection(server.address) for _ in range(200)]
    threads = [threading.Thread(target=hold, args=(c,)) for c in silent]
    threads += [threading.Thread(target=drip) for _ in range(20)]
    threads += [threading.Thread(target=bad, args=(name,)) for name in kinds for _ in range(4)]
    threads.append(threading.Thread(target=score_well_formed))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for c in silent:
        c.close()
    assert len(good) >= 10 and all(good)
    assert statuses["silent"] == [408] * 200 and statuses["drip"] == [408] * 20
    for name, (_, expected) in kinds.items():
        assert statuses[name] == [expected] * 100, (name, sorted(set(map(str, statuses[name]))))
    assert_scores_correctly(server, seed=11)
