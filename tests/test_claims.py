"""experiments.claims: the claim table of docs/reproduction.md from the grids' run dirs."""

import json

import pytest

from experiments import claims
from experiments.claims import Side, verdict


def test_verdict_needs_the_difference_to_exceed_the_larger_std():
    a, b = Side("a", [0.50, 0.52, 0.54]), Side("b", [0.40, 0.41, 0.42])  # stds 0.02 and 0.01, diff 0.11
    assert verdict(a, b) == "holds" and verdict(b, a) == "reversed"
    wide = Side("w", [0.30, 0.45, 0.60])  # std 0.15 > the 0.04 difference to a's mean
    assert verdict(wide, a) == "within the seed spread" == verdict(a, wide)
    assert verdict(Side("p", [1.3, 1.31]), Side("q", [2.0, 2.1]), higher_is_better=False) == "holds"


def _write_run(root, grid, name, metrics):
    run = root / grid / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"finished": True, "metrics": metrics}))


def _metrics(coarse, fine, read, text, ppl=1.3):
    return {**{f"val_group/{g}/relaxed_accuracy": v for g, v in zip(claims.GROUPS, (coarse, fine, read, text))},
            "val_ppl/describe_after_image": ppl, "val_ppl/describe": 1.27}


def test_claim_rows_from_run_dirs_and_evaluations(tmp_path):
    grids, t8 = tmp_path / "grids", tmp_path / "t8"
    # Table 6a: insertion 0.8 > CASA⊕ 0.7 > CA 0.4 on every group; CA's text perplexity after an image is worse
    level = {"insertion": 0.8, "casa_plus": 0.7, "casa_before": 0.7, "casa_replace": 0.7,
             "cross_attention": 0.4, "gated_cross_attention": 0.4}
    for fusion, acc in level.items():
        for s in range(3):
            a = acc + 0.01 * s
            _write_run(grids, "protocol_table6a", f"{fusion}-s{s}",
                       _metrics(a, a, a, a, ppl=2.5 if fusion == "cross_attention" else 1.3 + 0.01 * s))
    for fusion, acc in (("insertion", 0.8), ("qformer_q2", 0.5)):  # Table 6b: only the 2-query Q-Former ran
        for s in range(3):
            _write_run(grids, "protocol_table6b", f"{fusion}-s{s}", _metrics(acc, acc, acc + 0.01 * s, acc))
    # Table 7 absent except one placement: every_k-k4 comes from 6a's casa_replace, first_k-k2 is better
    for s in range(3):
        _write_run(grids, "protocol_table7", f"first_k-k2-s{s}", _metrics(0.9, 0.9, 0.9, 0.9 + 0.01 * s))
    # Table 8: self barely hurts, rnd hurts more
    t8.mkdir()
    for s in range(3):
        for mask, acc in (("none", 0.7), ("self", 0.69), ("rnd", 0.5), ("rnd_txt", 0.69)):
            out = {"groups": {g: {"relaxed_accuracy": acc + 0.001 * s} for g in claims.GROUPS},
                   "loss": {"answer_loss": 1 - acc, "answer_tokens": 100}}
            (t8 / f"casa_plus-s{s}-{mask}.json").write_text(json.dumps(out))
    table = claims.rows(grids, t8)
    found = {(c, q, s.split(" ")[0], s.split(" vs ")[1].split(" ")[0]): v for c, q, s, v in table}
    gap = "CASA closes most of the gap to insertion"
    assert found[(gap, "avg accuracy (%)", "casa_plus", "cross_attention")] == "holds"
    assert found[(gap, "avg accuracy (%)", "insertion", "casa_plus")] == "holds"
    assert found[("CASA > CA on reading / high resolution", "read accuracy (%)", "casa_plus",
                  "gated_cross_attention")] == "holds"
    assert found[("CASA∨ is best spread uniformly", "avg accuracy (%), 2 CASA∨ layers", "every_k-k4",
                  "first_k-k2")] == "reversed"
    assert not any("4 CASA∨ layers" in q for _, q, _, _ in table)  # no runs, no row
    assert found[("insertion > Q-Former (Table 6b)", "read accuracy (%)", "insertion", "qformer_q2")] == "holds"
    assert not any("qformer_q4" in sides for _, _, sides, _ in table)
    mask = "masking *self* hurts most"
    assert found[(mask, "avg accuracy (%) under the mask", "rnd", "self")] == "reversed"
    assert found[(mask, "avg accuracy (%) under the mask", "rnd_txt", "self")] == "within the seed spread"
    assert found[("text ability kept better by CASA than by ungated CA", "val_ppl/describe_after_image (lower is better)",
                  "casa_plus", "cross_attention")] == "holds"
    assert claims.gap_closed(grids)["casa_plus"] == pytest.approx(0.75)
    for s in range(3):  # insertion below CA: there is no gap, and no share of it is reported
        metrics = {"finished": True, "metrics": _metrics(0.3, 0.3, 0.3, 0.3)}
        (grids / "protocol_table6a" / f"insertion-s{s}" / "metrics.json").write_text(json.dumps(metrics))
    assert claims.gap_closed(grids) == {}


def test_cli_without_runs_says_what_to_run_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        claims.main(["--grids", str(tmp_path), "--table8", str(tmp_path)])
    assert e.value.code == 2
    assert "no comparison has finished runs on both sides under" in capsys.readouterr().err
