from dataclasses import dataclass, field

import pytest

from foundation.config import ConfigError, config_to_dict, load_config


@dataclass
class Inner:
    size: int = 4
    rate: float = 0.5
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    blocks: list[int] | str = "all"
    offsets: list[int] | dict[int, int] | None = None


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "name: a\ninner:\n  size: 8\noffsets: {+1: 1, -1: 1, 0: 10}\n")
    assert load_config(Outer, p, ["inner.rate=3e-4"]).inner.rate == 3e-4  # YAML 1.1 reads it as a string
    cfg = load_config(Outer, p, ["inner.rate=2", "blocks=[1, 12]", "inner.names=[a, b]"])
    assert cfg.inner.size == 8 and cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert cfg.blocks == [1, 12] and cfg.inner.names == ["a", "b"]
    assert cfg.offsets == {1: 1, -1: 1, 0: 10}
    assert config_to_dict(cfg)["inner"] == {"size": 8, "rate": 2.0, "names": ["a", "b"]}
    # A mapping given whole replaces the file's mapping; a dotted key merges into it.
    assert load_config(Outer, p, ["offsets={1: 1, 0: 11}"]).offsets == {1: 1, 0: 11}
    assert load_config(Outer, p, ["offsets.0=9"]).offsets == {1: 1, -1: 1, 0: 9}


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "inner:\n  sise: 8\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*unknown key 'inner\.sise'"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match=r"unknown key 'nme'"):
        load_config(Outer, None, ["nme=b"])


def test_wrong_type_names_key_and_file(tmp_path):
    p = write(tmp_path, "inner:\n  size: eight\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*'inner\.size': expected int, got 'eight'"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match=r"'inner\.size'"):
        load_config(Outer, None, ["inner.size=true"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["inner.size"])
