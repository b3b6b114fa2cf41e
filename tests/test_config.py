"""blendsign.config: paper defaults, presets that only override, round trips, TOML site files."""

from __future__ import annotations

import argparse
from functools import reduce
from pathlib import Path

import pytest

from blendsign.config import PRESETS, RUN_SECTIONS, Config, RegistryConfig, load_preset, override_dotted


def test_paper_preset_is_the_defaults() -> None:
    cfg = load_preset("paper")
    assert cfg == Config(preset="paper")
    assert cfg.ingest.min_age_years == 7.0 and cfg.folds.k == 5 and cfg.synth.size == 512


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_only_override_named_fields(name: str) -> None:
    cfg, base = load_preset(name).to_dict(), Config().to_dict()
    for section, values in base.items():
        if not isinstance(values, dict):
            continue
        changed = {k for k in values if cfg[section][k] != values[k]}
        assert changed == set(PRESETS[name].get(section, {}))


def test_round_trip_and_flat() -> None:
    cfg = load_preset("ci")
    assert Config.from_dict(cfg.to_dict()) == cfg
    flat = cfg.flat()
    assert flat["synth.size"] == 64 and flat["preset"] == "ci"
    with pytest.raises(ValueError, match="unknown config field"):
        Config.from_dict({"synth": {"nope": 1}})
    # a field an earlier version wrote (into checkpoints, registered models) is read and ignored
    old = cfg.to_dict()
    old["train"]["select_metric"] = "auc_blend_sign"
    assert Config.from_dict(old) == cfg
    with pytest.raises(ValueError, match=r"IngestConfig.workers must be int, got 'eight'"):
        Config.from_dict({"ingest": {"workers": "eight"}})
    with pytest.raises(ValueError, match="must be bool"):
        Config.from_dict({"train": {"amp": 1}})
    assert Config.from_dict({"train": {"lr": 1}}).train.lr == 1  # an int is a valid float


def test_toml_site_file(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('preset = "demo"\n[ingest]\nworkers = 3\n')
    cfg = load_preset(str(site))
    assert cfg.ingest.workers == 3 and cfg.synth == load_preset("demo").synth and cfg.preset == "demo+site"
    site.write_text("[ingest]\nwrokers = 3\n")
    with pytest.raises(ValueError, match="unknown config field"):
        load_preset(str(site))
    site.write_text("[ingest\nworkers = 3\n")
    with pytest.raises(ValueError, match=r"site\.toml: not valid TOML"):
        load_preset(str(site))
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("fast")
    assert load_preset(str(Path(__file__).parents[1] / "configs" / "site-example.toml")).ingest.workers == 8


def test_override_dotted_goes_through_the_type_checks() -> None:
    cfg = override_dotted(load_preset("ci"), {"train.epochs": 3, "ingest.head.unknown": "keep", "data.windows":
                                              [[40, 80], [50, 100], [60, 40]]})
    assert (cfg.train.epochs, cfg.ingest.head.unknown, cfg.data.windows[0], cfg.preset) == (3, "keep", (40, 80), "ci")
    assert override_dotted(cfg, {}) is cfg
    for values, error in [({"train.epoch": 3}, r"^train\.epoch: unknown config field\(s\) for TrainConfig"),
                          ({"train.epochs": "3"}, r"^train\.epochs: config field TrainConfig\.epochs must be int"),
                          ({"trian.epochs": 3}, r"^trian\.epochs: not a config field"),
                          ({"train": {}}, r"^train: not a config field"),
                          ({"registry.mode": "ensemble"}, r"^registry\.mode: register mode must be one of"),
                          ({"registry.promotion_margin": -0.1}, "promotion margin must be a finite number ≥ 0")]:
        with pytest.raises(ValueError, match=error):
            override_dotted(cfg, values)


def test_run_settings_are_config_but_not_the_models_params() -> None:
    cfg = Config()
    assert (cfg.registry.model_name, cfg.registry.promotion_metric, cfg.registry.promotion_margin,
            cfg.registry.mode, cfg.tracking.experiment) == ("blendsign", "cv_auc_blend_sign", 0.0, "refit", "blendsign")
    assert not any(k.startswith(tuple(f"{s}." for s in RUN_SECTIONS)) for k in cfg.flat())  # register.* logs them
    old = cfg.to_dict()  # a checkpoint written before these sections existed
    for section in RUN_SECTIONS:
        del old[section]
    assert Config.from_dict(old) == cfg
    with pytest.raises(ValueError, match="register mode must be one of"):
        RegistryConfig(mode="ensemble")
    with pytest.raises(ValueError, match="promotion margin"):
        RegistryConfig(promotion_margin=float("inf"))


def _cli_config(*argv: str) -> Config:
    from blendsign import cli

    return cli._config(cli.build_parser().parse_args(argv))


TRAIN = ("train", "--ingest", "i", "--labels", "l", "--out", "o", "--config", "ci")
RUN = ("run", "--config", "ci")


def test_set_applies_values_read_as_toml() -> None:
    cfg = _cli_config(*TRAIN, "--set", "train.epochs=3", "--set", "data.crop_head=true", "--set", "train.lr=1e-3",
                      "--set", "train.device=cuda:1", "--set", 'registry.model_name="7"', "--set",
                      "data.scale_range=[0.8, 1.2]")
    assert (cfg.train.epochs, cfg.data.crop_head, cfg.train.lr, cfg.train.device, cfg.registry.model_name,
            cfg.data.scale_range) == (3, True, 1e-3, "cuda:1", "7", (0.8, 1.2))
    assert _cli_config(*TRAIN) == load_preset("ci")


@pytest.mark.parametrize(("flag", "setting"), [
    ((*TRAIN, "--epochs", "3"), "train.epochs=3"),
    ((*TRAIN, "--device", "cpu"), "train.device=cpu"),
    ((*TRAIN, "--backbone", "vgg16"), "model.backbone=vgg16"),
    ((*TRAIN, "--experiment", "x"), "tracking.experiment=x"),
    (("synth", "o", "--seed", "3"), "synth.seed=3"),
    (("folds", "l", "o", "--seed", "3"), "folds.seed=3"),
    (("cv", *TRAIN[1:], "--folds", "f", "--rounds", "0"), "distill.rounds=0"),
    ((*RUN, "--register", "fold-ensemble"), "registry.mode=fold-ensemble"),
    ((*RUN, "--margin", "0.02"), "registry.promotion_margin=0.02"),
    ((*RUN, "--metric", "cv_f1_blend_sign"), "registry.promotion_metric=cv_f1_blend_sign"),
    ((*RUN, "--model-name", "site"), "registry.model_name=site"),
    (("registry", "rollback", "--name", "site"), "registry.model_name=site"),
])
def test_an_old_flag_is_an_alias_of_its_set(flag: tuple[str, ...], setting: str) -> None:
    key, value = setting.split("=")
    cfg = _cli_config(*flag)
    assert cfg == _cli_config(*flag[:-2], "--set", setting) != _cli_config(*flag[:-2])
    assert str(reduce(getattr, key.split("."), cfg)) == value


def test_every_alias_is_a_flag_that_defaults_to_the_config() -> None:
    from blendsign import cli

    def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
        found = list(parser._actions)
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    found += actions(sub)
        return found

    flags = [a for a in actions(cli.build_parser()) if a.dest in cli.ALIASES]
    assert {a.dest for a in flags} == set(cli.ALIASES)
    assert all(a.default is None for a in flags)  # else the flag would override the config's value
    for key in cli.ALIASES.values():  # each names a field
        assert override_dotted(Config(), {key: reduce(getattr, key.split("."), Config())}) == Config()


@pytest.mark.parametrize(("argv", "error"), [
    (("--set", "train.epoch=3"), "train.epoch: unknown config field(s) for TrainConfig: ['epoch']"),
    (("--set", "train.epochs=three"), "train.epochs: config field TrainConfig.epochs must be int, got 'three'"),
    (("--set", "train.epochs"), "--set train.epochs: expected section.field=value"),
    (("--epochs", "2", "--set", "train.epochs=2"), "--set train.epochs: given twice (by --set or by its flag)"),
])
def test_a_bad_set_is_a_one_line_error_naming_the_key(argv: tuple[str, ...], error: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from blendsign.cli import main

    assert main([*TRAIN, "--no-mlflow", *argv]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [error]


def test_a_pipeline_run_takes_only_the_fields_it_has_parameters_for(caplog: pytest.LogCaptureFixture) -> None:
    from blendsign.cli import main

    submit = ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--source", "s3://b/dicom/", "--annotations",
              "s3://b/a.csv", "--work", "s3://b/work/"]
    assert main([*submit, "--set", "train.epochs=1"]) == 2  # refused before the server is asked
    assert main(["pipeline", "compile", "--set", "registry.model_name=x"]) == 2
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "ERROR"] == [
        "--set train.epochs", "--set registry.model_name"]
