"""The Serve replica's guards, on the deployment class itself (no Serve instance): health checks,
unknown ids that cannot hammer the registry, the API key, registry reads off the event loop."""
import asyncio
import time

import pytest

from tdmr_ray.models import create_model, get_norm_affine
from tdmr_ray.registry import Registry


class CountingRegistry:
    """A registry whose reads are counted and, optionally, slow."""

    def __init__(self, registry: Registry, delay_s: float = 0.0):
        self.registry, self.delay_s = registry, delay_s
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        method = getattr(self.registry, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            time.sleep(self.delay_s)
            return method(*args, **kwargs)

        return counted


def replica(registry, **config):
    """An EdgeModelServer as Serve would hold it after reconfigure, without Serve."""
    from serve.app import EdgeModelServer

    cls = EdgeModelServer.func_or_class
    server = cls.__new__(cls)
    server._init_state()
    server.config.update({"params_prefix": "edge-", "poll_interval_s": 60.0, **config})
    server.registry = registry
    return cls, server


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    registry = Registry(str(tmp_path_factory.mktemp("guards") / "reg"))
    model = create_model("resnet20").eval()
    base = registry.publish_model("cema-edge", model)
    registry.publish_edge_params("edge-fog", get_norm_affine(model), base=base.ref)
    return registry


def test_health_check_fails_without_a_model_or_once_the_poller_died(published):
    cls, server = replica(published)

    async def died():
        raise OSError("registry unreachable")

    async def run():
        server._poller = asyncio.get_running_loop().create_task(died())
        with pytest.raises(RuntimeError, match="no model loaded"):
            server.check_health()
        server._swap_base_model(*server._read_base_model())
        await asyncio.sleep(0)  # the poller runs and dies
        with pytest.raises(RuntimeError, match="poller stopped.*registry unreachable"):
            server.check_health()
        server._poller = asyncio.get_running_loop().create_task(asyncio.sleep(10))
        server.check_health()  # a model and a live poller: healthy
        server._poller.cancel()

    asyncio.run(run())


def test_random_device_ids_list_the_registry_at_most_once_per_poll_interval(published):
    from serve.app import UnknownDevice

    counting = CountingRegistry(published)
    cls, server = replica(counting)
    server._swap_base_model(*server._read_base_model())
    counting.calls.clear()

    async def ask(device_id):
        return await server.get_param_set(device_id)

    for i in range(50):
        with pytest.raises(UnknownDevice, match=f"rnd-{i}"):
            asyncio.run(ask(f"rnd-{i}"))
    assert counting.calls == {"names": 1}  # one listing for 50 unknown ids, no per-id read
    assert asyncio.run(ask("fog")).ref == "edge-fog@v1"  # a known id is still found (listed above)


def test_registry_reads_do_not_block_the_event_loop(published):
    """A slow registry (0.3 s per read) while the replica refreshes a set and lists names: other
    coroutines (requests) keep running."""
    from serve.app import ParamSet, UnknownDevice

    slow = CountingRegistry(published, delay_s=0.3)
    cls, server = replica(slow)
    server._swap_base_model(*server._read_base_model())

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await server._refresh(ParamSet("edge-fog", {}, ""))
        with pytest.raises(UnknownDevice):
            await server._load_param_set("nobody")
        task.cancel()
        return ticks

    assert asyncio.run(run()) >= 30  # ~0.9 s of reads; on the loop it would be 0 ticks
    reads = dict(slow.calls)
    described = server._describe()  # GET /models: the served version's metadata, no registry read
    assert described["model"] == "cema-edge@v1" and described["format"] == server.model_meta["format"]
    assert slow.calls == reads


def test_api_key_is_required_when_set():
    from serve.codec import BadRequest

    cls, server = replica(None)
    server.api_key = "s3cret"

    class Req:
        def __init__(self, headers):
            self.headers = headers

    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
        with pytest.raises(BadRequest) as exc:
            server._check_key(Req(headers))
        assert exc.value.status == 401
    server._check_key(Req({"x-api-key": "s3cret"}))
    server._check_key(Req({"authorization": "Bearer s3cret"}))
    server.api_key = ""
    server._check_key(Req({}))  # no key configured: open (loopback only, see reconfigure)


def test_config_values_are_typed_and_a_bad_one_names_its_key():
    from serve.app import DEFAULTS, typed_config

    config = typed_config({**DEFAULTS, "max_request_bytes": "1024", "poll_interval_s": 3, "model_artifact": "onnx"})
    assert config["max_request_bytes"] == 1024 and config["poll_interval_s"] == 3.0  # CLI text and YAML ints
    for key, value, says in (("max_request_bytes", "16MB", "must be int"), ("poll_interval_s", "2s", "must be float"),
                             ("threads", True, "must be int"), ("model", 7, "must be str"),
                             ("max_batch_size", 0, "must be positive"), ("model_artifact", "pickle", "one of"),
                             ("max_batch", 8, "unknown serve config keys")):
        with pytest.raises(ValueError, match=f"{key}.*{says}|{says}.*{key}"):
            typed_config({**DEFAULTS, key: value})


def test_a_chunked_body_over_the_limit_is_refused_before_it_is_all_read():
    """No Content-Length (chunked transfer): the replica stops reading at the limit with a 413."""
    from serve.codec import BadRequest

    _, server = replica(None, max_request_bytes=1000)
    read = []

    class ChunkedRequest:
        headers = {}

        async def stream(self):
            for _ in range(100):  # 100 x 100 bytes offered
                read.append(100)
                yield b"x" * 100

    with pytest.raises(BadRequest) as exc:
        asyncio.run(server._predict(ChunkedRequest()))
    assert exc.value.status == 413 and sum(read) == 1100  # stopped at the first chunk past the limit


def test_a_new_base_model_drops_the_kept_sets_that_no_longer_fit(tmp_path):
    """A new base version of another shape (ResNet-20 -> ResNet-56 under the same name): the sets
    kept for the old one are not applied to it (every request of a batch would fail), and the next
    request for such a set is answered as unfit (409) by the check that loads it."""
    registry = Registry(str(tmp_path / "reg"))
    r20 = create_model("resnet20").eval()
    registry.publish_edge_params("edge-fog", get_norm_affine(r20), base=registry.publish_model("cema-edge", r20).ref)
    _, server = replica(registry)
    server._swap_base_model(*server._read_base_model())
    assert asyncio.run(server.get_param_set("fog")).ref == "edge-fog@v1"
    registry.publish_model("cema-edge", create_model("resnet56").eval())
    server._swap_base_model(*server._read_base_model())
    assert server.model_ref == "cema-edge@v2" and "fog" not in server._sets
    server._list_names()
    with pytest.raises(ValueError, match="edge-fog@v1 does not fit"):
        asyncio.run(server.get_param_set("fog"))
