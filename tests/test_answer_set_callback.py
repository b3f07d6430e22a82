"""`callbacks.answer_set.AnswerSetAccuracy`: teacher-forced accuracy in validation, against
the plain per-candidate forward of tests/test_answer_set.py, and protocol v2's answer sets
equal to the tasks' own (`data.synth_tasks.ANSWER_SETS`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks.answer_set import AnswerSetAccuracy
from casa.generation import truncate_samples
from data.synth_tasks import ANSWER_SETS
from tests.helpers import tiny_datamodule, tiny_module
from tests.test_answer_set import reference_logprob

ROOT = Path(__file__).resolve().parents[1]


def test_validation_logs_the_accuracy_of_the_per_candidate_reference(tmp_path):
    sets = {t: list(ANSWER_SETS[t]) for t in ("color", "shape", "count")}
    cb = AnswerSetAccuracy(sets)
    module = tiny_module(val_generate=False)
    dm = tiny_datamodule(tmp_path)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path)
    logged = trainer.validate(module, datamodule=dm, verbose=False)[0]

    tok = module._tokenizer()
    end = module._stop_ids()
    hits: dict[str, list[int]] = {}
    model = module.model.eval()
    for batch in dm.val_dataloader():
        for s, m in enumerate(batch.meta):
            if m.get("task") not in sets:
                continue
            one = truncate_samples(batch, [m["prompt_len"] if i == s else 1 for i in range(len(batch.meta))])
            lo, hi = one.sample_cu_seqlens[s:s + 2].tolist()
            imgs = [i for i, p in enumerate(one.image_text_position.tolist()) if lo <= p < hi]
            patches = one.image_grid_thw.prod(-1).tolist()
            start = [sum(patches[:i]) for i in range(len(patches) + 1)]
            pix = torch.cat([one.pixel_values[start[i]:start[i + 1]] for i in imgs])
            prompt = (one.input_ids[lo:hi], pix, one.image_grid_thw[imgs].tolist(),
                      [one.image_text_position[i].item() - lo for i in imgs])
            lps = [reference_logprob(model, prompt, tok(a, add_special_tokens=False)["input_ids"] + end)
                   for a in sets[m["task"]]]
            pred = sets[m["task"]][max(range(len(lps)), key=lps.__getitem__)]
            h = hits.setdefault(m["task"], [0, 0])
            h[0] += pred == m["answer"]
            h[1] += 1
    assert hits and set(hits) == set(sets)
    for task, (hit, n) in hits.items():
        assert logged[f"val_task/{task}/answer_set_items"] == n
        assert logged[f"val_task/{task}/answer_set_accuracy"] == pytest.approx(hit / n)
    assert "val_group/coarse/answer_set_accuracy" in logged
    import json

    (written,) = (tmp_path / "predictions").glob("answer_set_step_*.jsonl")
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(rows) == sum(n for _, n in hits.values())
    for task, (hit, n) in hits.items():
        assert sum(r["prediction"] == r["reference"] for r in rows if r["task"] == task) == hit


def test_protocol_v2_answer_sets_are_the_tasks_own():
    cfg = yaml.safe_load((ROOT / "experiments/configs/protocol_v2/base.yaml").read_text())
    (cb,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"] == "callbacks.answer_set.AnswerSetAccuracy"]
    sets = cb["init_args"]["answer_sets"]
    assert {t: tuple(a) for t, a in sets.items()} == {t: ANSWER_SETS[t] for t in sets}


def test_bad_answer_sets_are_refused():
    with pytest.raises(ValueError, match=r"answer_sets\['color'\]"):
        AnswerSetAccuracy({"color": ["red", "red"]})
