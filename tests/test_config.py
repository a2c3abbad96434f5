from dataclasses import dataclass, field

import pytest

from tdmr_ray.config import ConfigError, load_config


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 3


@dataclass
class Cfg:
    preset: str = "quick"
    name: str = "a"
    flag: bool = False
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)


PRESETS = {"quick": {"name": "q"}, "full": {"name": "f", "inner": {"steps": 100}}}


def test_precedence_defaults_preset_file_flags(tmp_path):
    assert load_config(Cfg, [], PRESETS).name == "q"
    cfg = load_config(Cfg, ["--preset", "full"], PRESETS)
    assert (cfg.name, cfg.inner.steps, cfg.inner.lr) == ("f", 100, 0.1)
    yml = tmp_path / "c.yaml"
    yml.write_text("preset: full\nname: from-file\ninner:\n  lr: 0.5\nsizes: [4, 5]\n")
    cfg = load_config(Cfg, ["--config", str(yml), "--inner.lr", "0.25", "--flag"], PRESETS)
    assert (cfg.name, cfg.inner.lr, cfg.inner.steps, cfg.sizes, cfg.flag) == ("from-file", 0.25, 100, [4, 5], True)
    assert load_config(Cfg, ["--sizes", "7,8"], PRESETS).sizes == [7, 8]


def test_unknown_keys_and_flags_are_named(tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text("inner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'inner.lrr'"):
        load_config(Cfg, ["--config", str(yml)], PRESETS)
    with pytest.raises(SystemExit):
        load_config(Cfg, ["--nmae", "x"], PRESETS)
    assert "--nmae" in capsys.readouterr().err
    yml.write_text("inner:\n  steps: many\n")
    with pytest.raises(ConfigError, match="'inner.steps'.*not a valid int"):
        load_config(Cfg, ["--config", str(yml)], PRESETS)
    with pytest.raises(SystemExit):
        load_config(Cfg, ["--preset", "huge"], PRESETS)
