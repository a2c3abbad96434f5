"""A real Serve instance on loopback, real HTTP requests: predictions, bad input, version updates."""
import base64
import copy
import io
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serve.client import free_port, wait_healthy
from serve.codec import encode_array
from tdmr_ray.models import create_model, get_norm_affine
from tdmr_ray.registry import Registry

HDR = "serve_multiplexed_model_id"


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, clean_subset):
    from ray import serve

    from serve.app import build

    reg_uri = str(tmp_path_factory.mktemp("serve") / "registry")
    registry = Registry(reg_uri)
    model = create_model("resnet20", pretrained=True).eval()
    base = registry.publish_model("resnet20-cifar10", model, extra={"classes": clean_subset.classes})
    registry.publish_edge_params("edge-dev-1", get_norm_affine(model), base=base.ref)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"registry": reg_uri, "poll_interval_s": 0.2, "max_request_bytes": 200_000,
                     "model": "resnet20-cifar10", "params_prefix": "edge-"}),
              name="edge", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield url, registry, model
    serve.shutdown()


def test_predict_array_and_png_agree_with_local_model(server, clean_subset):
    url, _, model = server
    x = clean_subset.x[:8]
    r = requests.post(f"{url}/predict", json=encode_array(x), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    with torch.inference_mode():
        expected = model(clean_subset.tensors(slice(0, 8))[0]).argmax(1).tolist()
    assert [p["class"] for p in body["predictions"]] == expected
    assert body["model"] == "resnet20-cifar10@v1" and body["params"] is None
    assert abs(sum(body["predictions"][0]["probabilities"]) - 1) < 1e-3
    pngs = []
    for img in x[:2]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode())
    r = requests.post(f"{url}/predict", json={"images": pngs}, timeout=30)
    assert [p["class"] for p in r.json()["predictions"]] == expected[:2]
    assert r.json()["predictions"][0]["label"] == clean_subset.classes[expected[0]]


def test_bad_inputs_get_4xx_naming_the_problem(server):
    url, _, _ = server
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b'{"foo": 1}', 400, "needs 'images' or 'array'"),
        (b'{"images": ["!!!"]}', 400, "not valid base64"),
        (b'{"images": ["' + base64.b64encode(b"hello").decode().encode() + b'"]}', 400, "cannot be decoded"),
        (b'{"array": "AAAA", "shape": [1, 32, 32, 3], "dtype": "uint8"}', 422, "holds 3 bytes"),
        (b'{"array": "AAAA", "shape": [1, 1, 1, 3], "dtype": "float32"}', 422, "dtype must be 'uint8'"),
    ]
    for body, status, message in cases:
        r = requests.post(f"{url}/predict", data=body, timeout=30)
        assert r.status_code == status and message in r.json()["error"], (body, r.text)
    wrong = requests.post(f"{url}/predict", json=encode_array(np.zeros((1, 28, 28, 3), np.uint8)), timeout=30)
    assert wrong.status_code == 422 and "32x32" in wrong.json()["error"]
    # a shape whose product overflows int64 is a client error, not a 500
    huge = {"array": "AAAA", "shape": [1, 2**40, 2**40, 3], "dtype": "uint8"}
    r = requests.post(f"{url}/predict", json=huge, timeout=30)
    assert r.status_code == 422 and "32x32" in r.json()["error"]
    # a decompression bomb: a few KB of PNG holding a 10,000 x 10,000 canvas is refused from its header
    buf = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 200_000
    t0 = time.perf_counter()
    r = requests.post(f"{url}/predict", json={"images": [base64.b64encode(buf.getvalue()).decode()]}, timeout=30)
    assert r.status_code == 422 and "10000x10000" in r.json()["error"] and time.perf_counter() - t0 < 5
    big = requests.post(f"{url}/predict", json=encode_array(np.zeros((100, 32, 32, 3), np.uint8)), timeout=30)
    assert big.status_code == 413
    unknown = requests.post(f"{url}/predict", json=encode_array(np.zeros((1, 32, 32, 3), np.uint8)),
                            headers={HDR: "dev-404"}, timeout=30)
    assert unknown.status_code == 404 and "dev-404" in unknown.json()["error"]
    wrong_method = requests.get(f"{url}/predict", timeout=30)
    assert wrong_method.status_code == 405 and "use POST" in wrong_method.json()["error"]
    nope = requests.get(f"{url}/nope", timeout=30)
    assert nope.status_code == 404 and "POST /predict" in nope.json()["error"]
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"  # still serving


def test_device_params_and_hot_update(server, clean_subset):
    url, registry, model = server
    x = encode_array(clean_subset.x[:16])
    r = requests.post(f"{url}/predict", json=x, headers={HDR: "dev-1"}, timeout=30)
    assert r.status_code == 200 and r.json()["params"] == "edge-dev-1@v1"
    before = r.json()["predictions"]
    # A new version that breaks the classifier's input BN: predictions must change once picked up.
    params = get_norm_affine(model)
    params = {k: (torch.zeros_like(v) if k.endswith("bn1.weight") else v) for k, v in params.items()}
    registry.publish_edge_params("edge-dev-1", params, base="resnet20-cifar10@v1")
    seen, failures = [], 0
    deadline = time.time() + 20
    while time.time() < deadline:
        r = requests.post(f"{url}/predict", json=x, headers={HDR: "dev-1"}, timeout=30)
        failures += r.status_code != 200
        seen.append(r.json()["params"])
        if seen[-1] == "edge-dev-1@v2":
            break
        time.sleep(0.1)
    assert failures == 0 and seen[-1] == "edge-dev-1@v2"
    assert r.json()["predictions"] != before
    base = requests.post(f"{url}/predict", json=x, timeout=30).json()
    assert base["params"] is None and base["predictions"] == before  # other ids unaffected
    models = requests.get(f"{url}/models", timeout=30).json()
    assert models["model"] == "resnet20-cifar10@v1" and models["loaded_params"]["dev-1"] == "edge-dev-1@v2"


def test_concurrent_requests_of_many_devices_each_get_their_own_parameters(server, clean_subset):
    """Parameter sets live in a dict on the replica, so one batch can mix devices: each request must
    still be answered under its own device's set (X-Device-Id, no multiplexed routing)."""
    from concurrent.futures import ThreadPoolExecutor

    from tdmr_ray.models import set_norm_affine

    url, registry, model = server
    plain = get_norm_affine(model)
    broken = {k: (torch.zeros_like(v) if k.endswith("bn1.weight") else v) for k, v in plain.items()}
    registry.publish_edge_params("edge-mix-a", plain, base="resnet20-cifar10@v1")
    registry.publish_edge_params("edge-mix-b", broken, base="resnet20-cifar10@v1")
    time.sleep(0.5)  # the next poll lists them (unknown ids are answered from the poller's listing)
    x = clean_subset.x[:4]
    expected = {}
    for dev, params in (("mix-a", plain), ("mix-b", broken)):
        local = copy.deepcopy(model)
        set_norm_affine(local, params)
        with torch.inference_mode():
            expected[dev] = local(clean_subset.tensors(slice(0, 4))[0]).argmax(1).tolist()
    assert expected["mix-a"] != expected["mix-b"]

    def ask(dev: str) -> tuple[str, dict]:
        r = requests.post(f"{url}/predict", json=encode_array(x), headers={"X-Device-Id": dev}, timeout=30)
        assert r.status_code == 200, r.text
        return dev, r.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, ["mix-a", "mix-b"] * 16))
    for dev, body in answers:
        assert body["params"] == f"edge-{dev}@v1"
        assert [p["class"] for p in body["predictions"]] == expected[dev], dev


def test_parameters_for_another_model_are_refused(server, clean_subset):
    url, registry, model = server
    registry.publish_edge_params("edge-dev-other", get_norm_affine(model), base="some-other-model@v3")
    time.sleep(0.5)  # the next poll lists it
    r = requests.post(f"{url}/predict", json=encode_array(clean_subset.x[:2]), headers={HDR: "dev-other"}, timeout=30)
    assert r.status_code == 409 and "some-other-model" in r.json()["error"]
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_openapi_schema_and_docs(server):
    """The FastAPI ingress documents the routes, the request body and the error statuses."""
    url, _, _ = server
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/predict", "/healthz", "/models"} <= set(schema["paths"])
    predict = schema["paths"]["/predict"]["post"]
    assert {"404", "409", "413", "422"} <= set(predict["responses"])
    body = predict["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {tuple(alt["required"]) for alt in body} == {("images",), ("array", "shape")}
    assert "predictions" in schema["components"]["schemas"]["PredictResponse"]["properties"]
    docs = requests.get(f"{url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_a_quantized_model_is_served_from_its_onnx_export(tmp_path):
    """``model_artifact: onnx``: the replica's model is rebuilt from the registry's model.onnx."""
    from serve.app import DEFAULTS, EdgeModelServer
    from tdmr_ray.gdfq.baselines import CalibrationConfig, noise_calibrated
    from tdmr_ray.gdfq.registry_format import publish_quantized

    registry = Registry(str(tmp_path / "reg"))
    qmodel, _ = noise_calibrated(create_model("resnet20", pretrained=True).eval(), 8, 8,
                                 CalibrationConfig(batches=1, batch_size=16))
    publish_quantized(registry, "r20-w8a8", qmodel.eval())
    cls = EdgeModelServer.func_or_class
    server = cls.__new__(cls)
    server.config, server.model_ref = {**DEFAULTS, "model": "r20-w8a8", "model_artifact": "onnx"}, ""
    server.registry = registry
    ref, model, meta = server._read_base_model()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert ref == "r20-w8a8@v1" and torch.equal(model(x), qmodel(x))
    (tmp_path / "reg" / "r20-w8a8" / "v000001" / "model.onnx").write_bytes(b"corrupt")
    with pytest.raises(Exception, match="checksum mismatch"):
        server._read_base_model()


def test_api_key_is_refused_in_user_config():
    from serve.app import EdgeModelServer

    server = EdgeModelServer.func_or_class.__new__(EdgeModelServer.func_or_class)
    server.config = {}
    with pytest.raises(ValueError, match="TDMR_SERVE_API_KEY"):
        EdgeModelServer.func_or_class.reconfigure(server, {"api_key": "secret"})


def test_binding_beyond_loopback_needs_an_api_key(monkeypatch, tmp_path):
    from serve.app import DEFAULTS, EdgeModelServer

    cls = EdgeModelServer.func_or_class
    server = cls.__new__(cls)
    server.config = dict(DEFAULTS)
    monkeypatch.delenv("TDMR_SERVE_API_KEY", raising=False)
    # @serve.ingress copies the class (cloudpickle by value), so its methods read a copy of the
    # module's globals: patch those.
    module_globals = cls.reconfigure.__globals__
    monkeypatch.setitem(module_globals, "serve_http_host", lambda: "0.0.0.0")
    with pytest.raises(ValueError, match="beyond loopback"):
        cls.reconfigure(server, {"registry": str(tmp_path / "reg")})
    monkeypatch.setitem(module_globals, "serve_http_host", lambda: "127.0.0.1")
    with pytest.raises(Exception) as exc:  # gets past the check (then needs a real batch handler)
        cls.reconfigure(server, {"registry": str(tmp_path / "reg")})
    assert "beyond loopback" not in str(exc.value)
