"""The fleet on a real local Ray instance: versions reach devices, accounting adds up, faults lose nothing."""
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tdmr_ray.cema import UploadMessage
from tdmr_ray.fleet import read_uploads
from tdmr_ray.fleet.streams import device_id, is_control

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

SMALL = ["--devices", "12", "--batches-per-device", "4", "--pool-size", "256", "--batch-size", "32",
         "--corruptions", "gaussian_noise,fog", "--checkpoint-every-s", "2"]


def run_cema(tmp_path, name, *extra):
    import cema

    return cema.main([*SMALL, "--output-dir", str(tmp_path / name), "--storage", str(tmp_path / "store"),
                      "--run-name", name, *extra])


def check_books(summary, tmp_path, name, devices=12, batches=4, batch=32, restarted=False):
    m = summary["metrics"]
    assert m["devices"] == devices and m["samples"] == devices * batches * batch  # every batch ran exactly once
    host, adapter = m["host"], m["adapter"]
    assert host["sent"] == host["acked"] + host["busy"] + host["rejected"] + host["send_failed"]
    assert m["uploaded"] == host["sent"] + host["dropped_in_flight"] + host["unsent"]  # every candidate counted
    assert adapter["acked_samples"] == adapter["processed_samples"] and adapter["acked_not_processed"] == 0
    assert read_uploads(m["run_store"]).num_rows == adapter["acked_samples"]  # the Parquet log holds them all
    if not restarted:  # a restarted host re-runs its last round; re-sent uploads are deduplicated
        assert host["acked"] == adapter["acked_samples"]
    return m


def test_fleet_end_to_end_over_two_adapter_shards(ray_session, tmp_path):
    """A whole fleet run, its books, progress series, plot and registry versions, with the keys spread
    over two shards: each takes its own uploads, logs and checkpoints them, and the devices of both
    shards' keys apply its versions. (One shard, the default: the other fleet tests.)"""
    from tdmr_ray.registry import Registry

    # the two groups' keys hash to different shards (sha1: defocus_blur -> 0, gaussian_noise -> 1)
    summary = run_cema(tmp_path, "e2e", "--progress-interval-s", "0.2", "--adapters", "2",
                       "--corruptions", "gaussian_noise,defocus_blur")
    m = check_books(summary, tmp_path, "e2e")
    assert m["host"]["acked"] > 0
    control = sum(1 for d in range(12) if is_control(device_id(d), 0.1, 0))
    assert m["devices_on_newest_version"] == 12 - control  # every treatment device applied a cloud version
    assert m["lift"]["control_devices"] == control
    assert m["adapter"]["published"] > 0 and m["apply_latency_s"]["n"] > 0
    assert set(m["accuracy_by_group"]) == {"gaussian_noise", "defocus_blur"}
    assert (tmp_path / "e2e" / "fleet.png").stat().st_size > 0
    # progress comes from the hosts' posts to the progress actor: the last point holds every sample
    assert len(m["series"]) >= 2 and m["series"][-1]["seen"] == m["samples"]  # lines while the hosts ran
    assert all(a["seen"] < b["seen"] for a, b in zip(m["series"], m["series"][1:]))
    assert m["series"][-1]["accuracy"] == pytest.approx(m["accuracy"], abs=1e-4)
    written = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert written["config"]["devices"] == 12
    shards = m["adapter"]["shards"]
    assert [s["shard"] for s in shards] == [0, 1]
    assert all(s["acked_samples"] > 0 and s["acked_samples"] == s["processed_samples"] for s in shards)
    logged = read_uploads(m["run_store"])
    assert sorted(set(logged["shard"].to_pylist())) == [0, 1]
    for shard in (0, 1):
        assert read_uploads(m["run_store"], shard=shard).num_rows == shards[shard]["acked_samples"]
    registry = Registry.for_storage(str(tmp_path / "store"))
    for group in ("gaussian_noise", "defocus_blur"):  # one from each shard
        params, meta = registry.load_tensors(f"edge-e2e-{group}")
        assert meta["kind"] == "edge-params" and meta["base"] == "e2e-edge@v1" and params


def _kill_when(name_part, trigger, killed):
    """Kill (with restart) the named actor once ``trigger()`` is true: mid-run, not before or after."""
    import ray

    def kill():
        deadline = time.time() + 120
        while time.time() < deadline:
            match = [n for n in ray.util.list_named_actors() if name_part in n]
            if match and trigger():
                ray.kill(ray.get_actor(match[0]), no_restart=False)
                killed.append(match[0])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_host_killed_mid_run_resumes_without_losing_progress(ray_session, tmp_path):
    killed = []
    checkpoint = tmp_path / "store" / "fleet" / "hostkill-hostkill" / "hosts" / "host-0.safetensors"
    thread = _kill_when("hostkill-host-0", checkpoint.exists, killed)
    summary = run_cema(tmp_path, "hostkill", "--batches-per-device", "10", "--checkpoint-every-s", "1000")
    thread.join(timeout=1)
    assert killed, "the host was never killed"
    m = check_books(summary, tmp_path, "hostkill", batches=10, restarted=True)
    assert m["hosts_restored"] == 1


def test_adapter_killed_mid_run_loses_no_acknowledged_sample(ray_session, tmp_path):
    import ray

    from tdmr_ray.fleet import CloudAdapterActor, FleetConfig

    cfg = FleetConfig(storage=str(tmp_path / "store"), run_name="akill", checkpoint_every_s=0.5)
    adapter = ray.remote(CloudAdapterActor).options(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                                    max_concurrency=4).remote(cfg, str(tmp_path / "akill"), "x@v1")
    rng = np.random.default_rng(0)

    def upload(i):
        images = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
        return adapter.upload.remote(UploadMessage(f"dev-{i % 3}", images, 0, seq=i), f"g{i % 2}", time.time())

    assert all(r["status"] == "ok" for r in ray.get([upload(i) for i in range(10)]))
    deadline = time.time() + 60
    while ray.get(adapter.stats.remote())["checkpoints"] < 1 and time.time() < deadline:
        time.sleep(0.1)
    ray.kill(adapter, no_restart=False)  # mid-run: acknowledged uploads may still be queued
    assert all(r["status"] == "ok" for r in ray.get([upload(i) for i in range(10, 15)]))
    stats = ray.get(adapter.drain.remote())
    assert stats["restored_from"] > 0  # resumed from its registry checkpoint
    assert stats["acked_samples"] == stats["processed_samples"] == 15 * 16
    assert read_uploads(str(tmp_path / "akill")).num_rows == 15 * 16
    ray.kill(adapter)


def test_driver_killed_mid_run_resumes_with_nothing_lost(ray_session, tmp_path):
    """The job's process (and the Ray instance it started) killed early in the stream, before any
    host checkpoint; rerun with --resume: every batch runs once, no acknowledged sample is lost."""
    import os
    import signal
    import subprocess

    import cema

    args = [*SMALL, "--batches-per-device", "6", "--storage", str(tmp_path / "store"), "--run-name", "dkill"]
    proc = subprocess.Popen([sys.executable, "jobs/cema.py", *args, "--output-dir", str(tmp_path / "first")],
                            cwd=REPO, env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "stream ..." in line:
            # killed once the first upload is logged (a run with nothing logged has nothing to resume)
            deadline = time.monotonic() + 30
            while not list((tmp_path / "store").rglob("uploads/*.parquet")) and time.monotonic() < deadline:
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the job ended before it was killed"
    summary = cema.main([*args, "--output-dir", str(tmp_path / "resumed"), "--resume", "dkill-first"])
    m = check_books(summary, tmp_path, "dkill", batches=6, restarted=True)
    assert m["run_id"] == "dkill-first" and m["adapter"]["acked_samples"] > 0


def test_malformed_uploads_are_rejected_and_counted(ray_session, tmp_path):
    import ray

    from tdmr_ray.fleet import CloudAdapterActor, FleetConfig

    cfg = FleetConfig(storage=str(tmp_path / "store"), run_name="bad")
    adapter = ray.remote(CloudAdapterActor).options(num_cpus=0).remote(cfg, str(tmp_path / "bad"), "x@v1")
    ok = np.zeros((2, 32, 32, 3), np.uint8)
    bad = [UploadMessage("d", ok.astype(np.float32), 0), UploadMessage("d", ok[:, :16], 0),
           UploadMessage("d", ok, 0, np.array([np.nan, 1.0], np.float32)), "not a message",
           UploadMessage("d", ok[:0], 0)]
    replies = ray.get([adapter.upload.remote(b, "g", time.time()) for b in bad])
    assert [r["status"] for r in replies] == ["rejected"] * 5
    assert "uint8" in replies[0]["error"] and "shape" in replies[1]["error"]
    assert ray.get(adapter.upload.remote(UploadMessage("d", ok, 0, seq=1), "g", time.time()))["status"] == "ok"
    again = ray.get(adapter.upload.remote(UploadMessage("d", ok, 0, seq=1), "g", time.time()))
    assert again.get("duplicate")  # a retried upload is not counted twice
    stats = ray.get(adapter.drain.remote())
    assert stats["rejected"] == 5 and stats["acked_samples"] == 2 == stats["processed_samples"]
    ray.kill(adapter)


def test_bad_fleet_config_is_named(tmp_path):
    import cema

    with pytest.raises(SystemExit):
        cema.main(["--method", "magic", "--output-dir", str(tmp_path / "o"), "--storage", str(tmp_path / "s")])


def test_runs_with_one_run_name_are_isolated(ray_session, tmp_path):
    """A second run with the same run name and storage starts clean: it restores no adapter state
    and applies no parameters of the first; a run without a cloud applies none at all."""
    import cema

    def run(out, *extra):
        return cema.main([*SMALL, "--output-dir", str(tmp_path / out), "--storage", str(tmp_path / "store"),
                          "--run-name", "iso", *extra])["metrics"]

    first = run("a")
    assert first["adapter"]["published"] > 0 and first["devices_on_newest_version"] > 0
    edge_only = run("b", "--method", "tbr_stats", "--batches-per-device", "2")
    assert edge_only["devices_on_newest_version"] == 0  # the first run's edge-iso-* versions are not applied
    second = run("c", "--batches-per-device", "2")
    assert second["run_id"] != first["run_id"] and second["adapter"]["restored_from"] == 0
    assert second["adapter"]["acked_samples"] == second["adapter"]["processed_samples"]
    # (--resume of a run: test_driver_killed_mid_run_resumes_with_nothing_lost; an unknown one is named)
    with pytest.raises(SystemExit):
        run("d", "--resume", "iso-no-such-run")


def test_lift_is_treatment_minus_control_with_a_welch_interval():
    from tdmr_ray.fleet.run import lift

    out = lift([0.70, 0.72, 0.74, 0.76], [0.60, 0.62, 0.64])
    assert out["lift"] == pytest.approx(0.73 - 0.62, abs=1e-4)
    se = np.sqrt(np.var([0.70, 0.72, 0.74, 0.76], ddof=1) / 4 + np.var([0.60, 0.62, 0.64], ddof=1) / 3)
    assert out["ci95"] == pytest.approx([0.11 - 1.96 * se, 0.11 + 1.96 * se], abs=1e-4)
    assert lift([0.7, 0.8], [0.5])["lift"] is None  # one control device: no interval, no claim
    # seeded control draw: about the fraction, the same devices every time
    picks = [is_control(device_id(i), 0.1, 0) for i in range(1000)]
    assert 70 <= sum(picks) <= 130 and picks == [is_control(device_id(i), 0.1, 0) for i in range(1000)]


def test_host_checkpoint_is_columns_whose_count_does_not_grow_with_devices():
    """A host checkpoint stores one stacked tensor per state key (not one per device and key, whose
    safetensors header overflowed at 10,000 devices) and reads back every device exactly."""
    import torch
    from safetensors.torch import load, save

    from tdmr_ray.fleet.state_bank import pack_columns, unpack_columns

    def devices(n):
        return [{"affine.w": torch.rand(16), "position": torch.tensor(i),
                 **({"stats.mean": torch.rand(16)} if i % 3 else {}), "shift.mean": torch.rand(1 + i % 2)}
                for i in range(n)]

    small, large = pack_columns(devices(10)), pack_columns(devices(2000))
    assert len({k for k in large if not k.startswith("dev.")}) == len({k for k in small if not k.startswith("dev.")}) == 6
    original = devices(50)
    back = unpack_columns(load(save(pack_columns(original))), 50)
    for got, want in zip(back, original):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("class_stats", [False, True])  # edge.class_balanced_stats: per-class moments banked too
def test_state_bank_parks_devices_without_changing_what_they_compute(class_stats):
    """Devices parked in a StateBank between batches predict and checkpoint exactly as devices that
    keep their own tensors, and the bank holds their numbers in a few matrices, not per-device tensors."""
    import torch
    from safetensors.torch import load, save

    from tdmr_ray.cema import EdgeDeviceState, EdgeRunner, UpdateMessage, method_config
    from tdmr_ray.fleet.state_bank import BANKED_FIELDS, StateBank, pack_columns, unpack_columns
    from tdmr_ray.models import create_model

    torch.manual_seed(0)
    runner = EdgeRunner(create_model("resnet20"),  # random weights: mechanics
                        method_config("cema", settings={"edge.class_balanced_stats": True, "edge.stats_source": "upload"}
                                      if class_stats else {}))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    plain = [runner.new_device(f"d{i}") for i in range(3)]
    banked = [runner.new_device(f"d{i}") for i in range(3)]
    bank = StateBank(3)
    for i, s in enumerate(banked):
        bank.park(i, s)
    assert all(s.affine is None and s.stats is None for s in banked)
    update = UpdateMessage("g", 1, {k: v * 0.5 for k, v in runner.initial_affine.items()})
    for b, images in enumerate(batches):
        for i in range(3):
            if b == 1 and i == 2:  # an update mid-stream, to one device
                plain[i].offer(update)
            want = runner.infer(plain[i], images).logits
            bank.unpark(i, banked[i])
            if b == 1 and i == 2:
                banked[i].offer(update)
            got = runner.infer(banked[i], images).logits
            bank.park(i, banked[i])
            assert torch.equal(got, want), (b, i)
    fields = [f for f in BANKED_FIELDS if getattr(plain[0], f) is not None]
    assert fields == ["affine", "stats", "class_stats"][:3 if class_stats else 2]
    assert banked[2].version == 1 and len(bank.fields) == len(fields)
    assert sum(m.numel() for r in bank.fields.values() for m in r.matrices.values()) == 3 * sum(
        v.numel() for f in fields for v in getattr(plain[0], f).values())
    # checkpoint columns: the bank's rows plus the parked states' small parts read back as the plain states
    flat = pack_columns([s.to_tensors() for s in banked]) | bank.columns()
    back = [EdgeDeviceState.from_tensors(e) for e in unpack_columns(load(save(flat)), 3)]
    for got, want in zip(back, plain):
        g, w = got.to_tensors(), want.to_tensors()
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
    bank.park(2, banked[2])  # parked twice: harmless; a new state object for a parked row replaces it
    bank.unpark(2, banked[2])
    assert all(torch.equal(banked[2].affine[k], plain[2].affine[k]) for k in plain[2].affine)
    bank.park(2, banked[2])
    fresh = runner.new_device("d2")
    bank.park(2, fresh)
    bank.unpark(2, fresh)
    assert fresh.stats is None and all(torch.equal(fresh.affine[k], runner.initial_affine[k]) for k in fresh.affine)
    with pytest.raises(ValueError, match="does not fit"):
        bad = runner.new_device("d9")
        bad.affine = dict(list(bad.affine.items())[1:])
        bank.park(0, bad)


def test_one_update_fills_a_keys_parked_devices_as_if_each_had_applied_it():
    """A host applies a delivered version to all of a key's devices with one indexed write: each then
    holds exactly what offer + apply would give it; other rows are untouched; a set that does not fit
    the layout is refused before anything is written."""
    import torch

    from tdmr_ray.cema import EdgeRunner, UpdateMessage, method_config
    from tdmr_ray.fleet.state_bank import StateBank
    from tdmr_ray.models import create_model

    torch.manual_seed(0)
    runner = EdgeRunner(create_model("resnet20"), method_config("cema"))
    states = [runner.new_device(f"d{i}") for i in range(3)]
    bank = StateBank(3)
    for i, s in enumerate(states):
        bank.park(i, s)
    update = UpdateMessage("g", 4, {k: torch.randn_like(v) for k, v in runner.initial_affine.items()})
    bank.fill("affine", np.array([0, 2]), update.params)
    reference = runner.new_device("ref")
    reference.offer(update)
    reference.apply_pending()
    for i, s in enumerate(states):
        bank.unpark(i, s)
        want = reference.affine if i != 1 else runner.initial_affine
        assert all(torch.equal(s.affine[k], want[k]) for k in want), i
        bank.park(i, s)
    with pytest.raises(ValueError, match="do not fit the bank's layout: missing"):
        bank.fill("affine", np.array([1]), dict(list(update.params.items())[1:]))
    with pytest.raises(ValueError, match="is \\(3,\\)"):
        bank.fill("affine", np.array([1]), {k: (torch.zeros(3) if j == 5 else v)
                                            for j, (k, v) in enumerate(update.params.items())})
    bank.unpark(1, states[1])
    assert all(torch.equal(states[1].affine[k], runner.initial_affine[k]) for k in runner.initial_affine)
    with pytest.raises(ValueError, match="parked"):
        bank.fill("affine", np.array([1]), update.params)


def test_later_layer_statistics_fill_the_devices_that_have_statistics():
    """An update with some layers' statistics (edge.stats_source="split") lands in a key's parked
    devices as offer + apply gives it: those layers replaced, the others kept; a device that has run no
    batch keeps none (it starts from its first batch), in the bank and in EdgeDeviceState alike."""
    import torch

    from tdmr_ray.cema import EdgeRunner, UpdateMessage, method_config
    from tdmr_ray.fleet.state_bank import StateBank
    from tdmr_ray.models import create_model

    torch.manual_seed(0)
    runner = EdgeRunner(create_model("resnet20"), method_config("cema", settings={"edge.stats_source": "split"}))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    states = [runner.new_device(f"d{i}") for i in range(3)]
    for s in states[:2]:
        runner.infer(s, images)
    late = {k: torch.rand_like(v) if v.is_floating_point() else v + 5 for k, v in states[0].stats.items()
            if k.startswith("backbone.layer3.")}
    update = UpdateMessage("g", 1, {k: v * 0.5 for k, v in runner.initial_affine.items()}, late)
    reference, fresh = runner.new_device("ref"), runner.new_device("fresh")
    runner.infer(reference, images)
    for s in (reference, fresh):
        s.offer(update)
        s.apply_pending()
    assert fresh.stats is None and reference.stats.keys() == states[0].stats.keys()
    bank = StateBank(3)
    for i, s in enumerate(states):
        bank.park(i, s)
    bank.fill("affine", np.arange(3), update.params)
    bank.fill("stats", np.arange(3), update.stats, partial=True)
    for i, s in enumerate(states):
        bank.unpark(i, s)
    for s in states[:2]:
        assert all(torch.equal(s.stats[k], reference.stats[k]) for k in reference.stats)
    assert states[2].stats is None
    early = next(k for k in reference.stats if k not in late and k.endswith("running_mean"))
    assert all(torch.equal(reference.stats[k], late[k]) for k in late)  # replaced ...
    assert not torch.equal(reference.stats[early], torch.zeros_like(reference.stats[early]))  # ... the rest kept
    with pytest.raises(ValueError, match="unexpected"):
        bank.park(0, states[0])
        bank.fill("stats", np.arange(1), {"nope.running_mean": torch.zeros(3)}, partial=True)


def test_a_host_applies_each_version_once_to_its_treatment_devices_even_after_a_restore(tmp_path):
    """A delivered version goes to every treatment device of its key (not to control devices), once:
    a host restored from its checkpoint knows what its devices hold and neither re-applies nor
    re-counts it; a malformed version is counted and changes nothing."""
    import torch

    from tdmr_ray.cema import UpdateMessage
    from tdmr_ray.fleet import DeviceHost, FleetConfig

    threads = torch.get_num_threads()  # (a host pins its process to one thread)
    try:
        cfg = FleetConfig(devices=20, corruptions=["clean"], pool_size=64, batch_size=16, control_fraction=0.3,
                          storage=str(tmp_path / "store"))
        pools = {"clean": (np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int64))}

        def new_host():
            return DeviceHost(cfg, 0, list(range(20)), pools, [None], str(tmp_path / "run"))

        host = new_host()
        control = {d for d in host.devices if host.control[d]}
        assert 0 < len(control) < 20
        half = {k: v * 0.5 for k, v in host.runner.initial_affine.items()}
        assert host._apply(UpdateMessage("clean", 3, half))
        host.key_version["clean"] = 3

        def books(h):
            return {d: (h.state[d].version, h.state[d].accounting.updates_received,
                        h.state[d].accounting.updates_applied) for d in h.devices}

        assert books(host) == {d: (0, 0, 0) if d in control else (3, 1, 1) for d in host.devices}
        host._checkpoint()
        restored = new_host()
        assert restored.restored and restored.key_version == {"clean": 3}
        assert books(restored) == books(host)
        assert not restored._apply(UpdateMessage("clean", 3, half))  # every device already holds it
        assert books(restored) == books(host)
        assert not restored._apply(UpdateMessage("clean", 4, dict(list(half.items())[1:])))
        assert restored.counters["bad_updates"] == 1 and books(restored) == books(host)
        assert restored._apply(UpdateMessage("clean", 5, {k: v * 0.25 for k, v in half.items()}))
        assert books(restored) == {d: (0, 0, 0) if d in control else (5, 2, 2) for d in host.devices}
        d = next(d for d in restored.devices if d not in control)
        restored.bank.unpark(restored.row[d], restored.state[d])
        want = {k: v * 0.25 for k, v in half.items()}
        assert all(torch.equal(restored.state[d].affine[k], want[k]) for k in want)
    finally:
        torch.set_num_threads(threads)
