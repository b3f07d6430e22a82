"""Local lmms-eval tasks from the synthetic benchmark, and the same samples as a shard.

    python -m experiments.lmms_tasks.build --data runs/demo-synth --out runs/lmms-tasks [--split test] [--per-task N]

writes
    OUT/tasks/    casa_synth_{image,video,choice}.yaml (this folder's), their .jsonl documents
                  and media/ (images as stored; a video as a folder of its frames + meta.json with
                  their timestamps): lmms-eval's `--include_path OUT/tasks`, no hub
    OUT/shards/   test-000000.tar: the same samples in the shard format, for
                  `experiments.evaluate --data OUT/shards`, each sample's "task" set to its
                  lmms-eval task so the two per-task tables line up

    casa_synth_image   colour and count questions (generate_until; exact_match, anls)
    casa_synth_video   video_direction: which way the shape moves (generate_until; exact_match, anls)
    casa_synth_choice  shape, with the four shapes as options (multiple_choice: log-likelihood, acc)

Two answer fields exercise the multi-reference format (`data.format`): a count accepts its
digit and its word ("answers": ["3", "three"]); a shape question carries its options
("choices"). The pixels lmms-eval hands to the `casa` model are the shard's (PNG images and
JPEG frames are copied byte for byte), so both evaluations see the same inputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

LMMS_TASKS = {"casa_synth_image": ("color", "count"), "casa_synth_video": ("video_direction",),
              "casa_synth_choice": ("shape",)}
"""lmms-eval task -> the synthetic tasks it is made of."""
NUMBER_WORDS = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
HERE = Path(__file__).resolve().parent


def _answer_and_question(conv: dict, key: str) -> tuple[str, str]:
    """The one-turn layout the `casa` model rebuilds: user [image | video, question] -> answer."""
    msgs = conv["messages"]
    kinds = [c["type"] for c in msgs[0]["content"]] if msgs else []
    if len(msgs) != 2 or kinds not in (["image", "text"], ["video", "text"]) or msgs[1]["role"] != "assistant":
        raise ValueError(f"{key}: expected user [image or video, question] -> assistant answer, got {kinds}")
    return msgs[1]["content"][0]["text"], msgs[0]["content"][1]["text"]


def build(data: str | Path, out: str | Path, split: str = "test", per_task: int | None = None) -> dict[str, int]:
    """Write OUT/tasks and OUT/shards (module doc) -> documents per lmms-eval task."""
    import webdataset as wds

    from data.datamodule import expand_shards
    from data.format import ShardWriter, make_sample
    from data.synth_tasks.render import SHAPES

    out = Path(out)
    tasks_dir, media = out / "tasks", out / "tasks" / "media"
    shutil.rmtree(out / "tasks", ignore_errors=True)
    shutil.rmtree(out / "shards", ignore_errors=True)
    media.mkdir(parents=True)
    of_synth = {s: t for t, synths in LMMS_TASKS.items() for s in synths}
    docs: dict[str, list[dict]] = {t: [] for t in LMMS_TASKS}
    with ShardWriter(out / "shards", split) as writer:
        for raw in wds.WebDataset(expand_shards(str(data), split), shardshuffle=False):
            conv = json.loads(raw["json"])
            task = of_synth.get(conv.get("task"))
            if task is None or (per_task is not None and len(docs[task]) >= per_task):
                continue
            key = raw["__key__"]
            answer, question = _answer_and_question(conv, key)
            files = {k: v for k, v in raw.items() if not k.startswith("__") and k != "json"}
            doc = {"id": key, "question": question, "answer": answer, "answers": [answer], "image": None, "video": None}
            if conv["task"] == "count":
                doc["answers"] = conv["answers"] = [answer, NUMBER_WORDS[answer]]
            if conv["task"] == "shape":
                doc["choices"] = conv["choices"] = list(SHAPES)
            if "video" in conv:
                folder = media / key
                folder.mkdir()
                for name in conv["video"]["frames"]:
                    (field,) = [f for f in files if f.split(".")[0] == name]
                    (folder / field).write_bytes(files[field])
                (folder / "meta.json").write_text(json.dumps({"timestamps": conv["video"]["timestamps"]}))
                doc["video"] = str(folder)
            else:
                (field,) = [f for f in files if f.startswith("img0.")]
                (media / f"{key}.{field.split('.', 1)[1]}").write_bytes(files[field])
                doc["image"] = str(media / f"{key}.{field.split('.', 1)[1]}")
            conv["task"] = task
            writer.write(make_sample(key, conv, files))
            docs[task].append(doc)
    for task, rows in docs.items():
        if not rows:
            raise ValueError(f"{data} [{split}]: no sample of {list(LMMS_TASKS[task])} for lmms-eval task {task}")
        shutil.copy(HERE / f"{task}.yaml", tasks_dir / f"{task}.yaml")
        (tasks_dir / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rows))
    return {t: len(rows) for t, rows in docs.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.lmms_tasks.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="synthetic benchmark directory (python -m data.synth)")
    p.add_argument("--out", required=True, help="output directory (OUT/tasks, OUT/shards)")
    p.add_argument("--split", default="test")
    p.add_argument("--per-task", type=int, default=None, help="at most N documents per lmms-eval task")
    a = p.parse_args(argv)
    if a.per_task is not None and a.per_task < 1:
        p.error("--per-task must be >= 1")
    try:
        counts = build(a.data, a.out, a.split, a.per_task)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"wrote {', '.join(f'{t}: {n}' for t, n in counts.items())} documents to {a.out}/tasks "
          f"(--include_path) and the same samples to {a.out}/shards")


if __name__ == "__main__":
    main()
