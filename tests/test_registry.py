import json
import threading

import pytest
import torch

from tdmr_ray.models import create_model, get_norm_affine
from tdmr_ray.registry import Registry, RegistryError


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path):
    if request.param == "local":
        return Registry(str(tmp_path / "reg"))
    request.getfixturevalue("s3_server")
    return Registry(f"s3://tdmr-test/reg-{request.node.name.replace('[', '-').rstrip(']')}-{id(tmp_path)}")


def test_model_round_trip_with_metadata(registry):
    model = create_model("resnet20")
    v1 = registry.publish_model("edge", model, metrics={"top1": 91.6})
    v2 = registry.publish_model("edge", model, parent=v1.ref)
    assert (v1.version, v2.version) == (1, 2) and registry.versions("edge") == [1, 2]
    loaded = registry.load_model("edge")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    meta = registry.meta("edge", 1)
    assert meta["architecture"] == {"name": "resnet20", "num_classes": 10, "in_chans": 3}
    assert meta["metrics"] == {"top1": 91.6} and registry.meta("edge")["parent"] == "edge@v1"
    assert "created" in meta and registry.names() == ["edge"]


def test_edge_params_round_trip(registry):
    params = get_norm_affine(create_model("resnet20"))
    v = registry.publish_edge_params("dev-7", params, base="edge@v1", metrics={"samples": 64})
    tensors, meta = registry.load_tensors("dev-7", v.version)
    assert meta["kind"] == "edge-params" and meta["base"] == "edge@v1"
    assert tensors.keys() == params.keys() and all(torch.equal(tensors[k], params[k]) for k in params)
    with pytest.raises(RegistryError, match="not a model"):
        registry.load_model("dev-7")


def test_unknown_name_and_bad_name(registry):
    with pytest.raises(RegistryError, match="no model or parameter set named 'ghost'"):
        registry.load_model("ghost")
    with pytest.raises(RegistryError, match="bad registry name"):
        registry.publish("../escape", {}, kind="model", format="normalized-model")


def test_a_storage_failure_while_listing_is_a_registry_error(tmp_path):
    """What Serve answers with 502 (and the poller logs) is a RegistryError naming the listed path,
    not pyarrow's OSError; nothing stored is touched."""
    registry = Registry(str(tmp_path / "reg"))
    registry.publish_edge_params("dev-1", get_norm_affine(create_model("resnet20")), base="edge@v1")
    real = registry.fs

    class Unreachable:  # the filesystem's listing fails, as an S3 endpoint that went away does
        def __getattr__(self, name):
            return getattr(real, name)

        def get_file_info(self, *args, **kwargs):
            raise OSError("When listing objects: connection refused")

    registry.fs = Unreachable()
    for call in (registry.names, lambda: registry.versions("dev-1"), lambda: registry.latest_version("dev-1")):
        with pytest.raises(RegistryError, match=r"cannot list .*reg.*connection refused"):
            call()
    registry.fs = real
    assert registry.versions("dev-1") == [1]


def test_corrupt_tensor_file_is_detected_and_named(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    registry.publish_model("edge", create_model("resnet20"))
    good = registry.publish_model("edge", create_model("resnet20"))
    path = tmp_path / "reg" / "edge" / "v000002" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="v000002/tensors.safetensors: checksum mismatch"):
        registry.load_model("edge", good.version)
    assert registry.load_model("edge", 1) is not None  # nothing else lost


def test_mismatched_architecture_is_named(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    v = registry.publish_model("edge", create_model("resnet20"))
    meta_path = tmp_path / "reg" / "edge" / "v000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["architecture"]["name"] = "resnet32"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="do not fit"):
        registry.load_model("edge", v.version)
    for text in ("{not json", json.dumps({**meta, "version": None}), json.dumps([meta])):  # hand-edited files
        meta_path.write_text(text)
        with pytest.raises(RegistryError, match="v000001/meta.json: corrupt metadata"):
            registry.load_model("edge", 1)


def test_half_written_version_is_invisible(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    registry.publish_model("edge", create_model("resnet20"))
    (tmp_path / "reg" / "edge" / "v000002").mkdir()
    (tmp_path / "reg" / "edge" / "v000002" / "tensors.safetensors").write_bytes(b"partial")
    assert registry.latest_version("edge") == 1
    assert registry.publish_model("edge", create_model("resnet20")).version == 3


def test_concurrent_local_publishers_get_distinct_versions(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    params = {"w": torch.ones(3)}
    out, errors = [], []

    def publish():
        try:
            out.append(registry.publish("p", params, kind="edge-params", format="norm-affine").version)
        except Exception as exc:  # a thread's exception would otherwise vanish
            errors.append(repr(exc))

    threads = [threading.Thread(target=publish) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert sorted(out) == list(range(1, 9)) and registry.versions("p") == list(range(1, 9))


def test_latest_version_reads_the_pointer_and_probes_past_a_stale_one(tmp_path, monkeypatch):
    """A poll is one small read plus a probe, not a listing of every version; a stale, missing or
    corrupt pointer still gives the newest complete version."""
    import torch

    from tdmr_ray.registry import Registry

    reg = Registry(str(tmp_path / "reg"))
    for i in range(3):
        reg.publish_edge_params("edge-g", {"w": torch.full((4,), float(i))}, base="m@v1")
    pointer = tmp_path / "reg" / "edge-g" / "LATEST"
    assert pointer.read_text() == "3"
    listing = reg.versions
    monkeypatch.setattr(reg, "versions", lambda *a, **k: (_ for _ in ()).throw(AssertionError("listed")))
    assert reg.latest_version("edge-g") == 3  # from the pointer, without listing
    pointer.write_text("1")  # stale (a concurrent writer's older pointer landed last)
    assert reg.latest_version("edge-g") == 3
    (tmp_path / "reg" / "edge-g" / "v000004").mkdir()  # a claimed, unfinished version is not probed into
    assert reg.latest_version("edge-g") == 3
    monkeypatch.setattr(reg, "versions", listing)
    for bad in ("garbage", "9"):  # corrupt or ahead of what exists: fall back to listing
        pointer.write_text(bad)
        assert reg.latest_version("edge-g") == 3
    pointer.unlink()
    assert reg.latest_version("edge-g") == 3
    assert float(reg.load_tensors("edge-g")[0]["w"][0]) == 2.0


def test_file_uris_are_local_paths_not_a_file_colon_folder_in_the_working_directory(tmp_path, monkeypatch):
    from tdmr_ray.storage import RunStore, is_remote, resolve_storage

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "elsewhere"
    for uri in (target.as_uri(), f"file:{target}"):
        assert not is_remote(uri)
        assert resolve_storage(uri) == str(target)
        store = RunStore(uri)
        store.write("hosts/host-0.safetensors", b"x")
        assert (target / "hosts" / "host-0.safetensors").read_bytes() == b"x"
    assert not (tmp_path / "file:").exists()
