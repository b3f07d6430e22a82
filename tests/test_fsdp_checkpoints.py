"""What `fit` writes under FSDP2 (a DCP checkpoint directory) is read by every casa reader:
the next stage's `init_from`, `experiments.evaluate`, `experiments.stream`,
`casa.assistant.load`, `experiments.consolidate` and `experiments.export`, with the trained weights.

The reference for "the trained weights" is torch's own conversion of the directory
(`torch.distributed.checkpoint.format_utils.dcp_to_torch_save`), not our reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_configs import CONFIGS, DEMO, FSDP2_CPU, TINY, _run_distributed, fit_args, in_tmp  # noqa: F401


def _reference_weights(directory: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The model weights of a DCP checkpoint directory, as torch converts it -> {name: tensor}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(directory, tmp / "reference.pt")
    state = torch.load(tmp / "reference.pt", weights_only=True)["state_dict"]
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _assert_same(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(weights) == sorted(reference)
    for k, v in reference.items():
        assert torch.equal(weights[k].cpu(), v), k


@pytest.mark.distributed
def test_fsdp2_checkpoint_directory_is_read_by_every_reader(in_tmp, capsys, monkeypatch):
    from experiments.fit import main as fit

    files = [DEMO, TINY, CONFIGS / "trainer" / "fsdp2_h100.yaml", FSDP2_CPU]
    _run_distributed(in_tmp, files, "fsdp", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    last = in_tmp / "fsdp" / "checkpoints" / "last.ckpt"
    assert last.is_dir(), "FSDP2 writes a DCP directory; this test is about reading one"
    reference = _reference_weights(last, in_tmp)

    # the next stage (video_stage.yaml / live_captioning_stage.yaml do this): its weights once
    # init_from is read, before its first step changes them
    from casa.train.module import CasaModule

    loaded: list[dict] = []
    read = CasaModule._load_weights

    def spy(self, path):
        read(self, path)
        loaded.append({k: v.clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(CasaModule, "_load_weights", spy)
    fit(fit_args([DEMO, TINY], in_tmp / "stage2", "--model.init_from", str(last), "--trainer.max_steps", "1",
                 "--trainer.logger", "false", "--trainer.limit_val_batches", "0"))
    assert len(loaded) == 1
    _assert_same(loaded[0], reference)

    from casa.assistant import load

    assistant = load(last)
    _assert_same(assistant.model.state_dict(), reference)
    assert assistant.global_step == 2

    from experiments.export import export  # the Hugging Face export (tests/test_export.py)

    _assert_same(load(export(last, in_tmp / "hf")).model.state_dict(), reference)

    from experiments.consolidate import main as consolidate

    full = in_tmp / "full.ckpt"
    assert consolidate([str(last), str(full)]) == 0
    _assert_same(load(full).model.state_dict(), reference)

    # evaluate and stream give the same output from the directory as from the consolidated file
    from experiments.evaluate import main as evaluate
    from experiments.stream import main as stream

    def run(cli, *args) -> dict:
        capsys.readouterr()
        assert cli([*args, "--threads", "1", "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    data = ["--data", "runs/test-synth", "--max-samples", "2", "--max-new-tokens", "2", "--no-stream"]
    assert run(evaluate, "--ckpt", str(last), *data) == run(evaluate, "--ckpt", str(full), *data)
    video = ["--video", "synthetic", "--frames", "2", "--no-wait", "--max-new-tokens", "2", "--srt", "runs/s.srt"]
    texts = [[f["text"] for f in run(stream, "--ckpt", ckpt, *video)["frames"]] for ckpt in (str(last), str(full))]
    assert texts[0] == texts[1] and len(texts[0]) == 2


# ------------------------------------------------------------------ single process, no training
def _write_dcp(directory: Path, state_dict: dict, meta: dict) -> None:
    """A checkpoint directory of ModelParallelStrategy's layout, written in one process."""
    import torch.distributed.checkpoint as dcp

    from casa.checkpoint import LIGHTNING_METADATA

    dcp.save({"state_dict": state_dict, "optimizer_0": {"state": {"w": torch.ones(3)}}}, checkpoint_id=directory,
             no_dist=True)
    torch.save(meta, directory / LIGHTNING_METADATA)


def test_read_checkpoint_directory_keeps_non_tensor_entries_and_skips_optimizer_states(tmp_path):
    from casa.checkpoint import read_checkpoint

    weights = {"model.w": torch.randn(4, 3), "model.b": torch.arange(3, dtype=torch.bfloat16),
               "model.norm._extra_state": {"scale": 2}}
    _write_dcp(tmp_path / "last.ckpt", weights, {"global_step": 7, "casa_config": "model: {}"})
    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 7 and ckpt["casa_config"] == "model: {}" and "optimizer_0" not in ckpt
    assert sorted(ckpt["state_dict"]) == sorted(weights)
    assert torch.equal(ckpt["state_dict"]["model.w"], weights["model.w"])
    assert ckpt["state_dict"]["model.b"].dtype == torch.bfloat16
    assert torch.equal(ckpt["state_dict"]["model.b"], weights["model.b"])
    assert ckpt["state_dict"]["model.norm._extra_state"] == {"scale": 2}


class RunConfig:
    name = "run"


def test_read_checkpoint_file_is_a_weights_only_load(tmp_path):
    from casa.checkpoint import CheckpointError, read_checkpoint

    torch.save({"state_dict": {"model.w": torch.ones(2)}, "casa_config": "model: {}", "global_step": 3},
               tmp_path / "ok.ckpt")
    ckpt = read_checkpoint(tmp_path / "ok.ckpt")
    assert torch.equal(ckpt["state_dict"]["model.w"], torch.ones(2)) and ckpt["global_step"] == 3
    # an object outside the allowlist is refused in one line (tests/test_safe_load.py: nothing of it runs)
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "config": RunConfig()}, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match=r"a.ckpt wants to run code when loaded \(its pickle calls "
                                              r"test_fsdp_checkpoints.RunConfig, which is not allow-listed\)"):
        read_checkpoint(tmp_path / "a.ckpt")


def test_read_checkpoint_errors_name_the_path_and_what_is_wrong(tmp_path):
    from casa.checkpoint import CheckpointError, read_checkpoint

    with pytest.raises(CheckpointError, match=r"'.*nope.ckpt' does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "dir.ckpt").mkdir()
    (tmp_path / "dir.ckpt" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"dir.ckpt is a directory but not a distributed checkpoint: it has "
                                              r"no .metadata / meta.pt \(contents: \['notes.txt'\]\)"):
        read_checkpoint(tmp_path / "dir.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt is not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"weights": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"plain.pt is not a Lightning checkpoint \(no 'state_dict'\)"):
        read_checkpoint(tmp_path / "plain.pt")


def test_init_from_names_the_field_for_a_directory_that_is_not_a_checkpoint(tmp_path):
    from casa.checkpoint import CheckpointError
    from tests.helpers import tiny_module

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"CasaModule.init_from='.*empty': .* is a directory but not a "
                                              r"distributed checkpoint"):
        tiny_module(init_from=str(tmp_path / "empty"))


def test_metadata_file_names_are_lightning_and_torch_ones():
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint.filesystem import _metadata_fn

    from casa.checkpoint import DCP_METADATA, LIGHTNING_METADATA

    assert (LIGHTNING_METADATA, DCP_METADATA) == (_METADATA_FILENAME, _metadata_fn)


def test_consolidate_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys, monkeypatch):
    from experiments.consolidate import main

    monkeypatch.delenv("CASA_TRACEBACK", raising=False)
    assert main([str(tmp_path / "nope"), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"experiments.consolidate: error: checkpoint '{tmp_path / 'nope'}' does not exist")
    _write_dcp(tmp_path / "last.ckpt", {"model.w": torch.ones(2)}, {"global_step": 3})
    assert main([str(tmp_path / "last.ckpt"), str(tmp_path / "last.ckpt")]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    assert main([str(tmp_path / "last.ckpt"), str(tmp_path / "full" / "out.ckpt")]) == 0
    full = torch.load(tmp_path / "full" / "out.ckpt", weights_only=True)
    assert full["global_step"] == 3 and torch.equal(full["state_dict"]["model.w"], torch.ones(2))
