"""The protocol's pretrained parts, built once and cached: `python -m experiments.pretrain
--config experiments/configs/protocol/pretrain.yaml [--force STAGE]` (docs/reproduction.md).

The paper fuses images into *pretrained* models (§4.1: Helium1-2B, a text-only LM, with
Qwen2.5-VL's vision encoder; §4.3 / Table 3: a frozen pretrained insertion VLM). A fusion
comparison on a random LM and a random tower measures how fast each strategy learns
language and vision from scratch, not how it fuses them. So, in order:

1. **data**: the fusion benchmark (`synth`) and the held-out LM text (`heldout`, val/test
   only: `data.synth_tasks.describe`), written by `data.synth.ensure_synth`.
2. **lm**: the small LM pretrained on text the benchmark generates in bulk: every task's
   conversation with its images dropped (questions, answers, captions) and scene
   descriptions, from the split "pretrain" (its own random streams: never a val/test
   sample), next-token loss on every token. Saved with `Backbone.save_pretrained`:
   `<out>/lm`, loaded by `Backbone(path=...)`.
3. **vlm**: a first-stage token-insertion VLM (the Qwen2.5-VL recipe: the tower's merger
   projects straight into the LM, `projector: identity`) trained by `experiments.fit` from
   the stage-2 LM. Its tower is the protocol's pretrained vision encoder (`<out>/vlm/vision`,
   `VisionEncoder(path=...)`) and the whole VLM is Table 3's pretrained insertion VLM
   (`<out>/vlm/lm` + `<out>/vlm/vision`).

Each stage is cached under `<cache>/<stage>-<hash>`, the hash covering the stage's config
section, the files it reads and the hashes of the stages it starts from; `<out>/<stage>`
links to the current entry. Rerunning with the same config reuses every stage; changing a
stage's section rebuilds it and the stages after it, and the grids' configs, which read
`<out>/...`, follow the link.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CODE_VERSION = 1  # bump when a stage's code changes what it produces: the caches then rebuild


@dataclass(kw_only=True)
class SynthData:
    """One `data.synth` directory (`ensure_synth` arguments)."""

    out: str
    seed: int = 0
    train: int = 0
    val: int = 0
    test: int = 0
    tasks: list[str] = field(default_factory=list)
    image_size: dict[str, int] | None = None
    """Image side per group (`data.synth.resolve_sizes`); None: the defaults."""


@dataclass(kw_only=True)
class LMStage:
    """Text pretraining of the LM (`Backbone(family, config)` from random weights)."""

    family: str = "llama"
    config: dict[str, Any] = field(default_factory=dict)
    corpus_tasks: list[str] = field(default_factory=list)
    """Synthetic tasks whose conversations (images dropped) make the corpus."""
    corpus_samples: int = 20000
    heldout_samples: int = 200
    """Corpus samples of another split ("pretrain_val") scored at the end (reported perplexity)."""
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 50
    decay_steps: int = 300
    row_tokens: int = 512
    """Text tokens per packed training row (one row per step)."""
    tokenizer: str = "char"
    template: str = "helium"
    seed: int = 0


@dataclass(kw_only=True)
class VLMStage:
    """The first-stage insertion VLM, trained by `experiments.fit`."""

    configs: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class PretrainSpec:
    out: str = "runs/protocol/pretrained"
    cache: str = "runs/protocol/cache"
    synth: SynthData
    heldout: SynthData
    lm: LMStage
    vlm: VLMStage


def _build(cls, raw: Any, where: str):
    """A dataclass from a YAML mapping; unknown or missing keys name the field and the choices."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with keys {[f.name for f in dataclasses.fields(cls)]}, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {list(fields)}")
    kwargs = {}
    for name, value in raw.items():
        sub = fields[name].type
        sub = {"SynthData": SynthData, "LMStage": LMStage, "VLMStage": VLMStage}.get(str(sub), None)
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub is not None else value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_spec(path: str | Path) -> PretrainSpec:
    spec = _build(PretrainSpec, yaml.safe_load(Path(path).read_text()) or {}, str(path))
    from data.synth_tasks import TASKS

    for name, tasks in (("synth.tasks", spec.synth.tasks), ("heldout.tasks", spec.heldout.tasks),
                        ("lm.corpus_tasks", spec.lm.corpus_tasks)):
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"{path}: {name}={tasks} must be a non-empty list of tasks from {list(TASKS)} (unknown: {bad})")
    if spec.heldout.train:
        raise ValueError(f"{path}: heldout.train={spec.heldout.train} must be 0: held-out text is never trained on")
    for f in spec.vlm.configs:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{path}: vlm.configs names {f!r}, which does not exist")
    return spec


def stage_hash(payload: Any) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of `payload` (+ CODE_VERSION)."""
    text = json.dumps({"code": CODE_VERSION, "payload": payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------- stage 2: text
def corpus_conversation(conv: dict) -> list[dict]:
    """A conversation with its images (and videos) dropped: the text a text-only LM can read."""
    out = []
    for m in conv["messages"]:
        content = [c for c in m["content"] if c["type"] == "text"]
        if content:
            out.append({"role": m["role"], "content": content})
    return out


def corpus(tasks: list[str], n: int, seed: int, split: str, template) -> list[list[int]]:
    """`n` token sequences, round-robin over `tasks`; sample j of task t is drawn from
    `random.Random(f"{seed}/{split}/{t}/{j}")`, as `data.synth` draws its splits, so the
    split name "pretrain" keeps the corpus apart from every train/val/test sample."""
    from data.synth_tasks import DEFAULT_SIZES, TASKS

    seqs = []
    for j in range(n):
        t = tasks[j % len(tasks)]
        group, fn = TASKS[t]
        conv, _ = fn(random.Random(f"{seed}/{split}/{t}/{j // len(tasks)}"), DEFAULT_SIZES.get(group, 0))
        seqs.append(template.encode(corpus_conversation(conv)).input_ids)
    return seqs


def pack_rows(seqs: list[list[int]], row_tokens: int) -> list[list[list[int]]]:
    """Consecutive sequences into rows of at most `row_tokens` tokens (a longer one is cut)."""
    rows, row, used = [], [], 0
    for s in seqs:
        s = s[:row_tokens]
        if used + len(s) > row_tokens and row:
            rows.append(row)
            row, used = [], 0
        row.append(s)
        used += len(s)
    if row:
        rows.append(row)
    return rows


def lm_loss(backbone, row: list[list[int]]):
    """Mean next-token cross-entropy over every token of a packed row (none across samples)."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor([t for s in row for t in s])  # [T]
    lens = torch.tensor([len(s) for s in row])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])  # [S+1]
    pos = torch.cat([torch.arange(n) for n in lens.tolist()])  # [T], restarting per sample
    logits = backbone(ids, pos, cu)  # [T, V]
    labels = ids.roll(-1).clone()
    labels[cu[1:] - 1] = -100  # a sample's last token has no next token in the sample
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


def train_lm(spec: LMStage, out: Path, log=print) -> dict[str, float]:
    """Stage 2: text pretraining; writes `out` (save_pretrained) and returns its report."""
    import torch

    from casa.backbone import Backbone
    from casa.processing.template import ChatTemplate
    from casa.processing.tokenizer import resolve_tokenizer
    from casa.train.optim import build_scheduler

    torch.manual_seed(spec.seed)
    template = ChatTemplate(spec.template, resolve_tokenizer(spec.tokenizer))
    backbone = Backbone(spec.family, config=dict(spec.config))
    if backbone.vocab_size < len(template.vocab):
        raise ValueError(f"lm.config.vocab_size={backbone.vocab_size} is smaller than the tokenizer's "
                         f"{len(template.vocab)} tokens")
    rows = pack_rows(corpus(spec.corpus_tasks, spec.corpus_samples, spec.seed, "pretrain", template), spec.row_tokens)
    heldout = pack_rows(corpus(spec.corpus_tasks, spec.heldout_samples, spec.seed, "pretrain_val", template),
                        spec.row_tokens)
    opt = torch.optim.Adam(backbone.parameters(), lr=spec.lr, betas=(0.9, 0.95))
    sched = build_scheduler(opt, spec.warmup_steps, spec.decay_steps, spec.steps)
    order = random.Random(spec.seed)
    start = time.perf_counter()
    backbone.train()
    for step in range(spec.steps):
        if step % len(rows) == 0:
            order.shuffle(rows)
        loss = lm_loss(backbone, rows[step % len(rows)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == spec.steps - 1:
            log(f"lm step {step}/{spec.steps}: loss {loss.item():.4f}")
    backbone.eval()
    with torch.no_grad():
        # per-token mean over the held-out rows, each row weighted by its predicted tokens
        n = [sum(len(s) - 1 for s in r) for r in heldout]
        val = sum(lm_loss(backbone, r).item() * k for r, k in zip(heldout, n)) / sum(n)
    backbone.save_pretrained(out)
    report = {"train_loss": float(loss.item()), "heldout_loss": val, "heldout_perplexity": float(torch.exp(torch.tensor(val))),
              "rows": len(rows), "seconds": round(time.perf_counter() - start, 1)}
    log(f"lm: held-out perplexity {report['heldout_perplexity']:.3f} ({report['seconds']} s)")
    return report


# ---------------------------------------------------------------------------- stage 3: vision
def train_vlm(spec: VLMStage, lm_dir: Path, out: Path, log=print) -> dict[str, Any]:
    """Stage 3: `experiments.fit` on the stage's configs from the pretrained LM, then the
    tower and the LM of its last checkpoint as `save_pretrained` directories."""
    from casa.assistant import load

    run_dir = out / "run"
    cmd = [sys.executable, "-m", "experiments.fit"]
    for c in spec.configs:
        cmd += ["--config", c]
    cmd += ["--model.model.init_args.backbone.init_args.path", str(lm_dir), "--run_dir", str(run_dir)]
    for k, v in spec.overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    log("vlm: " + " ".join(cmd))
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        raise FileNotFoundError(f"vlm stage wrote no {ckpt} (its trainer needs a ModelCheckpoint with save_last)")
    model = load(ckpt).model
    model.backbone.save_pretrained(out / "lm")
    model.vision.save_pretrained(out / "vision")
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"] if (run_dir / "metrics.json").is_file() else {}
    return {"metrics": metrics, "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------- the cache
def _link(out: Path, name: str, target: Path) -> None:
    """`out/name` -> target (relative symlink), replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, out))
    os.replace(tmp, out / name)


def _cached(entry: Path) -> dict | None:
    f = entry / "stage.json"
    return json.loads(f.read_text()) if f.is_file() else None


def run_stage(cache: Path, name: str, payload: Any, build, force: bool, log=print) -> tuple[Path, dict, bool]:
    """-> (entry dir, its report, whether it was built now). `build(tmp_dir) -> report` writes
    into a private directory that replaces the entry when complete (`stage.json` last)."""
    h = stage_hash(payload)
    entry = cache / f"{name}-{h}"
    report = _cached(entry)
    if report is not None and not force:
        log(f"{name}: cached at {entry}")
        return entry, report, False
    tmp = cache / f".{name}-{h}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report = {"stage": name, "hash": h, "payload": payload, **build(tmp)}
    (tmp / "stage.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(tmp, entry)
    return entry, report, True


def _file_text(path: str) -> str:
    return Path(path).read_text()


def pretrain(spec: PretrainSpec, force: list[str] = (), log=print) -> dict[str, Path]:
    """Every stage, cached; -> {stage: its entry}. `force`: stages to rebuild ("lm", "vlm")."""
    from data.synth import ensure_synth

    for name, d in (("synth", spec.synth), ("heldout", spec.heldout)):
        ensure_synth(d.out, d.seed, d.train, d.val, d.test, d.tasks, image_size=d.image_size, progress=False)
        log(f"{name}: {d.out}")
    out, cache = Path(spec.out), Path(spec.cache)
    lm_payload = dataclasses.asdict(spec.lm)
    lm_entry, lm_report, _ = run_stage(cache, "lm", lm_payload, lambda tmp: train_lm(spec.lm, tmp, log), "lm" in force, log)
    _link(out, "lm", lm_entry)
    # the vlm stage reads the LM through the link's target (its hash is in the payload), the
    # fit configs it names (their text) and the benchmark they train on
    synth = {k: v for k, v in dataclasses.asdict(spec.synth).items() if k != "image_size" or v is not None}  # v1's hash kept
    vlm_payload = {"lm": lm_report["hash"], "spec": dataclasses.asdict(spec.vlm), "synth": synth,
                   "configs": {c: _file_text(c) for c in spec.vlm.configs}}
    vlm_entry, _, _ = run_stage(cache, "vlm", vlm_payload,
                                lambda tmp: train_vlm(spec.vlm, lm_entry, tmp, log), "vlm" in force, log)
    _link(out, "vlm", vlm_entry)
    return {"lm": lm_entry, "vlm": vlm_entry}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiments/configs/protocol/pretrain.yaml")
    p.add_argument("--force", nargs="*", default=[], choices=["lm", "vlm"], help="rebuild these stages")
    a = p.parse_args(argv)
    try:
        spec = load_spec(a.config)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    entries = pretrain(spec, a.force)
    for name, entry in entries.items():
        print(f"{name}: {Path(spec.out) / name} -> {entry}")


if __name__ == "__main__":
    main()
