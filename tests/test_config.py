"""Config: YAML round trip, dotted overrides, validation errors naming the field, hashing, pickling."""

import pickle

import pytest

from byztrain.config import Config, ConfigError, apply_overrides


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = Config.from_dict({"name": "x", "peers": 8, "train": {"lr": 0.1, "nesterov": True}})
    path = tmp_path / "c.yaml"
    cfg.save(path)
    again = Config.load(path)
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()


def test_dotted_overrides_parse_yaml_scalars():
    cfg = Config.from_dict({}).with_overrides(["train.lr=0.05", "peers=32", "train.nesterov=true",
                                               "attack.params.scale=-10", "defense.pre=[bucketing]"])
    assert cfg.train.lr == 0.05 and cfg.peers == 32 and cfg.train.nesterov is True
    assert cfg.attack.params == {"scale": -10}
    assert cfg.defense.pre == ["bucketing"]


def test_config_file_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ntrain:\n  steps: 10\n")
    cfg = Config.load(path, ["train.steps=20"])
    assert cfg.name == "a" and cfg.train.steps == 20


@pytest.mark.parametrize(
    "data, field, fragment",
    [
        ({"trian": {"lr": 1}}, "trian", "did you mean 'train'"),
        ({"train": {"lerning_rate": 1}}, "train.lerning_rate", "did you mean 'train.lr'"),
        ({"train": {"lr": -0.1}}, "train.lr", "must be > 0"),
        ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
        ({"peers": 2.5}, "peers", "must be an integer"),
        ({"peers": 4, "byzantine": 4}, "byzantine", "must be < peers"),
        ({"peers": 16, "byzantine": 8, "defense": {"name": "btard"}}, "byzantine", "fewer than half"),
        ({"peers": 5, "byzantine": 2, "defense": {"name": "btard"}}, "byzantine", "(peers - defense.validators)/2"),
        ({"task": {"dataset": "fashion_mnist"}}, "task.dataset", "did you mean 'fashion-mnist'"),
        ({"task": {"split": "noniid"}}, "task.split", "accepted: iid, dirichlet"),
        ({"defense": {"name": "krumm"}}, "defense.name", "did you mean 'krum'"),
        ({"attack": {"name": "sign_flip"}, "byzantine": 0}, "byzantine", "needs byzantine >= 1"),
        ({"attack": {"name": "sing_flip"}, "byzantine": 1}, "attack.name", "did you mean 'sign_flip'"),
        ({"attack": {"name": "sign_flip", "params": {"scael": 2}}, "byzantine": 1}, "attack.params.scael", "scale"),
        ({"train": {"schedule": "linear"}}, "train.schedule", "accepted: constant, cosine"),
        ({"runtime": {"kind": "mpi"}}, "runtime.kind", "accepted"),
    ],
)
def test_bad_fields_name_the_field(data, field, fragment):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(data)
    assert err.value.field == field
    assert fragment in str(err.value)
    assert f"'{field}'" in str(err.value)


def test_hash_is_stable_and_ignores_output_location():
    a = Config.from_dict({"seed": 1})
    b = Config.from_dict({"seed": 1, "log": {"out": "/tmp/elsewhere", "tensorboard": False}})
    c = Config.from_dict({"seed": 2})
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert hash(a) == hash(b)
    assert len({a, c}) == 2


def test_picklable():
    cfg = Config.from_dict({"attack": {"name": "sign_flip"}, "byzantine": 3})
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_override_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"peers": 3}, ["peers.x=1"])


# ---- numbers as people type them: YAML 1.1 reads '1e7' as a string, we read it as a float ---------------

NUMBERS = [("1e7", 1e7), ("1e-3", 1e-3), ("1E+2", 100.0), (".5", 0.5), ("-2.5e-1", -0.25), ("1.0e3", 1000.0)]


@pytest.mark.parametrize("text, value", NUMBERS)
def test_dotted_overrides_read_exponents_as_floats(text, value):
    cfg = Config.from_dict({"byzantine": 1, "attack": {"name": "sign_flip"}}).with_overrides(
        [f"attack.params.scale={text}", f"train.lr={text.lstrip('-')}", f"defense.cclip_tol={text.lstrip('-')}"]
    )
    assert cfg.attack.params["scale"] == value and isinstance(cfg.attack.params["scale"], float)
    assert cfg.train.lr == abs(value) and cfg.defense.cclip_tol == abs(value)


def test_config_and_grid_files_read_exponents_as_floats(tmp_path):
    from byztrain.experiments.sweep import expand_grid, load_grid

    path = tmp_path / "c.yaml"
    path.write_text(
        "byzantine: 1\nattack: {name: sign_flip, params: {scale: 1E+2}}\n"
        "defense: {cclip_tol: 1e-3}\ntrain: {lr: .5, steps: 1e3}\n"
    )
    cfg = Config.load(path)
    assert cfg.attack.params == {"scale": 100.0}
    assert (cfg.defense.cclip_tol, cfg.train.lr, cfg.train.steps) == (1e-3, 0.5, 1000)
    path.write_text("train: {lr: [1e-3, 1e-2]}\n")
    assert [p.data["train"]["lr"] for p in expand_grid(load_grid(path))] == [1e-3, 1e-2]


def test_exponent_floats_reach_free_form_attack_params():
    # A free-form mapping keeps what YAML gives it, so only the loader can make '1e-2' a number here.
    cfg = Config.from_dict({}).with_overrides(
        ["byzantine=1", "defense.name=btard", "attack.name=lie_in_check", "attack.params.size=1e-2"]
    )
    assert cfg.attack.params["size"] == 0.01


def test_yaml_keeps_its_other_types_and_round_trips_float_like_strings(tmp_path):
    from byztrain.config import yaml_load

    assert yaml_load("[12, 1_000, 0x1f, true, null, .inf, 1e, e5, 1.2.3, '1e7']") == [
        12, 1000, 31, True, None, float("inf"), "1e", "e5", "1.2.3", "1e7"
    ]
    cfg = Config.from_dict({"name": "1e7"})
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml").name == "1e7"
