"""Ray Serve application: edge models from the registry over HTTP, always on their newest parameters.

Routes (a FastAPI ingress: typed responses, OpenAPI schema at ``/openapi.json``, docs at ``/docs``):
``POST /predict`` (see serve/codec.py for the body), ``GET /healthz``, ``GET /models``. Errors are
``{"error": "<what is wrong>"}`` with the status (400/401/404/405/409/413/422/502).
A request names its device or group with the header ``X-Device-Id`` (Serve's multiplexing header
``serve_multiplexed_model_id`` is read the same way); the replica applies that id's newest
normalization-parameter set (registry name ``<params_prefix><id>``) on top of the shared frozen model.
Without either header the base model answers.

Parameter sets are a few KB, so every replica keeps the ones it was asked for in a dict (LRU, up to
``max_param_sets``) instead of Serve's per-replica model multiplexing: any replica can answer any
device, one batch mixes devices (one forward per parameter set in it), and the deployment works
behind ingresses that do not route by model id (Ray Serve's throughput-optimized direct ingress).

New versions are picked up by *polling* the registry (every ``poll_interval_s``, in a thread off
the event loop) for the sets used in the last ``active_window_s``; a request for a set not checked
for two poll intervals checks it first. The registry is the single source of truth that the cloud
adapter already writes, polling needs no channel from the adapter to every replica on every node,
and a version is swapped in on the event loop between two batches, so no request fails or sees a
half-applied set. The poll also lists the registry's names, so an unknown device id is answered from
that list: random ids cannot make a replica read the registry per request.

The API key comes from ``TDMR_SERVE_API_KEY`` in the replicas' environment (a runtime_env or a
secret), never from ``user_config``, which Serve's REST API shows to whoever can read it.
"""
# No "from __future__ import annotations": FastAPI must see the route parameters' real types
# (as strings it cannot resolve them through Serve's ingress wrapper and reads `request` as a query).
import asyncio
import hmac
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.codec import BadRequest, decode_request, encode_predictions
from tdmr_ray.models import norm_affine_parameters
from tdmr_ray.registry import Registry, RegistryError

MULTIPLEX_HEADER = "serve_multiplexed_model_id"  # Serve's header, accepted like X-Device-Id
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")
DEFAULTS = {
    "registry": "",  # registry URI; default <$TDMR_STORAGE>/registry
    "model": "cema-edge",  # registry name of the base model (newest version served); jobs/cema.py's default
    "model_artifact": "",  # "" = the version's tensors; "onnx" = its ONNX QDQ export (GDFQ models)
    "params_prefix": "edge-cema-",  # device/group id -> registry name of its parameter sets
    "input_size": 32,
    "poll_interval_s": 2.0,
    "active_window_s": 60.0,  # the poller refreshes the parameter sets requested within this window
    "max_param_sets": 4096,  # parameter sets a replica keeps (LRU; a ResNet-20 set is ~11 KB)
    "max_batch_size": 64,
    "batch_wait_timeout_s": 0.002,
    "max_images_per_request": 256,
    "max_request_bytes": 16 * 1024 * 1024,
    "threads": 1,
}


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MODEL_ARTIFACTS = ("", "onnx")


def typed_config(config: dict) -> dict:
    """``config`` with every value of its ``DEFAULTS`` key's type (an int is a float where a float is
    expected), numbers positive (the batch wait at least 0); a ValueError names the key otherwise."""
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown serve config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    typed = {}
    for key, value in config.items():
        kind = type(DEFAULTS[key])
        if kind in (int, float) and isinstance(value, str):  # `serve run serve.app:build key=value` passes text
            try:
                value = kind(value)
            except ValueError:
                raise ValueError(f"serve config: {key} must be {kind.__name__} (default {DEFAULTS[key]!r}), "
                                 f"got {value!r}") from None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"serve config: {key} must be {kind.__name__} (default {DEFAULTS[key]!r}), got {value!r}")
        if kind in (int, float) and (value < 0 or (value == 0 and key != "batch_wait_timeout_s")):
            raise ValueError(f"serve config: {key} must be positive, got {value!r}")
        typed[key] = value
    if typed.get("model_artifact", "") not in MODEL_ARTIFACTS:
        raise ValueError(f"serve config: model_artifact must be one of {MODEL_ARTIFACTS}, got {typed['model_artifact']!r}")
    return typed


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (``http_options.host``), None when it cannot be read."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # not under Serve (unit tests) or another Serve version: no check possible
        return None


@dataclass
class ParamSet:
    """One device's newest parameter set; the poller replaces ``params``/``ref`` in place."""

    name: str
    params: dict
    ref: str
    checked_at: float = 0.0  # monotonic time of the last registry check
    used_at: float = 0.0  # monotonic time of the last request


class UnknownDevice(Exception):
    pass


def _version(ref: str) -> int:
    """N of a registry reference ``name@vN`` (0 for none)."""
    return int(ref.rsplit("@v", 1)[1]) if "@v" in ref else 0


# -- the HTTP API: typed responses, one error shape -----------------------------------------------
class Prediction(BaseModel):
    class_: int = Field(alias="class", description="the top class index")
    label: str = Field(description="the top class name")
    probabilities: list[float] = Field(description="softmax over the classes, in class order")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="one per image, in request order")
    model: str = Field(description="the served base model version, name@vN")
    params: str | None = Field(description="the device's or group's parameter set version, name@vN (none: base)")


class Health(BaseModel):
    status: str
    model: str


class ModelsInfo(BaseModel):
    model: str
    architecture: dict | None
    format: str | None
    metrics: dict | None
    classes: list[str]
    loaded_params: dict[str, str]
    timing: dict[str, float]


class ErrorBody(BaseModel):
    error: str


PREDICT_BODY = {  # the body is read raw (size and pixel-count checks before decoding): schema for the docs
    "required": True,
    "content": {"application/json": {"schema": {"oneOf": [
        {"type": "object", "required": ["images"], "title": "Encoded images",
         "properties": {"images": {"type": "array", "items": {"type": "string", "format": "byte"},
                                   "description": "base64 PNG or JPEG files"}}},
        {"type": "object", "required": ["array", "shape"], "title": "Raw pixels",
         "properties": {"array": {"type": "string", "format": "byte", "description": "base64 of N*H*W*C bytes"},
                        "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4},
                        "dtype": {"type": "string", "enum": ["uint8"]}}}]}}},
}
ERRORS = {status: {"model": ErrorBody, "description": what} for status, what in (
    (400, "malformed body"), (401, "missing or wrong API key"),
    (404, "unknown device or group id"), (409, "the id's parameter set does not fit the served model"),
    (413, "body or image count over the limits"), (422, "images of the wrong size or channels"),
    (502, "the id's parameters could not be read from the registry"))}

api = FastAPI(title="tdmr-ray edge models",
              description="Edge models from the registry, each device or group on its newest normalization "
                          "parameters. Name the device or group with the `X-Device-Id` header (or `serve_multiplexed_model_id`).")


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


@api.exception_handler(UnknownDevice)
async def _unknown_device(request: Request, exc: UnknownDevice) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}; routes: POST /predict, GET /healthz, "
                    "GET /models, GET /docs",
               405: f"{request.method} is not allowed on {request.url.path} (use POST for /predict)"}
    return JSONResponse({"error": message.get(exc.status_code, str(exc.detail))}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": f"bad request: {exc.errors()}"}, status_code=400)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class EdgeModelServer:
    def __init__(self, **config):
        self._init_state()
        if config:  # bind() arguments; otherwise Serve calls reconfigure(user_config) next
            self.reconfigure(config)

    def _init_state(self) -> None:
        """The replica's state before any configuration (tests build a replica without Serve from it)."""
        self.config = dict(DEFAULTS)
        self.registry, self.api_key = None, ""
        self.model = None
        self.model_ref = ""
        self.model_meta: dict = {}  # the served version's registry metadata (GET /models)
        self._sets: OrderedDict[str, ParamSet] = OrderedDict()  # device id -> set, least recently used first
        self._loading: dict[str, asyncio.Future] = {}  # device id -> its first load, shared by waiting requests
        self._poller: asyncio.Task | None = None
        self._known: set[str] = set()  # registry names, listed by the poller
        self._listed_at = 0.0
        # Where a replica's time goes (GET /models shows it; bench/serve.py reads it).
        self.timing = {"requests": 0, "decode_s": 0.0, "forward_s": 0.0, "encode_s": 0.0, "batches": 0, "images": 0}

    # -- configuration and reloading -------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        if "api_key" in user_config:
            raise ValueError("serve config: api_key must not be in user_config (Serve's REST API shows it); "
                             "set TDMR_SERVE_API_KEY in the replicas' environment (runtime_env env_vars)")
        self.config = typed_config({**self.config, **user_config})  # all checked before any is used
        torch.set_num_threads(int(self.config["threads"]))
        self.registry = Registry(self.config["registry"] or None)
        self.api_key = os.environ.get("TDMR_SERVE_API_KEY", "")
        host = serve_http_host()
        if not self.api_key and host is not None and host not in LOOPBACK_HOSTS:
            raise ValueError(f"Serve's HTTP proxy listens on {host!r}, beyond loopback, and TDMR_SERVE_API_KEY is "
                             "not set: set it in the replicas' environment (runtime_env env_vars), or keep "
                             "http_options.host at 127.0.0.1 behind a gateway")
        self.predict_batch.set_max_batch_size(int(self.config["max_batch_size"]))
        self.predict_batch.set_batch_wait_timeout_s(float(self.config["batch_wait_timeout_s"]))
        self._load_base_model()

    def _load_base_model(self) -> None:
        loaded = self._read_base_model()
        if loaded is not None:
            self._swap_base_model(*loaded)

    def _read_base_model(self):
        """The newest base model, if it is not the one served (registry I/O: runs in a thread)."""
        name = self.config["model"]
        version = self.registry.latest_version(name)
        if version is None:
            raise RegistryError(f"serve: no model named {name!r} in registry {self.registry.uri}")
        ref = f"{name}@v{version}"
        if ref == self.model_ref:
            return None
        artifact = self.config["model_artifact"] or None
        return ref, self.registry.load_model(name, version, artifact).eval(), self.registry.meta(name, version)

    def _swap_base_model(self, ref: str, model, meta: dict) -> None:
        # (not "self.classes": cloudpickle would then try to ship the torch.classes module)
        self.class_names = meta.get("classes") or [str(i) for i in range(model.num_classes)]
        self.channels = model.arch.get("in_chans", 3)
        self.live_affine = norm_affine_parameters(model)
        self.base_affine = {k: v.detach().clone() for k, v in self.live_affine.items()}
        # swapped between batches: requests see one or the other; GET /models reads the kept metadata
        self.model, self.model_ref, self.model_meta = model, ref, meta
        # Parameter sets kept for the old model that do not fit the new one are dropped, not applied:
        # their next request reloads them (checked against the new model, a 409 if still unfit).
        for device_id in [d for d, p in self._sets.items() if not self._fits(p.params)]:
            del self._sets[device_id]

    def _fits(self, params: dict) -> bool:
        expected = self.base_affine
        return set(params) == set(expected) and all(params[k].shape == expected[k].shape for k in expected)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if self.model is None and self.config.get("model") and self._poller is not None:
            raise RuntimeError("serve: no model loaded")
        if self._poller is not None and self._poller.done() and not self._poller.cancelled():
            raise RuntimeError(f"serve: the registry poller stopped: {self._poller.exception()!r}")

    def _ensure_poller(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(float(self.config["poll_interval_s"]))
            try:
                loaded = await asyncio.to_thread(self._read_base_model)
                if loaded is not None:
                    self._swap_base_model(*loaded)
                await asyncio.to_thread(self._list_names)
                active = time.monotonic() - float(self.config["active_window_s"])
                for param_set in [p for p in self._sets.values() if p.used_at >= active]:
                    await self._refresh(param_set)
            except Exception as exc:  # keep serving the versions we have
                print(f"[serve] poll failed, keeping current versions: {exc}", flush=True)

    async def _refresh(self, param_set: ParamSet) -> None:
        """Swap in the set's newest version if there is a newer valid one; a failed read or an invalid
        newest version is logged and the loaded version keeps serving."""
        param_set.checked_at = time.monotonic()  # (first: concurrent requests do not all re-read it)
        try:
            found = await asyncio.to_thread(self._read_params, param_set)
        except Exception as exc:
            print(f"[serve] {param_set.name}: keeping {param_set.ref}: {exc}", flush=True)
            return
        if found is not None and _version(found[1]) > _version(param_set.ref):  # (a slower, older read loses)
            param_set.params, param_set.ref = found

    def _list_names(self) -> None:
        self._known = set(self.registry.names())
        self._listed_at = time.monotonic()

    def _read_params(self, param_set: ParamSet) -> tuple[dict, str] | None:
        """The newest version of a parameter set if newer than ``param_set``'s, validated against
        the served model (registry I/O: runs in a thread; nothing is written to the model)."""
        version = self.registry.latest_version(param_set.name)
        if version is None or f"{param_set.name}@v{version}" == param_set.ref:
            return None
        params, meta = self.registry.load_tensors(param_set.name, version)
        base = str(meta.get("base") or "").split("@")[0]
        if base and base != self.config["model"]:
            raise ValueError(f"{param_set.name}@v{version} is for model {base!r}, not the served {self.config['model']!r}")
        if not self._fits(params):
            raise ValueError(f"{param_set.name}@v{version} does not fit the served model's normalization parameters")
        if not all(torch.isfinite(v).all() for v in params.values()):
            raise ValueError(f"{param_set.name}@v{version} holds non-finite values")
        return params, f"{param_set.name}@v{version}"

    async def get_param_set(self, device_id: str) -> ParamSet:
        """``device_id``'s newest parameter set: from the replica's dict, checked against the registry
        if the poller has not done so for two poll intervals (an idle set), loaded on first use."""
        now, interval = time.monotonic(), float(self.config["poll_interval_s"])
        param_set = self._sets.get(device_id)
        if param_set is not None:
            self._sets.move_to_end(device_id)
            param_set.used_at = now
            if now - param_set.checked_at > 2 * interval:
                await self._refresh(param_set)
            return param_set
        loading = self._loading.get(device_id)
        if loading is None:  # one registry load per id, however many requests wait for it
            loading = self._loading[device_id] = asyncio.ensure_future(self._load_param_set(device_id))
            loading.add_done_callback(lambda _: self._loading.pop(device_id, None))
        return await asyncio.shield(loading)

    async def _load_param_set(self, device_id: str) -> ParamSet:
        now, interval = time.monotonic(), float(self.config["poll_interval_s"])
        name = f"{self.config['params_prefix']}{device_id}"
        if name not in self._known and now - self._listed_at > interval:
            await asyncio.to_thread(self._list_names)  # at most once per poll interval, whatever the ids
        if name not in self._known:
            raise UnknownDevice(f"unknown device or group {device_id!r}: no parameter set {name!r} in the registry")
        param_set = ParamSet(name, {}, "", used_at=now)
        found = await asyncio.to_thread(self._read_params, param_set)
        if found is None:
            raise UnknownDevice(f"unknown device or group {device_id!r}: no complete version of {name!r}")
        param_set.params, param_set.ref = found
        param_set.checked_at = time.monotonic()
        self._sets[device_id] = param_set
        while len(self._sets) > int(self.config["max_param_sets"]):
            self._sets.popitem(last=False)
        return param_set

    # -- inference ---------------------------------------------------------------------------
    def _apply(self, params: dict) -> None:
        with torch.no_grad():
            for k, p in self.live_affine.items():
                p.copy_(params[k])

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def predict_batch(self, requests: list[tuple[np.ndarray, ParamSet | None]]) -> list[dict]:
        """One forward per parameter set in the batch (a batch mixes devices)."""
        out: list[dict | None] = [None] * len(requests)
        by_set: dict[int, list[int]] = {}
        for i, (_, param_set) in enumerate(requests):
            by_set.setdefault(id(param_set), []).append(i)
        for members in by_set.values():
            param_set = requests[members[0]][1]
            xs = [requests[i][0] for i in members]
            x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).float().div_(255)
            # (read once: the poller may swap the set's version between two groups, never within one)
            params, params_ref = (param_set.params, param_set.ref) if param_set else (self.base_affine, None)
            t0 = time.perf_counter()
            with torch.inference_mode():
                self._apply(params)
                probs = torch.softmax(self.model(x), dim=1)
            self.timing["forward_s"] += time.perf_counter() - t0
            self.timing["batches"] += 1
            self.timing["images"] += len(x)
            t0 = time.perf_counter()
            predictions = encode_predictions(probs, self.class_names)
            start = 0
            for i, xi in zip(members, xs):
                out[i] = {"predictions": predictions[start:start + len(xi)], "model": self.model_ref,
                          "params": params_ref}
                start += len(xi)
            self.timing["encode_s"] += time.perf_counter() - t0
        return out

    def _ready(self) -> None:
        if self.model is None:  # deployed without user_config or bind() arguments: the defaults
            self.reconfigure({})
        self._ensure_poller()

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        self._ready()
        return {"status": "ok", "model": self.model_ref}

    @api.get("/models", response_model=ModelsInfo, responses={401: ERRORS[401]})
    async def models(self, request: Request) -> dict:
        self._ready()
        self._check_key(request)
        return self._describe()

    @api.post("/predict", response_model=PredictResponse, openapi_extra={"requestBody": PREDICT_BODY},
              responses=ERRORS)
    async def predict(self, request: Request) -> dict:
        """Top-k predictions for the body's images, by the model on the named device's or group's
        newest parameters (header ``X-Device-Id`` or ``serve_multiplexed_model_id``; none: the base model)."""
        self._ready()
        self._check_key(request)
        # A JSONResponse skips FastAPI's re-validation of every probability (the schema is for the docs).
        return JSONResponse(await self._predict(request))

    async def _predict(self, request: Request) -> dict:
        limit = int(self.config["max_request_bytes"])
        if int(request.headers.get("content-length") or 0) > limit:
            raise BadRequest(413, f"request body over {limit} bytes")
        chunks, size = [], 0  # read as it arrives: a chunked body has no length to check up front
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"request body over {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        t0 = time.perf_counter()
        x = decode_request(body, int(self.config["input_size"]), self.channels,
                           int(self.config["max_images_per_request"]))
        self.timing["decode_s"] += time.perf_counter() - t0
        self.timing["requests"] += 1
        device_id = (request.headers.get("x-device-id") or request.headers.get(MULTIPLEX_HEADER)
                     or request.headers.get(MULTIPLEX_HEADER.replace("_", "-")))
        param_set = None
        if device_id:
            if not DEVICE_ID.match(device_id):
                raise BadRequest(400, f"bad device id {device_id!r}: letters, digits, '.', '_', '-'")
            try:
                param_set = await self.get_param_set(device_id)
            except UnknownDevice:
                raise
            except RegistryError as exc:
                raise BadRequest(502, f"parameters for {device_id!r} could not be loaded: {exc}") from None
            except ValueError as exc:  # a set that does not fit the served model
                raise BadRequest(409, f"parameters for {device_id!r} do not fit {self.model_ref}: {exc}") from None
        return await self.predict_batch((x, param_set))

    def _check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise BadRequest(401, "missing or wrong API key (send 'Authorization: Bearer <key>' or 'X-API-Key')")

    def _describe(self) -> dict:
        meta = self.model_meta  # (the served version's, read when it was loaded: no registry I/O here)
        return {"model": self.model_ref, "architecture": meta.get("architecture"), "format": meta.get("format"),
                "metrics": meta.get("metrics"), "classes": self.class_names,
                "loaded_params": {k: v.ref for k, v in self._sets.items()}, "timing": dict(self.timing)}


def build(args: dict | None = None):
    """Application builder for ``serve run serve.app:build key=value`` and serve/config.yaml."""
    return EdgeModelServer.bind(**(args or {}))


app = EdgeModelServer.bind()
