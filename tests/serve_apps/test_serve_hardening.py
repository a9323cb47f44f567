"""Hardening of the Serve app (issue 17), through real HTTP on 127.0.0.1: the image-URL allow-list (ports,
names that lead to loopback addresses, slow, cut and oversized bodies, URLs that parse two ways), the Host
and Origin checks against DNS rebinding and cross-site posts, and `pixelray serve` stopped by a signal
leaving no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests

from pixelray.shapes import caption_correct
from pixelray.testing import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "examples" / "shapes"
KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAPTIONS = {row["image"]: row for row in map(json.loads, (SHAPES / "captions.jsonl").read_text().splitlines())}
IMAGE = "images/000002.png"
MAX_IMAGE_BYTES = 200_000
FETCH_TIMEOUT_S = 3.0  # image_url_timeout_s
STALL_S = 30  # how long the slow server holds a half-sent body


def serve_http(handler) -> tuple[ThreadingHTTPServer, int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class Awkward(BaseHTTPRequestHandler):
    """/half.png sends half its body and stalls, /cut.png half and closes, /big.png more than the limit
    (no Content-Length: the reader must count)."""

    protocol_version = "HTTP/1.1"
    stop = threading.Event()

    def do_GET(self):
        body = (SHAPES / IMAGE).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path == "/big.png":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body * (MAX_IMAGE_BYTES // len(body) + 2))
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if self.path == "/half.png":
            self.stop.wait(STALL_S)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origins():
    """Three servers on 127.0.0.1: the example images on an allow-listed port, the same images on a port
    that is not listed, and the awkward one."""
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    handler = partial(quiet, directory=str(SHAPES))
    (listed, listed_port), (other, other_port), (awkward, awkward_port) = \
        serve_http(handler), serve_http(handler), serve_http(Awkward)
    yield {"listed": listed_port, "other": other_port, "awkward": awkward_port}
    Awkward.stop.set()
    for s in (listed, other, awkward):
        s.shutdown()


@pytest.fixture(scope="module")
def server(serve_url, origins):
    """The app with the bundled model, a key, and an allow-list of: 127.0.0.1 on ports 80/443 only, two
    listed ports of 127.0.0.1, and localhost (a name: its loopback address is refused) on every form."""
    from ray import serve

    from pixelray.serve_apps.vlm import build_app

    app = build_app({
        "models": [{"name": "shapes-demo", "device": "cpu", "num_cpus": 0.25, "max_batch_size": 4}],
        "api_key": KEY, "max_image_bytes": MAX_IMAGE_BYTES, "image_url_timeout_s": FETCH_TIMEOUT_S,
        "image_url_hosts": ["127.0.0.1", f"127.0.0.1:{origins['listed']}", f"127.0.0.1:{origins['awkward']}",
                            "localhost", f"localhost:{origins['listed']}"],
        "allowed_hosts": ["pixelray.internal"],
    })
    serve.run(app, name="hardening", route_prefix="/")
    yield serve_url
    serve.delete("hardening")


def chat_completion(url: str, body, headers: dict | None = None) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}/v1/chat/completions", data=data, timeout=60,
                         headers={**AUTH, "Content-Type": "application/json", **(headers or {})})


def with_image_url(url: str) -> dict:
    return {"model": "shapes-demo", "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]}]}


# --- the image-URL allow-list -------------------------------------------------------------------

def test_a_listed_ip_and_port_is_fetched(server, origins):
    r = chat_completion(server, with_image_url(f"http://127.0.0.1:{origins['listed']}/{IMAGE}"))
    assert r.status_code == 200, r.text
    assert caption_correct(r.json()["choices"][0]["message"]["content"], CAPTIONS[IMAGE]["shapes"])


def test_a_host_listed_without_port_is_fetched_on_80_and_443_only(server, origins):
    r = chat_completion(server, with_image_url(f"http://127.0.0.1:{origins['other']}/{IMAGE}"))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "url_not_allowed" and f"port {origins['other']}" in error["message"]


def test_a_listed_name_that_resolves_to_loopback_is_refused(server, origins):
    """`localhost` and `localhost:PORT` are listed, but as a name: its 127.0.0.1 is not fetched (only an
    entry that is the IP address itself reaches a loopback or private address)."""
    for url in (f"http://localhost:{origins['listed']}/{IMAGE}", f"http://LocalHost.:{origins['listed']}/{IMAGE}"):
        r = chat_completion(server, with_image_url(url))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "url_not_allowed" and "loopback" in error["message"], error


def test_a_slow_body_times_out_and_a_cut_one_is_incomplete(server, origins):
    base = f"http://127.0.0.1:{origins['awkward']}"
    start = time.monotonic()
    slow = chat_completion(server, with_image_url(f"{base}/half.png"))
    took = time.monotonic() - start
    assert slow.status_code == 400, slow.text
    error = slow.json()["error"]
    assert error["code"] == "fetch_failed" and "timed out" in error["message"], error
    assert took < FETCH_TIMEOUT_S + 7  # bounded by the fetch timeout, not by the server's stall
    cut = chat_completion(server, with_image_url(f"{base}/cut.png"))
    assert cut.status_code == 400 and cut.json()["error"]["code"] == "fetch_failed", cut.text
    assert "incomplete" in cut.json()["error"]["message"]
    big = chat_completion(server, with_image_url(f"{base}/big.png"))
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large", big.text


@pytest.mark.parametrize("url", [
    "http://127.0.0.1\\@example.com/x.png",  # a backslash: two parsers, two hosts
    "http://127.0.0.1:99999/x.png",  # a port out of range
    "http://127.0.0.1:port/x.png",
    "http://xn--/x.png",  # a name that is not valid IDNA
    "http://a..b/x.png",
    "http://user:secret@127.0.0.1/x.png",  # user info
    "http://[::1/x.png",
    "http://127.0.0.1/x y.png",
])
def test_malformed_urls_are_400s(server, url):
    r = chat_completion(server, with_image_url(url))
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image_url", r.text


def test_the_allow_list_is_checked_at_build_time():
    from pixelray.serve_apps.settings import AppArgs

    for entry in ("a/b", "host:99999", "user@host", "a..b"):
        with pytest.raises(ValueError, match="image_url_hosts"):
            AppArgs.model_validate({"image_url_hosts": [entry]})
    with pytest.raises(ValueError, match="allowed_hosts"):
        AppArgs.model_validate({"allowed_hosts": ["bad name"]})


# --- Host and Origin ----------------------------------------------------------------------------

def test_a_foreign_host_header_is_refused(server):
    """DNS rebinding: a web page at evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    port = server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost@evil.example"):
        r = requests.get(f"{server}/v1/models", headers={**AUTH, "Host": host}, timeout=10)
        assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", (host, r.text)
    r = chat_completion(server, "{}", headers={"Host": "evil.example"})
    assert r.status_code == 421 and r.json()["error"]["type"] == "invalid_request_error"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "pixelray.internal", f"PIXELRAY.internal:{port}"):
        r = requests.get(f"{server}/v1/models", headers={**AUTH, "Host": host}, timeout=10)
        assert r.status_code == 200, (host, r.text)
    assert requests.get(f"{server}/health", headers={"Host": "evil.example"}, timeout=10).status_code == 200


def test_a_post_from_a_foreign_origin_is_refused(server):
    for origin in ("http://evil.example", f"http://evil.example:{server.rsplit(':', 1)[1]}", "null"):
        r = chat_completion(server, "{}", headers={"Origin": origin})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", (origin, r.text)
    r = requests.post(f"{server}/chat", json={"message": "hi"}, headers={**AUTH, "Origin": "https://evil.example"},
                      timeout=10)
    assert r.status_code == 403
    # the server's own origins pass (to the body's own error), and reading is not a state change
    for origin in ("http://localhost:3000", server, "https://pixelray.internal"):
        r = chat_completion(server, "{not json", headers={"Origin": origin})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (origin, r.text)
    r = requests.get(f"{server}/v1/models", headers={**AUTH, "Origin": "http://evil.example"}, timeout=10)
    assert r.status_code == 200


# --- `pixelray serve` stopped by a signal -------------------------------------------------------

def leftovers(session: int, ray_tmp: str) -> list[str]:
    """Running processes of the session, or of the Ray instance whose temp dir is `ray_tmp`."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) == session or p.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def wait_for(check, timeout: float, what: str):
    return wait_until(check, timeout, what, retry_on=(requests.RequestException, psutil.Error), every=0.3)


@pytest.mark.slow
@pytest.mark.parametrize("moment,signum", [
    pytest.param("starting", signal.SIGINT, id="ctrl-c-while-ray-starts"),
    pytest.param("serving", signal.SIGINT, id="ctrl-c-while-serving"),
    pytest.param("serving", signal.SIGTERM, id="sigterm-while-serving"),
])
def test_a_stopped_server_leaves_no_process(moment, signum):
    """`pixelray serve --config local.yaml`, stopped by Ctrl-C (SIGINT to its process group) while Ray starts
    or while it serves, or by SIGTERM: it exits within 30 s, with status 0, and leaves no process: no raylet,
    agent, controller, proxy or replica (a Ctrl-C while Ray started used to leave its agents running)."""
    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="prs-", dir="/tmp")  # short: Ray's socket paths must fit
    config = (ROOT / "serve_apps/configs/local.yaml").read_text().replace("port: 8000", f"port: {port}")
    (Path(ray_tmp) / "serve.yaml").write_text(config)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled")
    with open(Path(ray_tmp) / "serve.log", "w") as log:  # a pipe nobody reads could fill up and stall it
        proc = subprocess.Popen([sys.executable, "-m", "pixelray.cli", "serve", "--config", f"{ray_tmp}/serve.yaml"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if moment == "starting":  # Ray's node is up to its agents, the app not yet deployed
            wait_for(lambda: any("Agent" in line for line in leftovers(proc.pid, ray_tmp)), 120, "Ray's agents")
        else:
            wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 180,
                     "pixelray serve")
        stopped = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        else:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - stopped
        time.sleep(1)  # the last of them, killed, to be collected
        left = leftovers(proc.pid, ray_tmp)
        assert not left, f"{len(left)} processes left {took:.0f} s after the signal:\n" + "\n".join(left)
        assert proc.returncode == 0, (Path(ray_tmp) / "serve.log").read_text()[-3000:]
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        for line in leftovers(proc.pid, ray_tmp):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_connection_goes_to_the_checked_addresses(origins, monkeypatch):
    """A name is resolved once, checked, and the client connects to those addresses: here a name that no DNS
    knows (a later lookup, DNS rebinding, would answer anything) is fetched from the address it was checked at."""
    import asyncio

    from pixelray.serve_apps import fetch

    async def checked(target, what):
        assert target.host == "rebind.test"
        return ["127.0.0.1"]

    monkeypatch.setattr(fetch, "checked_addresses", checked)
    url = f"http://rebind.test:{origins['listed']}/{IMAGE}"
    allowed = fetch.parse_allow_list([f"rebind.test:{origins['listed']}"])
    data = asyncio.run(fetch.fetch_url(url, allowed, MAX_IMAGE_BYTES, 10, "image"))
    assert data == (SHAPES / IMAGE).read_bytes()
