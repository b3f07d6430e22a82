"""Converters pack only files under their root (issue 26 item 8): a record's `../../x.png`,
`/abs/x.png` or a symlink pointing out is skipped as `outside_root` (counted, the first one
named in the summary) unless `--allow-outside-root`."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from data.converters import convert_videos, main
from tests.data_fixtures import encode_clip, read_tar


def _img(path: Path, color) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), color).save(path, format="PNG")
    return path.read_bytes()


def _record(rid: str, image: str) -> dict:
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                         {"from": "gpt", "value": "red"}]}


def _packed(summary) -> dict[str, bytes]:
    """{source_id: the packed image's bytes}"""
    out = {}
    for shard in summary.shards:
        for files in read_tar(Path(shard)).values():
            out[json.loads(files["json"])["source_id"]] = next(v for k, v in files.items() if k.startswith("img0"))
    return out


def test_llava_paths_leaving_the_root_are_skipped_unless_allowed(tmp_path, capsys):
    root = tmp_path / "data" / "images"
    inside = _img(root / "a" / "in.png", (200, 0, 0))
    secret = _img(tmp_path / "secret.png", (0, 0, 200))  # a file the user can read, outside the root
    (root / "a" / "link_in.png").symlink_to(root / "a" / "in.png")  # a symlink that stays inside: fine
    (root / "link_out.png").symlink_to(tmp_path / "secret.png")
    records = [_record("in", "a/in.png"), _record("dotdot_in", "a/../a/in.png"), _record("link_in", "a/link_in.png"),
               _record("dotdot", "../../secret.png"), _record("absolute", str(tmp_path / "secret.png")),
               _record("link_out", "link_out.png")]
    (tmp_path / "r.json").write_text(json.dumps(records))
    args = ["llava", "--json", str(tmp_path / "r.json"), "--images", str(root)]

    s = main([*args, "--out", str(tmp_path / "o1")])
    assert s.written == 3 and dict(s.skipped) == {"outside_root": 3}
    assert set(_packed(s)) == {"in", "dotdot_in", "link_in"}
    assert all(v == inside for v in _packed(s).values())
    out = capsys.readouterr().out
    assert "outside_root" in out and "../../secret.png" in out and "--allow-outside-root" in out

    s = main([*args, "--out", str(tmp_path / "o2"), "--allow-outside-root"])
    assert s.written == 6 and not s.skipped
    packed = _packed(s)
    assert packed["dotdot"] == packed["absolute"] == packed["link_out"] == secret


def test_video_files_and_frame_folders_leaving_the_root_are_skipped(tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    encode_clip(tmp_path / "outside.mp4", [i / 10 for i in range(10)], size=(32, 32))
    encode_clip(vids / "in.mp4", [i / 10 for i in range(10)], size=(32, 32))
    qa = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "stripes"}]
    records = [{"id": "in", "video": "in.mp4", "conversations": qa},
               {"id": "dotdot", "video": "../outside.mp4", "conversations": qa},
               {"id": "absolute", "video": str(tmp_path / "outside.mp4"), "conversations": qa}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    args = ["videos", "--json", str(tmp_path / "qa.jsonl"), "--videos", str(vids), "--min-frames", "2"]
    s = main([*args, "--out", str(tmp_path / "o1")])
    assert s.written == 1 and dict(s.skipped) == {"outside_root": 2}
    s = main([*args, "--out", str(tmp_path / "o2"), "--allow-outside-root"])
    assert s.written == 3 and not s.skipped

    # a LiveCC record with an absolute path (the old code took any absolute path as is)
    live = [[{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "outside.mp4")}]},
             {"role": "assistant", "content": [{"type": "text_stream", "text_stream": [[0.0, 0.3, "hi"]]}]}]]
    (tmp_path / "live.jsonl").write_text(json.dumps(live[0]) + "\n")
    s = main(["livecc", "--jsonl", str(tmp_path / "live.jsonl"), "--videos", str(vids), "--out", str(tmp_path / "o3")])
    assert s.written == 0 and dict(s.skipped) == {"outside_root": 1}

    # frame folders: a frame that is a symlink out of --videos
    frames = tmp_path / "frames"
    for name in ("ok", "leaky"):
        _img(frames / name / "1.png", (10, 0, 0))
        (frames / name / "meta.json").write_text(json.dumps({"qa": [{"question": "q", "answer": "a"}]}))
    (frames / "leaky" / "2.png").symlink_to(tmp_path / "data.png")
    _img(tmp_path / "data.png", (0, 0, 10))
    s = convert_videos("frames", frames, tmp_path / "o4", progress=False)
    assert s.written == 1 and dict(s.skipped) == {"outside_root": 1}
    assert convert_videos("frames", frames, tmp_path / "o5", progress=False, allow_outside_root=True).written == 2
