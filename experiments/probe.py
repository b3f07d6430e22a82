"""A linear probe on a frozen vision tower: can its output tokens decode a task's answer?

    python -m experiments.probe --vision runs/protocol_v2/pretrained/vlm/vision --task dot_color
                                [--size 224] [--train 2000] [--test 1000] [--l2 1e-3] [--json]
    python -m experiments.probe --random-tower CONFIG.yaml ...   (the same shapes, random weights)

Protocol v2's precondition (docs/reproduction.md): the fine answer must be decodable from the
frozen tower (>= 90 %) before fusion strategies are compared on it; otherwise a low score
says "the tower cannot see it", not "this fusion loses it".

The probe: samples of `task` drawn as `data.synth` draws them (`make_one`, split "train" for
fitting, "val" for scoring), each image through the tower (`VisionEncoder`, eval mode, no
gradient) -> image_embeds [N, d] (N = 64 at 224 px); the N x d values, standardised, feed one
linear softmax layer over the task's answer set (`data.synth_tasks.ANSWER_SETS`), fitted by
L-BFGS with an L2 penalty. Flattening keeps each token's position, so a dot anywhere can be
read by the weights of the token it falls in. Reported: test accuracy, the uniform chance
and the test split's answer prior, and whether the threshold is met.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter


def features(vision, task: str, split: str, n: int, size: int, seed: int = 0, batch: int = 64):
    """-> (X [n, N*d] float32, answers [n]) for samples 0..n-1 of `task` in `split`."""
    import torch
    from PIL import Image

    from casa.processing.image import patchify
    from data.synth import make_one

    xs, ys = [], []
    for lo in range(0, n, batch):
        pix, grids = [], []
        for j in range(lo, min(n, lo + batch)):
            s = make_one(seed, split, task, j, size)
            conv = json.loads(s["json"])
            ys.append(conv["messages"][-1]["content"][0]["text"])
            img = Image.open(io.BytesIO(s["img0.png"])).convert("RGB")
            p, g = patchify(img, max_pixels=size * size, min_pixels=size * size)
            pix.append(p)
            grids.append(g)
        with torch.no_grad():
            emb = vision(torch.cat(pix), torch.tensor(grids).view(-1, 3))  # [B*N, d]
        xs.append(emb.view(len(grids), -1))  # [B, N*d]: every image has the same N at a fixed size
    return torch.cat(xs).float(), ys


def fit_linear(X, y, classes: int, l2: float, steps: int = 100):
    """Multinomial logistic regression, full batch L-BFGS: -> (W [F, C], b [C])."""
    import torch

    W = torch.zeros(X.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, y) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def probe(vision, task: str, size: int, train: int, test: int, l2: float, seed: int = 0) -> dict:
    import torch

    from data.synth_tasks import ANSWER_SETS

    if task not in ANSWER_SETS:
        raise ValueError(f"--task {task!r} has no closed answer set; one of {sorted(ANSWER_SETS)}")
    answers = list(ANSWER_SETS[task])
    start = time.perf_counter()
    Xtr, ytr = features(vision, task, "train", train, size, seed)
    Xte, yte = features(vision, task, "val", test, size, seed)
    mean, std = Xtr.mean(0), Xtr.std(0) + 1e-6  # standardised on the fitting split only
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    idx = {a: i for i, a in enumerate(answers)}
    W, b = fit_linear(Xtr, torch.tensor([idx[a] for a in ytr]), len(answers), l2)
    pred = (Xte @ W + b).argmax(-1).tolist()
    train_acc = ((Xtr @ W + b).argmax(-1) == torch.tensor([idx[a] for a in ytr])).float().mean().item()
    acc = sum(answers[p] == a for p, a in zip(pred, yte)) / len(yte)
    return {"task": task, "size": size, "tokens_per_image": Xte.shape[1] // vision.out_dim, "train": train,
            "test": test, "l2": l2, "accuracy": acc, "train_accuracy": train_acc, "uniform": 1 / len(answers),
            "prior": Counter(yte).most_common(1)[0][1] / len(yte), "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vision", help="a saved tower directory (VisionEncoder(path=...))")
    src.add_argument("--random-tower", metavar="CONFIG.yaml",
                     help="a YAML mapping of VisionEncoder config fields: the same shapes, random weights")
    p.add_argument("--task", default="dot_color")
    p.add_argument("--size", type=int, default=224, help="image side in px (224: 64 tokens)")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--threshold", type=float, default=0.9, help="the precondition: accuracy >= this")
    p.add_argument("--seed", type=int, default=0, help="data seed (data.synth's)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for name in ("train", "test", "size"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    import torch
    import yaml

    from casa.vision import VisionEncoder

    torch.manual_seed(0)
    try:
        if a.vision:
            vision = VisionEncoder(path=a.vision, freeze=True, trainable_blocks=0)
        else:
            with open(a.random_tower) as f:
                vision = VisionEncoder(config=yaml.safe_load(f), freeze=True, trainable_blocks=0)
        out = probe(vision.eval(), a.task, a.size, a.train, a.test, a.l2, a.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"experiments.probe: error: {e}", file=sys.stderr)
        return 2
    out["source"] = a.vision or f"random tower {a.random_tower}"
    out["passes"] = out["accuracy"] >= a.threshold
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['task']} from {out['source']} ({out['tokens_per_image']} tokens/image): linear probe "
              f"{100 * out['accuracy']:.1f} % on {a.test} items (fit {100 * out['train_accuracy']:.1f} % on {a.train}); "
              f"chance: uniform {100 * out['uniform']:.1f} %, prior {100 * out['prior']:.1f} %; "
              f"threshold {100 * a.threshold:.0f} %: {'passes' if out['passes'] else 'FAILS'} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
