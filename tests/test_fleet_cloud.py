"""The fleet's cloud side without Ray: budgets, shards, the version board, and the durability promise
under injected faults (corrupt checkpoints, storage errors, retried calls)."""
import time
from pathlib import Path

import numpy as np
import pytest

from tdmr_ray.cema import UploadMessage
from tdmr_ray.fleet import CloudAdapterActor, FleetConfig, read_uploads
from tdmr_ray.fleet.adapter import shard_of
from tdmr_ray.fleet.host import lowest_entropy

RNG = np.random.default_rng(0)


def upload(device: str, batch: int, n: int = 16) -> UploadMessage:
    images = RNG.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    return UploadMessage(device, images, 0, RNG.random(n).astype(np.float32), seq=batch)


_STARTED: list[CloudAdapterActor] = []


def make_adapter(tmp_path, name="a", **cfg) -> CloudAdapterActor:
    cfg = FleetConfig(storage=str(tmp_path / "store"), run_name=name, checkpoint_every_s=1000, **cfg)
    _STARTED.append(CloudAdapterActor(cfg, str(tmp_path / name), "x@v1"))
    return _STARTED[-1]


@pytest.fixture(autouse=True)
def stop_adapters():
    """In-process shards' worker threads end with their test (an idle shard would keep replaying)."""
    yield
    while _STARTED:
        _STARTED.pop().stop()


def test_budget_keeps_the_lowest_entropy_samples_in_batch_order():
    msg = UploadMessage("d", np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(32, 1).repeat(32, 2)
                        .repeat(3, 3), 0, np.array([0.5, 0.1, 0.9, 0.2, 0.3], np.float32), seq=3)
    cut = lowest_entropy(msg, 3)
    assert cut.images[:, 0, 0, 0].tolist() == [1, 3, 4] and cut.entropies.tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert cut.seq == 3 and cut.device_id == "d"


def test_upload_budget_spends_the_advertised_rate_at_full_speed_and_at_a_camera_pace():
    from tdmr_ray.fleet.budget import UploadBudget

    fast = UploadBudget(min_upload=8, burst_s=2.0)
    assert fast.allow("g", 20, now=0.0) == 20  # no rate known yet: send, the shard refuses what it cannot hold
    fast.set_rate("g", 5.0, now=0.0)
    sent = [fast.allow("g", 20, now=0.1 * i) for i in range(1, 101)]  # 10 s of uploads every 0.1 s
    assert 45 <= sum(sent) <= 5.0 * 10 + 10 and all(n == 0 or n >= 8 for n in sent)  # the rate, no tiny messages
    paced = UploadBudget(min_upload=8, burst_s=2.0)
    paced.set_rate("g", 5.0, now=0.0)
    sent = [paced.allow("g", 20, now=4.0 * i) for i in range(1, 8)]  # one upload of 20 candidates every 4 s
    # the first upload has no gap yet (2 s of rate); then each gets the 4 s of rate since the previous one
    assert sent == [10] + [20] * 6
    paced.set_rate("g", 1.0)
    assert paced.allow("g", 20, now=32.0) == 0  # 4 tokens: fewer than min_upload, kept back


def test_keys_hash_to_shards_stably_and_a_shard_refuses_foreign_keys(tmp_path):
    assert [shard_of(f"dev-{i:05d}", 4) for i in range(8)] == [shard_of(f"dev-{i:05d}", 4) for i in range(8)]
    assert len({shard_of(f"dev-{i:05d}", 4) for i in range(64)}) == 4  # every shard gets keys
    adapter = CloudAdapterActor(FleetConfig(storage=str(tmp_path / "s"), run_name="sh", checkpoint_every_s=1000),
                                str(tmp_path / "sh"), "x@v1", shard=1, shards=2)
    _STARTED.append(adapter)
    foreign = next(k for k in ("g0", "g1", "g2", "g3") if shard_of(k, 2) == 0)
    reply = adapter.upload(upload("d", 1), foreign, time.time())
    assert reply["status"] == "rejected" and "shard 0" in reply["error"]
    assert adapter.state_name.endswith("-shard1")


def test_versions_reach_the_board_and_rates_are_advertised(tmp_path):
    from tdmr_ray.fleet.config import fleet_cema_config

    cema = fleet_cema_config()
    cema.cloud.batch_size = 32  # the first advertised rate assumes 2 cloud batches/s: 96 queued stay under 2x target
    adapter = make_adapter(tmp_path, "board", cema=cema)
    replies = [adapter.upload(upload(f"d{i % 2}", i), "g", time.time()) for i in range(6)]
    assert all(r["status"] == "ok" and r["rate"] > 0 for r in replies)
    adapter.drain()
    board = adapter.poll({}, ["g", "other"])
    version, params, stats, sent_at, trigger_version = board["updates"]["g"]
    assert version >= 1 and params and stats is None and sent_at <= time.time() and trigger_version == version
    assert adapter.poll({"g": version}, ["g"])["updates"] == {}  # nothing newer than what the host has
    assert set(board["rates"]) == {"g", "other"}
    # one step per full cloud batch (6 x 16 = 96 samples = 3 batches), no replay-only steps while queued
    assert adapter.stats()["steps"] >= 3 and adapter.stats()["processed_samples"] == 96


def test_split_statistics_travel_through_the_log_and_the_board(tmp_path):
    """edge.stats_source="split": an upload's split flag is logged with it and read back by a restarted
    shard; the board carries the cloud copy's later-layer statistics with the parameters."""
    import dataclasses

    from tdmr_ray.cema import EdgeRunner
    from tdmr_ray.fleet.config import fleet_cema_config
    from tdmr_ray.models import create_model

    cema = fleet_cema_config()
    cema = dataclasses.replace(cema, edge=dataclasses.replace(cema.edge, stats_source="split", split_layer=13),
                               filter=cema.filter.with_preset("upload_all"))
    edge = EdgeRunner(create_model("resnet20", pretrained=False), cema)
    state = edge.new_device("d0")
    adapter = make_adapter(tmp_path, "split", cema=cema, cema_pinned=["edge.stats_source", "edge.split_layer"])
    for i in range(3):
        out = edge.infer(state, RNG.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8))
        assert out.upload.split and out.upload.stats is not None
        assert adapter.upload(out.upload, "g", time.time())["status"] == "ok"
    adapter.drain()
    _, params, stats, _, _ = adapter.poll({}, ["g"])["updates"]["g"]
    late = {k.rsplit(".", 1)[0] for k in stats}
    assert params and late and late < {k.rsplit(".", 1)[0] for k in state.stats}  # the later layers only
    assert read_uploads(str(tmp_path / "split"))["split"].to_pylist() == [True] * 48


def test_replay_only_steps_run_only_once_the_shard_is_idle_and_do_not_count_as_capacity(tmp_path):
    """New samples first: a key is owed one replay-only step per upload that completed no cloud batch
    (at most REPLAY_CREDIT_CAP), paid only after adapter_replay_idle_s without uploads; those steps
    publish versions that carry the last upload's trigger on, and leave the busy time the advertised
    capacity is measured from alone. A long idle time holds them back; a negative one switches them off."""
    from tdmr_ray.fleet.adapter import REPLAY_CREDIT_CAP
    from tdmr_ray.fleet.config import fleet_cema_config

    cema = fleet_cema_config()
    cema.cloud.batch_size, cema.cloud.replay_min = 16, 64
    shards = {idle_s: make_adapter(tmp_path, f"idle{idle_s}", cema=cema, adapter_replay_idle_s=idle_s)
              for idle_s in (0.3, 30.0, -1.0)}
    for adapter in shards.values():  # 12 half batches: 6 steps, and 6 uploads that completed none
        assert all(adapter.upload(upload("d", i, n=8), "g", time.time())["status"] == "ok" for i in range(12))
        adapter.drain()
    idle = shards[0.3]
    work = idle.stats()
    assert work["steps"] == 6 and work["processed_samples"] == 96
    deadline = time.time() + 60
    while idle.stats()["replay_only_steps"] < REPLAY_CREDIT_CAP:
        assert time.time() < deadline, "an idle shard paid no replay-only step"
        time.sleep(0.2)
    time.sleep(1.0)
    stats = idle.stats()
    assert stats["replay_only_steps"] == REPLAY_CREDIT_CAP  # owed steps only, not one per idle second
    assert stats["steps"] == 6 and stats["busy_s"] == work["busy_s"] and stats["replay_only_s"] > 0
    version, _, _, sent_at, trigger_version = idle.poll({}, ["g"])["updates"]["g"]
    assert version == 6 + REPLAY_CREDIT_CAP and trigger_version == 6 and sent_at is not None
    for held_back in (shards[30.0], shards[-1.0]):
        assert held_back.stats()["replay_only_steps"] == 0 and held_back.poll({}, ["g"])["updates"]["g"][0] == 6


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    first = make_adapter(tmp_path, "corrupt")
    for i in range(4):
        assert first.upload(upload("d", i), "g", time.time())["status"] == "ok"
    first.drain()  # checkpoint v1: 4 uploads
    for i in range(4, 6):
        assert first.upload(upload("d", i), "g", time.time())["status"] == "ok"
    first.drain()  # checkpoint v2: 6 uploads
    newest = Path(tmp_path / "store" / "registry" / first.state_name / "v000002" / "tensors.safetensors")
    newest.write_bytes(b"not a checkpoint")
    restarted = make_adapter(tmp_path, "corrupt")
    stats = restarted.drain()
    assert stats["restored_from"] == 1  # v2 is unreadable: v1, and the log after it
    assert stats["acked_samples"] == stats["processed_samples"] == 6 * 16
    assert read_uploads(str(tmp_path / "corrupt")).num_rows == 6 * 16


def test_storage_errors_are_retried_and_an_unlogged_upload_is_never_acknowledged(tmp_path):
    adapter = make_adapter(tmp_path, "flaky")
    real_write, failures = adapter.store.write, {"left": 2}

    def flaky_write(name, data):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError("503 Slow Down")
        real_write(name, data)

    adapter.store.write = flaky_write
    assert adapter.upload(upload("d", 1), "g", time.time())["status"] == "ok"  # two transient errors, retried
    failures["left"] = 100
    reply = adapter.upload(upload("d", 2), "g", time.time())
    assert reply["status"] == "error" and "503" in reply["error"]  # not logged, so not acknowledged
    failures["left"] = 0
    assert adapter.upload(upload("d", 2), "g", time.time())["status"] == "ok"  # the device may send it again
    # a failing checkpoint is counted and the worker goes on processing
    real_publish = adapter.registry.publish
    adapter.registry.publish = lambda *a, **k: (_ for _ in ()).throw(OSError("500 Internal Error"))
    adapter.last_checkpoint = 0.0
    assert adapter.upload(upload("d", 3), "g", time.time())["status"] == "ok"
    deadline = time.time() + 60
    while adapter.stats()["checkpoint_failures"] < 1 and time.time() < deadline:
        time.sleep(0.1)
    assert adapter.stats()["checkpoint_failures"] >= 1 and adapter.worker.is_alive()
    adapter.registry.publish = real_publish
    stats = adapter.drain()
    assert stats["acked_samples"] == stats["processed_samples"] == 3 * 16 and stats["log_failures"] == 1
    assert read_uploads(str(tmp_path / "flaky")).num_rows == 3 * 16


def test_retried_calls_are_dropped_and_the_dedup_memory_stays_bounded(tmp_path):
    adapter = make_adapter(tmp_path, "dedup", adapter_queue_samples=100000)
    for i in range(300):
        adapter.upload(upload("d", i, n=1), "g", time.time())
    assert adapter.upload(upload("d", 299, n=1), "g", time.time()).get("duplicate")
    assert len(adapter.recent["d"]) <= 2 * 64 + 1
    stats = adapter.drain()
    assert stats["acked_uploads"] == 300 and stats["duplicates"] == 1


def test_an_upload_acknowledged_during_a_checkpoint_is_counted_after_a_restore(tmp_path):
    """A checkpoint records the counters and the last acknowledged seq together: an upload that
    arrives while the checkpoint is being written counts again when the log is replayed (before,
    the seq was read later than the counters: a resumed run processed more than it acknowledged)."""
    images = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    first = make_adapter(tmp_path, "ckrace")
    state_dict = first.core.state_dict

    def state_dict_with_an_upload_meanwhile():
        assert first.upload(UploadMessage("dev-1", images, 0, seq=1), "g", time.time())["status"] == "ok"
        return state_dict()

    first.core.state_dict = state_dict_with_an_upload_meanwhile
    assert first.upload(UploadMessage("dev-0", images, 0, seq=0), "g", time.time())["status"] == "ok"
    first.checkpoint()
    stats = make_adapter(tmp_path, "ckrace").drain(timeout_s=120)
    assert stats["restored_from"] == 1
    assert stats["acked_samples"] == stats["processed_samples"] == 2 * 16
