import json
import subprocess
import sys
from pathlib import Path

from tdmr_ray.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def test_evaluate_job_end_to_end(ray_session, tmp_path):
    sys.path.insert(0, str(REPO / "jobs"))
    import evaluate

    summary = evaluate.main(["--models", "resnet20", "--limit", "300", "--output-dir", str(tmp_path / "out"),
                             "--storage", str(tmp_path / "store")])
    assert summary["metrics"]["resnet20"]["clean"] > 90
    assert 60 < summary["metrics"]["resnet20"]["jpeg"] < summary["metrics"]["resnet20"]["clean"]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["registry_version"] == "resnet20-cifar10@v1" and written["config"]["limit"] == 300
    model = Registry.for_storage(str(tmp_path / "store")).load_model("resnet20-cifar10")
    assert model.arch["name"] == "resnet20"


def test_job_rejects_unknown_flag_and_key(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--modles", "x"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--modles" in out.stderr
    bad = tmp_path / "c.yaml"
    bad.write_text("models: [resnet20]\nlimt: 3\n")
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--config", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown key 'limt'" in out.stderr
