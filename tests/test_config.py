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
    yml.write_text("name: off\n")  # YAML 1.1: a boolean, not the string "off"
    with pytest.raises(ConfigError, match="'name': got the boolean False.*quote it"):
        load_config(Cfg, ["--config", str(yml)], PRESETS)
    yml.write_text("name: 'off'\n")
    assert load_config(Cfg, ["--config", str(yml)], PRESETS).name == "off"
    assert load_config(Cfg, ["--name", "off"], PRESETS).name == "off"  # a flag's value stays a string


@pytest.mark.parametrize("yaml_text, says", [
    ("name: [a, b]\n", "'name': got a list"),           # would have become the string "['a', 'b']"
    ("inner:\n  steps: true\n", "'inner.steps': got the boolean True where a number"),  # would be 1
    ("inner:\n  lr: false\n", "'inner.lr': got the boolean False where a number"),     # would be 0.0
    ("sizes: {a: 1}\n", "'sizes': got a dict"),           # would be the mapping's keys
    ("preset: [quick]\n", "unknown preset \\['quick'\\]"),  # was a TypeError (unhashable)
])
def test_yaml_values_of_the_wrong_kind_are_named(tmp_path, yaml_text, says):
    yml = tmp_path / "c.yaml"
    yml.write_text(yaml_text)
    with pytest.raises(ConfigError, match=says):
        load_config(Cfg, ["--config", str(yml)], PRESETS)


def test_fleet_users_settings_win_over_the_methods_own(tmp_path):
    """A method's preset (cema_plus: source pull 0.01, device statistics) must not silently replace
    what the user set by flag or file, also where the user sets the reference's default value."""
    from tdmr_ray.cema import METHODS
    from tdmr_ray.fleet import FLEET_PRESETS, FleetConfig

    own = dict(METHODS["cema_plus"].settings)
    assert own["cloud.source_pull"] == 0.01 and own["edge.stats_source"] == "split"
    plain = load_config(FleetConfig, ["--method", "cema_plus"], FLEET_PRESETS).cema_config()
    assert (plain.cloud.source_pull, plain.edge.stats_source) == (0.01, "split")
    yml = tmp_path / "fleet.yaml"
    yml.write_text("cema:\n  edge:\n    stats_source: local\n")
    cfg = load_config(FleetConfig, ["--config", str(yml), "--method", "cema_plus",
                                    "--cema.cloud.source-pull", "0"], FLEET_PRESETS)
    assert cfg.cema_pinned == ["cloud.source_pull", "edge.stats_source"]
    resolved = cfg.cema_config()
    assert (resolved.cloud.source_pull, resolved.edge.stats_source) == (0.0, "local")
    assert resolved.shift.detect == own["shift.detect"]  # what the user left alone stays the method's
    with pytest.raises(ValueError, match="unknown cema key 'cloud.nope'"):
        FleetConfig(cema_pinned=["cloud.nope"]).cema_config()
