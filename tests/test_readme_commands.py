"""README's commands, as written: every job command's flags parse and validate, bench flags parse,
the Serve config imports, the scripts exist (scripts/check_readme.py)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def test_every_readme_command_checks_out():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_readme.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " 0 failed" in proc.stdout and int(proc.stdout.rsplit("\n", 2)[-2].split()[0]) >= 20


def test_the_walker_fails_a_wrong_command(tmp_path):
    import check_readme

    readme = tmp_path / "README.md"
    readme.write_text("```bash\npython jobs/cema.py --no-such-flag 3\npython jobs/gdfq.py --w-bits 9\n"
                      "python jobs/tdmr.py --preset nope\nserve run serve/missing.yaml\n"
                      "ray job submit --working-dir . -- python jobs/cema.py \\\n    --devices 4\n```\n")
    results = [check_readme.check(c) for c in check_readme.readme_commands(readme.read_text())]
    assert [r.status for r in results] == ["failed", "failed", "failed", "failed", "ok"]
    assert "w_bits" in results[1].detail or "bits" in results[1].detail
