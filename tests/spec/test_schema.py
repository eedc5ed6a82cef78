from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from metarl_robot.spec.schema import SpecError, build, check_schema_version, load_yaml, to_plain


@dataclass
class Inner:
    gain: float
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    count: int
    inner: Inner
    items: list[float] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    maybe: str | None = None


def test_build_nested_dataclasses_and_round_trip():
    data = {"name": "x", "count": 3, "inner": {"gain": 2, "mode": "b"}, "items": [1, 2.5], "extra": {"k": 1}}
    obj = build(Outer, data, "cfg.yaml")
    assert obj.inner.gain == 2.0 and isinstance(obj.inner.gain, float)
    assert to_plain(obj) == {**data, "inner": {"gain": 2.0, "mode": "b"}, "maybe": None}


@pytest.mark.parametrize(
    ("data", "field_path", "fragment"),
    [
        ({"name": "x", "count": 1, "inner": {"gain": 1}, "typo": 1}, "typo", "unknown key 'typo'; allowed keys"),
        ({"name": "x", "inner": {"gain": 1}}, "count", "missing required key"),
        ({"name": "x", "count": 1.5, "inner": {"gain": 1}}, "count", "expected an integer"),
        ({"name": "x", "count": True, "inner": {"gain": 1}}, "count", "expected an integer"),
        ({"name": "x", "count": 1, "inner": {"gain": "fast"}}, "inner.gain", "expected a number"),
        ({"name": "x", "count": 1, "inner": {"gain": float("nan")}}, "inner.gain", "must be finite"),
        ({"name": "x", "count": 1, "inner": {"gain": 1, "mode": "c"}}, "inner.mode", "allowed: 'a', 'b'"),
        ({"name": "x", "count": 1, "inner": {"gain": 1}, "items": [1, "q"]}, "items[1]", "expected a number"),
        ({"name": "x", "count": 1, "inner": {"gain": 1}, "extra": {"k": "v"}}, "extra.k", "expected an integer"),
        ({"name": "x", "count": 1, "inner": {"gain": 1}, "maybe": 3}, "maybe", "expected str or null"),
    ],
)
def test_build_rejects_bad_input_naming_the_field(data, field_path, fragment):
    with pytest.raises(SpecError) as err:
        build(Outer, data, "cfg.yaml")
    assert err.value.where == "cfg.yaml"
    assert err.value.field == field_path
    assert fragment in str(err.value)


def test_schema_version_checks():
    check_schema_version({"schema_version": 1}, "f", 1, "thing")
    with pytest.raises(SpecError, match="missing; this thing reader expects schema_version: 1"):
        check_schema_version({}, "f", 1, "thing")
    with pytest.raises(SpecError, match=r"thing schema version 2 is not supported; this version of .* reads 1"):
        check_schema_version({"schema_version": 2}, "f", 1, "thing")


def test_load_yaml_errors(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_yaml(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping at top level"):
        load_yaml(tmp_path / "list.yaml")


def test_a_key_written_twice_is_refused_naming_it_and_its_lines(tmp_path):
    (tmp_path / "twice.yaml").write_text("name: a\ninner:\n  gain: 1.0\n  gain: 2.0\n")
    with pytest.raises(SpecError, match=r"(?s)duplicate key 'gain' \(first on line 3\).*twice.yaml\", line 4"):
        load_yaml(tmp_path / "twice.yaml")
    # merge keys are not duplicates: an explicit key overrides what <<: brings in, as YAML says
    (tmp_path / "merge.yaml").write_text("base: &b {gain: 1.0, mode: a}\ninner:\n  <<: *b\n  gain: 2.0\n")
    assert load_yaml(tmp_path / "merge.yaml")[0]["inner"] == {"gain": 2.0, "mode": "a"}
