"""The strategy matrix (`experiments.strategies`) and the one `build_model(configs)`."""

from pathlib import Path

import pytest
import torch
import yaml

from casa.rebuild import build_model
from experiments import strategies

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.yaml"
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def _same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_matrix_is_the_directory():
    files = sorted(p.stem for p in strategies.STRATEGY_DIR.glob("*.yaml"))
    assert strategies.names() == files and len(files) >= 7
    for name in files:
        spec = yaml.safe_load((strategies.STRATEGY_DIR / f"{name}.yaml").read_text())["model"]["model"]["init_args"]
        fusion = strategies.build_fusion(name)
        assert isinstance(fusion, strategies.fusion_class(name))
        for k, v in (spec["fusion"].get("init_args") or {}).items():
            assert getattr(fusion, k) == v, (name, k)


def test_a_new_yaml_joins_the_matrix_and_a_broken_one_is_named(tmp_path):
    for name in ("casa_plus", "insertion"):
        (tmp_path / f"{name}.yaml").write_text((strategies.STRATEGY_DIR / f"{name}.yaml").read_text())
    (tmp_path / "casa_first2.yaml").write_text(
        "model: {model: {init_args: {fusion: {class_path: casa.fusion.CASA, init_args: {mode: replace, placement: "
        "first_k, k: 2}}}}}\n")
    rows = strategies.load_matrix(tmp_path)
    assert list(rows) == ["casa_first2", "casa_plus", "insertion"]
    assert rows["casa_first2"].fusion == {"class_path": "casa.fusion.CASA",
                                          "init_args": {"mode": "replace", "placement": "first_k", "k": 2}}
    (tmp_path / "broken.yaml").write_text("model: {model: {init_args: {}}}\n")
    with pytest.raises(ValueError, match=r"broken\.yaml does not set model\.model\.init_args\.fusion\.class_path"):
        strategies.load_matrix(tmp_path)


def test_unknown_names_and_init_args_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"strategy 'casa_pluss' is not in the matrix .*'casa_plus'"):
        strategies.build_fusion("casa_pluss")
    with pytest.raises(ValueError, match=r"strategy 'casa_pluss' is not in the matrix"):
        strategies.build_model([DEMO, "casa_pluss"])
    with pytest.raises(Exception, match="mode"):  # jsonargparse: the YAML is the schema
        strategies.build_fusion("casa_plus", mode="sum")
    assert strategies.build_fusion("qformer", num_queries=64).num_queries == 64


def test_build_model_composes_like_the_cli():
    """A strategy YAML that changes fusion's class replaces it whole; one of the same class
    merges its init_args; later configs and dotted overrides win, as `experiments.fit` does."""
    torch.manual_seed(0)
    model = build_model([DEMO, TINY, strategies.strategy("insertion").path])
    assert type(model.fusion).__name__ == "Insertion" and len(model.backbone.layers) == 2
    model = strategies.build_model([DEMO, TINY, "casa_replace"],
                                   ["--model.model.init_args.fusion.init_args.placement", "first_k"])
    assert (model.fusion.mode, model.fusion.placement, model.fusion.k) == ("replace", "first_k", 2)
    # a dict config (a checkpoint's casa_config) and a single config work too
    config = yaml.safe_load(DEMO.read_text())
    torch.manual_seed(0)
    a = build_model(config)
    torch.manual_seed(0)
    b = build_model([DEMO])
    assert _same_weights(a, b)
    with pytest.raises(ValueError, match="no config gives model.model"):
        build_model([{"trainer": {"max_steps": 1}}])


@pytest.mark.parametrize("name", ["insertion", "casa_replace"])
def test_build_model_builds_what_fit_builds(name, monkeypatch):
    """The model LightningCLI (experiments.fit's parser) instantiates from the same configs:
    same modules, same weights."""
    import sys

    import lightning as L

    from casa.train.module import CasaModule
    from experiments.fit import CasaCLI

    path = strategies.strategy(name).path
    monkeypatch.setattr(sys, "argv", ["experiments.fit"])  # pytest's own arguments are not the CLI's
    cli = CasaCLI(CasaModule, L.LightningDataModule, subclass_mode_data=True, run=False,
                  auto_configure_optimizers=False, save_config_kwargs={"overwrite": True},
                  args=["--config", str(DEMO), "--config", str(TINY), "--config", str(path), "--synth", "null",
                        # no shards needed: only the model is compared
                        "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                        "--trainer.callbacks", "[]"])
    torch.manual_seed(0)  # the configs' seed_everything: 0, which the CLI applies before building
    model = build_model([DEMO, TINY, path])
    assert _same_weights(cli.model.model, model)
    assert repr(cli.model.model) == repr(model)
