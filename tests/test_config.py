"""blendsign.config: paper defaults, presets that only override, round trips, TOML site files."""

from __future__ import annotations

from pathlib import Path

import pytest

from blendsign.config import PRESETS, Config, load_preset


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
