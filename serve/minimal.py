"""The baseline a user might run instead of Ray Serve: one uvicorn process, the same model and
codec, no batching, no multiplexing. ``python -m serve.minimal --registry DIR --port 8001``.
bench/serve.py compares against it."""
from __future__ import annotations

import argparse

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve.codec import BadRequest, decode_request, encode_predictions
from tdmr_ray.registry import Registry


def make_app(registry_uri: str, model_name: str, input_size: int = 32) -> Starlette:
    registry = Registry(registry_uri)
    model = registry.load_model(model_name).eval()
    version = registry.latest_version(model_name)
    classes = registry.meta(model_name).get("classes") or [str(i) for i in range(model.num_classes)]

    async def predict(request: Request) -> JSONResponse:
        try:
            x = decode_request(await request.body(), input_size, model.arch.get("in_chans", 3), 256)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)), 1)
        return JSONResponse({"predictions": encode_predictions(probs, classes), "model": f"{model_name}@v{version}"})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz)])


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--registry", required=True)
    p.add_argument("--model", default="resnet20-cifar10")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    uvicorn.run(make_app(a.registry, a.model), host="127.0.0.1", port=a.port, log_level="warning")
