"""Walk README's shell commands and check each one as written, without running the long ones.

* ``python jobs/X.py ARGS`` (also behind ``ray job submit ... --``): the job parses and validates
  its settings (``--check-config``: unknown flags, bad values, missing presets fail) in-process.
* ``python bench/X.py ARGS``: the benchmark's argument parser accepts them.
* ``serve run|deploy FILE``: the config file exists and its ``import_path`` imports.
* ``bash FILE``, ``--config FILE``, ``--job-config FILE``: the file exists (placeholders excepted).
* Everything else (``ray start``, ``ray up``, ``curl``, ``export`` ...) is listed as not checked
  here: the cluster paths are exercised by tests/test_job_submit.py, tests/test_cluster_yaml.py and
  tests/test_serve*.py.

Placeholders a user must replace (``my-...``, ``/data/...``, ``YOUR-BUCKET``) are parsed but their
files are not required. Usage: ``python scripts/check_readme.py [README.md]``; exit status 1 if a
checked command fails. tests/test_readme_commands.py runs it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDERS = re.compile(r"(^|[/ =])(my-|/data/|YOUR-BUCKET)")


@dataclass
class Checked:
    command: str
    status: str  # "ok", "failed", "not checked"
    detail: str = ""


def readme_commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks (continuations joined, comments and heredoc bodies dropped)."""
    commands, block, heredoc = [], False, None
    pending = ""
    for line in text.splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if not line or line.startswith("#"):
            continue
        if "<<'" in line:
            heredoc = line.split("<<'", 1)[1].split("'", 1)[0]
        commands.append(line)
    return commands


def _argv(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    if "--" in words and words[:2] == ["ray", "job"]:
        words = words[words.index("--") + 1:]
    return words


def _run_main(module_path: Path, argv: list[str], entry: str) -> tuple[bool, str]:
    # As ``python jobs/X.py`` runs it: the script's directory first on sys.path, the module registered.
    name = f"_readme_{module_path.stem}"
    spec = importlib.util.spec_from_file_location(name, module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if str(module_path.parent) not in sys.path:
        sys.path.insert(0, str(module_path.parent))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            spec.loader.exec_module(module)
            getattr(module, entry)(argv)
        except SystemExit as exc:
            code = exc.code or 0
            return code == 0, err.getvalue().strip()[-500:] or f"exit {code}"
        except Exception as exc:  # the command would crash as written
            return False, f"{type(exc).__name__}: {exc}"
    return entry == "parse_args", "" if entry == "parse_args" else "ran without --check-config exiting"


def check(command: str) -> Checked:
    words = _argv(command)
    placeholder = bool(PLACEHOLDERS.search(command))
    if len(words) >= 2 and words[0] in ("python", ".venv/bin/python") and words[1].endswith(".py"):
        script = REPO / words[1]
        if not script.exists():
            return Checked(command, "failed", f"{words[1]} does not exist")
        args = words[2:]
        if script.parent.name == "jobs":
            if placeholder:  # flags only: the files named do not exist here
                args = [a for a in args if not PLACEHOLDERS.search(a)]
                args = _drop_dangling_flags(args)
            ok, detail = _run_main(script, args + ["--check-config"], "main")
        elif script.parent.name == "bench":
            ok, detail = _run_main(script, args, "parse_args")
        else:
            return Checked(command, "not checked", "a script outside jobs/ and bench/")
        return Checked(command, "ok" if ok else "failed", detail)
    if words[:1] == ["serve"] and len(words) >= 3 and words[1] in ("run", "deploy"):
        import yaml

        path = REPO / words[2]
        if not path.exists():
            return Checked(command, "failed", f"{words[2]} does not exist")
        try:
            for app in yaml.safe_load(path.read_text()).get("applications", []):
                module, _, attr = app["import_path"].rpartition(":") if ":" in app["import_path"] else \
                    app["import_path"].rpartition(".")
                getattr(importlib.import_module(module), attr)
        except Exception as exc:
            return Checked(command, "failed", f"{words[2]}: {type(exc).__name__}: {exc}")
        return Checked(command, "ok", "config and import_path")
    if words[:1] == ["bash"] and len(words) >= 2:
        ok = (REPO / words[1]).exists()
        return Checked(command, "ok" if ok else "failed", "" if ok else f"{words[1]} does not exist")
    return Checked(command, "not checked")


def _drop_dangling_flags(args: list[str]) -> list[str]:
    """After removing placeholder values, drop the flags left without one."""
    out = []
    for i, a in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a.startswith("--") and a in ("--data", "--model", "--job-config", "--config", "--storage") and \
                (nxt is None or nxt.startswith("--")):
            continue
        out.append(a)
    return out


def main(argv=None) -> int:
    readme = Path((argv or sys.argv[1:] or [REPO / "README.md"])[0])
    sys.path.insert(0, str(REPO))
    results = [check(c) for c in readme_commands(readme.read_text())]
    for r in results:
        print(f"{r.status:12s} {r.command}" + (f"\n             -> {r.detail}" if r.status == "failed" else ""))
    failed = [r for r in results if r.status == "failed"]
    print(f"{sum(r.status == 'ok' for r in results)} ok, {len(failed)} failed, "
          f"{sum(r.status == 'not checked' for r in results)} not checked here")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
