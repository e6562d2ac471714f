"""megarl.config: YAML -> frozen dataclasses, overrides, errors, dump round trip."""

from __future__ import annotations

import enum
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Literal

import pytest
import yaml

from megarl.config import apply_overrides, dump_config, load_config, parse_override, parse_yaml, to_dict


class Device(enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class Inner:
    gamma: float = 1.0
    lam: float = 0.95
    mode: Literal["grpo", "rloo", "none"] = "grpo"
    steps: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")


@dataclass(frozen=True)
class Term:
    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class Root:
    inner: Inner = field(default_factory=Inner)
    seed: int = 0
    lr: float = 1e-6
    use_kl: bool = False
    note: str = "x"
    limit: int | None = None
    pair: tuple[int, str] = (0, "a")
    terms: list[Term] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    device: Device = Device.CPU
    maybe_inner: Inner | None = None


@dataclass(frozen=True)
class Required:
    path: str
    inner: Inner = field(default_factory=Inner)


@dataclass(frozen=True)
class Whole:
    lo: int = 0
    hi: int = 1

    def __post_init__(self) -> None:
        if self.lo > self.hi:
            raise ValueError(f"empty range: lo {self.lo} > hi {self.hi}")  # about two fields


@dataclass(frozen=True)
class Nested:
    pairs: tuple[Whole, ...] = ()


def test_yaml_file_nested_and_typed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        """
inner:
  gamma: 1          # an int is a valid float
  mode: rloo
  steps: [3, 4, 5]
seed: 7
lr: 1e-5            # YAML 1.2 float (PyYAML's 1.1 rules would load a string)
use_kl: true
note: off           # stays a string: only true/false are booleans
limit: null
pair: [2, b]
terms:
  - {name: verifier}
  - {name: format, weight: 0.5}
extra: {a: 1, b: 2.5}
device: gpu
maybe_inner: {lam: 0.5}
"""
    )
    cfg = load_config(Root, recipe)
    assert cfg.inner == Inner(gamma=1.0, mode="rloo", steps=(3, 4, 5))
    assert isinstance(cfg.inner.gamma, float)
    assert (cfg.seed, cfg.lr, cfg.use_kl, cfg.note, cfg.limit) == (7, 1e-5, True, "off", None)
    assert cfg.pair == (2, "b")
    assert cfg.terms == [Term("verifier"), Term("format", 0.5)]
    assert cfg.extra == {"a": 1.0, "b": 2.5}
    assert cfg.device is Device.GPU
    assert cfg.maybe_inner == Inner(lam=0.5)
    with pytest.raises(FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_defaults_from_none_and_empty_file(tmp_path):
    assert load_config(Root) == Root()
    empty = tmp_path / "e.yaml"
    empty.write_text("# nothing\n")
    assert load_config(Root, empty) == Root()


def test_unknown_key_names_full_path_allowed_keys_and_suggestion(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(Root, {"inner": {"gama": 0.9}})
    msg = str(err.value)
    assert "'inner.gama'" in msg and "did you mean 'gamma'" in msg
    assert "gamma, lam, mode, steps" in msg
    with pytest.raises(ValueError, match=r"'terms\[1\]\.wieght'.*did you mean 'weight'"):
        load_config(Root, {"terms": [{"name": "a"}, {"name": "b", "wieght": 1}]})
    with pytest.raises(ValueError, match="unknown config key 'sed'.*at the top level"):
        load_config(Root, {"sed": 1})
    # the file is named too
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("inner:\n  lamb: 0.9\n")
    with pytest.raises(ValueError, match=rf"{recipe}: unknown config key 'inner.lamb' \(did you mean 'lam'\?\)"):
        load_config(Root, recipe)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"seed": 1.5}, r"'seed': expected int, got 1\.5 \(float\)"),
        ({"seed": True}, r"'seed': expected int, got True \(bool\)"),
        ({"use_kl": "yes"}, r"'use_kl': expected bool, got 'yes' \(str\)"),
        ({"use_kl": 1}, r"'use_kl': expected bool, got 1 \(int\)"),
        ({"lr": "fast"}, r"'lr': expected float, got 'fast' \(str\)"),
        ({"note": 3}, r"'note': expected str, got 3 \(int\)"),
        ({"limit": "x"}, r"'limit': expected int or null, got 'x'"),
        ({"inner": {"mode": "rlo"}}, r"'inner.mode': expected one of 'grpo', 'rloo', 'none'.*did you mean 'rloo'"),
        ({"inner": {"steps": [1, "2"]}}, r"'inner.steps\[1\]': expected int, got '2'"),
        ({"inner": 3}, r"'inner': expected a mapping for Inner, got 3"),
        ({"inner": None}, r"'inner': expected a mapping for Inner, got None \(null\)"),
        ({"pair": [1]}, r"'pair': expected a list of 2 items"),
        ({"extra": {"a": "b"}}, r"'extra.a': expected float, got 'b'"),
        ({"device": "tpu"}, r"'device': expected one of 'cpu', 'gpu', got 'tpu'"),
        ({"terms": [{"weight": 1.0}]}, r"'terms\[0\].name' is required"),
    ],
)
def test_type_errors_name_key_expected_and_value(data, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(Root, data)


def test_post_init_error_is_prefixed_with_key():
    with pytest.raises(ValueError, match=r"config key 'inner.gamma': gamma must be in \[0, 1\], got 1\.5"):
        load_config(Root, {"inner": {"gamma": 1.5}})
    with pytest.raises(ValueError, match=r"config key 'Whole': empty range: lo 2 > hi 1"):
        load_config(Whole, {"lo": 2, "hi": 1})
    with pytest.raises(ValueError, match=r"config key 'pairs\[0\]': empty range"):
        load_config(Nested, {"pairs": [{"lo": 2, "hi": 1}]})
    with pytest.raises(ValueError, match=r"config key 'path' is required \(str\)"):
        load_config(Required, {})


def test_overrides_yaml_scalars_create_levels_and_are_validated():
    cfg = load_config(
        Root,
        {"inner": {"gamma": 0.5}},
        ["inner.lam=1e-3", "seed=3", "note='007'", "limit=", "inner.steps=[9]", "use_kl=true", "maybe_inner.mode=none"],
    )
    assert cfg.inner == Inner(gamma=0.5, lam=1e-3, steps=(9,))
    assert (cfg.seed, cfg.note, cfg.limit, cfg.use_kl) == (3, "007", None, True)
    assert cfg.maybe_inner == Inner(mode="none")
    with pytest.raises(ValueError, match=r"unknown config key 'inner.gama'.*did you mean 'gamma'"):
        load_config(Root, {}, ["inner.gama=0.9"])
    with pytest.raises(ValueError, match=r"'seed': expected int, got 'abc'"):
        load_config(Root, {}, ["seed=abc"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_override("seed")
    with pytest.raises(ValueError, match="empty component"):
        parse_override("inner..lam=1")
    with pytest.raises(ValueError, match=r"'seed' holds 3, not a mapping"):
        apply_overrides({"seed": 3}, ["seed.x=1"])
    # overrides never mutate the caller's mapping
    source = {"inner": {"gamma": 0.5}}
    apply_overrides(source, ["inner.gamma=0.1"])
    assert source == {"inner": {"gamma": 0.5}}


def test_yaml_rules_and_file_errors(tmp_path):
    assert parse_yaml("a: on\nb: No\nc: 2e3\nd: FALSE\ne: 1.5\nf: 3") == {
        "a": "on", "b": "No", "c": 2000.0, "d": False, "e": 1.5, "f": 3
    }
    with pytest.raises(ValueError, match="duplicate key 'seed'"):
        parse_yaml("seed: 1\nseed: 2\n")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ValueError, match=f"config file {missing} does not exist"):
        load_config(Root, missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("inner: [1, 2\n")
    with pytest.raises(ValueError, match=f"{broken}: invalid YAML"):
        load_config(Root, broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=f"{listy}: the top level must be a mapping"):
        load_config(Root, listy)


def test_dump_round_trip_atomic(tmp_path):
    cfg = load_config(
        Root,
        {"terms": [{"name": "v"}], "extra": {"k": 2.0}, "device": "gpu", "pair": [1, "z"], "maybe_inner": {}},
        ["inner.steps=[4]"],
    )
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Root, path) == cfg
    assert load_config(Root, to_dict(cfg)) == cfg
    plain = yaml.safe_load(path.read_text())
    assert plain["inner"]["steps"] == [4] and plain["device"] == "gpu"
    assert list(plain)[:3] == ["inner", "seed", "lr"]  # declaration order, for humans
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left
