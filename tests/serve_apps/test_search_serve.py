"""Embeddings and search over HTTP (issue 18): the example shapes embedded by the real embed job and
indexed, served with `search=STORE` beside an encoder without a text tower; /v1/embeddings through the
official `openai` client and /search, their vectors and hits equal to the library's, and every bad input
a clear 4xx in the error body the other routes use. One Serve app for the whole module.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from pixelray.images import image_id

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "examples" / "shapes"
SHAPES_CLIP = ROOT / "pixelray" / "models" / "shapes-clip"
KEY = "search-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["a yellow star", "a red circle at the top left"]


def data_url(path: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"


@pytest.fixture(scope="module")
def encoder_source(tiny_clip) -> str:
    """The shipped shapes CLIP when it is there, else a tiny random one."""
    return "shapes-clip" if SHAPES_CLIP.is_dir() else str(tiny_clip)


@pytest.fixture(scope="module")
def encoder(encoder_source):
    from pixelray.encoders import create_encoder

    return create_encoder(encoder_source, device="cpu", normalize=True, text=True)


@pytest.fixture(scope="module")
def store(ray_address, encoder_source, tmp_path_factory) -> Path:
    from pixelray.pipelines.embed import EmbedConfig, run_embed
    from pixelray.pipelines.index import build_index

    out = tmp_path_factory.mktemp("search") / "shapes"
    summary = run_embed(EmbedConfig(input=str(SHAPES / "images"), out=str(out), encoder=encoder_source,
                                    batch_size=8, device="cpu"))
    assert summary.written == len(list((SHAPES / "images").glob("*.png"))) and summary.errors == 0
    build_index(str(out))
    return out


@pytest.fixture(scope="module")
def server(serve_url, store, encoder_source, tiny_dinov2):
    """Two encoders (the store's, by another name, and a DINOv2 without a text tower) and the store."""
    from ray import serve

    from pixelray.serve_apps.vlm import build_app

    app = build_app({
        "encoders": [{"name": "clip", "source": encoder_source, "device": "cpu", "num_cpus": 0.25},
                     {"name": "dino", "source": str(tiny_dinov2), "device": "cpu", "num_cpus": 0.25}],
        "search": [{"path": str(store), "num_cpus": 0.25}],
        "api_key": KEY, "max_embedding_inputs": 8, "max_search_k": 5, "max_images_per_request": 2,
        "max_request_bytes": 1_000_000,
    })
    serve.run(app, name="search", route_prefix="/")
    yield serve_url
    serve.delete("search")


def post(url: str, route: str, body, headers: dict | None = None) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}{route}", data=data, timeout=60,
                         headers={**AUTH, "Content-Type": "application/json", **(headers or {})})


def test_embeddings_equal_the_librarys(server, store, encoder):
    """Texts through the openai client (which asks for base64), the same as floats, and an image data URL
    beside a text: each text's vector is the library's, the image's its row in the store, normalised
    (`pixelray embed` scales an image as the server does); tokens count the texts only."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert {"clip", "dino"} <= {m.id for m in client.models.list()}
    done = client.embeddings.create(model="clip", input=TEXTS)
    expected = encoder.encode_text(TEXTS).numpy()
    assert done.model == "clip" and [d.index for d in done.data] == [0, 1]
    np.testing.assert_allclose(np.array([d.embedding for d in done.data]), expected, atol=1e-5)
    tokens = sum(len(encoder.tokenizer.encode(t)) + 2 for t in TEXTS)
    assert done.usage.prompt_tokens == done.usage.total_tokens == tokens
    floats = client.embeddings.create(model="clip", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, expected[0], atol=1e-5)

    image = SHAPES / "images/000002.png"
    r = post(server, "/v1/embeddings", {"model": "clip", "input": [TEXTS[0], data_url(image)]})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["data"][0]["embedding"], expected[0], atol=1e-5)
    [row] = [r for r in pq.read_table(store / "features").to_pylist() if Path(r["path"]).name == image.name]
    stored = np.array(row["embedding"])
    np.testing.assert_allclose(body["data"][1]["embedding"], stored / np.linalg.norm(stored), atol=1e-5)
    assert body["usage"]["prompt_tokens"] == len(encoder.tokenizer.encode(TEXTS[0])) + 2
    dino = post(server, "/v1/embeddings", {"model": "dino", "input": data_url(image)})
    assert dino.status_code == 200 and len(dino.json()["data"][0]["embedding"]) == 32, dino.text


def test_search_by_image_and_by_text(server, store, encoder):
    from pixelray.pipelines.index import open_index

    health = requests.get(f"{server}/health", timeout=10).json()
    assert health["encoders"] == ["clip", "dino"] and health["stores"] == ["shapes"]  # the store's: `clip`
    path = SHAPES / "images/000005.png"
    for image in (data_url(path), base64.b64encode(path.read_bytes()).decode()):  # a data URL or bare base64
        r = post(server, "/search", {"image": image, "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["store"] == "shapes" and body["model"] == "clip" and len(body["results"]) == 3
        first = body["results"][0]
        assert Path(first["path"]).name == path.name and first["image_id"] == image_id(first["path"])
        assert first["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["score"] for h in body["results"]] == sorted([h["score"] for h in body["results"]], reverse=True)

    r = post(server, "/search", {"text": TEXTS[0], "store": "shapes"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    [hits] = open_index(str(store)).search(encoder.encode_text([TEXTS[0]]).numpy(), k=5)
    assert [h["image_id"] for h in results] == [h.image_id for h in hits]  # k: 10, within the server's 5
    assert [h["score"] for h in results] == pytest.approx([h.score for h in hits], abs=1e-5)


def image_input(n: int) -> list[str]:
    return [data_url(SHAPES / "images/000000.png")] * n


EMBEDDING_ERRORS = {
    "not json": ("{not json", 400, "invalid_json"),
    "unknown model": ({"model": "nope", "input": "x"}, 404, "model_not_found"),
    "no input": ({"model": "clip", "input": []}, 400, "empty_input"),
    "an empty string": ({"model": "clip", "input": ["a star", " "]}, 400, "empty_input"),
    "tokens": ({"model": "clip", "input": [1, 2, 3]}, 400, "token_input"),
    "token lists": ({"model": "clip", "input": [[1, 2], [3]]}, 400, "token_input"),
    "too many inputs": ({"model": "clip", "input": ["a star"] * 9}, 413, "too_many_inputs"),
    "too many images": ({"model": "clip", "input": image_input(3)}, 422, "too_many_images"),
    "other dimensions": ({"model": "clip", "input": "a star", "dimensions": 7}, 400, "invalid_dimensions"),
    "bad encoding_format": ({"model": "clip", "input": "a star", "encoding_format": "int8"}, 422,
                            "invalid_parameters"),
    "text, no text tower": ({"model": "dino", "input": "a star"}, 400, "no_text_tower"),
    "past the context": ({"model": "clip", "input": "star " * 80}, 400, "model_input"),
    "bad base64": ({"model": "clip", "input": "data:image/png;base64,!!!"}, 400, "bad_base64"),
    "not an image": ({"model": "clip", "input": "data:image/png;base64," + base64.b64encode(b"text").decode()}, 400,
                     "not_an_image"),
}
SEARCH_ERRORS = {
    "no query": ({}, 400, "invalid_query"),
    "two queries": ({"text": "a star", "image": image_input(1)[0]}, 400, "invalid_query"),
    "an empty query": ({"text": "  "}, 400, "empty_query"),
    "k zero": ({"text": "a star", "k": 0}, 422, "invalid_parameters"),
    "k past the limit": ({"text": "a star", "k": 6}, 422, "k_too_large"),
    "unknown store": ({"text": "a star", "store": "nope"}, 404, "store_not_found"),
    "unknown field": ({"text": "a star", "top_k": 3}, 422, "invalid_parameters"),
    "not an image": ({"image": base64.b64encode(b"hello").decode()}, 400, "not_an_image"),
}


@pytest.mark.parametrize("route,case", [("/v1/embeddings", c) for c in EMBEDDING_ERRORS] +
                         [("/search", c) for c in SEARCH_ERRORS])
def test_bad_requests_are_clear_4xx(server, route, case):
    body, status, code = (EMBEDDING_ERRORS if route == "/v1/embeddings" else SEARCH_ERRORS)[case]
    r = post(server, route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "code", "param"}, error
    assert "Traceback" not in error["message"] and "ray" not in error["message"].lower(), error


def test_the_key_and_host_rules_hold(server):
    for route, body in (("/v1/embeddings", {"model": "clip", "input": "a star"}), ("/search", {"text": "a star"})):
        r = post(server, route, body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = post(server, route, body, headers={"Host": "evil.example"})
        assert r.status_code == 421
        r = post(server, route, {**body, "padding": "x" * 1_100_000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_store_brings_its_own_encoder(store, encoder_source, tmp_path):
    """`search=STORE` alone: no vision-language model, and the store's encoder served for its queries; a
    folder that is no store, or a store without an index, fails the app's build."""
    from pixelray.serve_apps.settings import AppArgs

    args = AppArgs.model_validate({"search": f"{store}/"})
    encoders, by_store = args.served_encoders()
    assert args.models == [] and [s.name for s in args.search] == ["shapes"]
    assert [e.source for e in encoders] == [encoder_source] and by_store == {"shapes": encoders[0].name}
    with pytest.raises(ValueError, match="not a pixelray store"):
        AppArgs.model_validate({"search": str(store / "features")}).served_encoders()
    (tmp_path / "pixelray.json").write_bytes((store / "pixelray.json").read_bytes())
    with pytest.raises(ValueError, match="has no index: run `pixelray index"):
        AppArgs.model_validate({"search": str(tmp_path)}).served_encoders()
