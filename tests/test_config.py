"""Config: YAML layering, typed key=value overrides, clear errors for unknown keys and wrong types."""
import os

import pytest

from hfsoftmax.config import Config, ConfigError, config_from_dict, load_config, save_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.steps=7", "optim.lr=0.5", "head.margin=arcface", "optim.milestones=[3, 5]",
                             "data.skip_bad=true", "optim.weight_decay=0"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 0.5
    assert cfg.head.margin == "arcface"
    assert cfg.optim.milestones == [3, 5]
    assert cfg.data.skip_bad is True
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)   # int widened
    assert Config().train.steps != 7                                                       # no shared state


def test_yaml_layering(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 10\n  batch_size: 4\nhead:\n  name: full\n")
    (tmp_path / "exp.yaml").write_text("_base_: base.yaml\ntrain:\n  steps: 20\n")
    cfg = load_config(str(tmp_path / "exp.yaml"), ["train.batch_size=8"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.head.name) == (20, 8, "full")


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"train\.stpes"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'hed'"):
        load_config(None, ["hed.name=hf"])


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "optim.lrr" in str(e.value) and "bad.yaml" in str(e.value)


@pytest.mark.parametrize("override,key", [("train.steps=abc", "train.steps"), ("train.steps=1.5", "train.steps"),
                                          ("optim.lr=fast", "optim.lr"), ("data.skip_bad=3", "data.skip_bad"),
                                          ("optim.milestones=5", "optim.milestones")])
def test_wrong_type_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_choice_validation():
    with pytest.raises(ConfigError, match="head.margin"):
        load_config(None, ["head.margin=sphereface"])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(None, ["train.steps=11", "head.mach.num_hashes=4"])
    path = os.path.join(tmp_path, "config.yaml")
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_shipped_configs_load():
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    names = [n for n in os.listdir(root) if n.endswith(".yaml")]
    assert names
    for n in names:
        load_config(os.path.join(root, n))


def test_every_shipped_config_loads():
    import glob
    import os

    from hfsoftmax.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
    assert len(paths) >= 10
    for p in paths:
        cfg = load_config(p, [])
        assert cfg.train.steps > 0 and cfg.model.feature_dim > 0, p
