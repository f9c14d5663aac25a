"""Video files of the demo's synthetic scenes, several scenes one after another, with their captions known:
what `search serve` on the demo's workdir searches (docs/search.md). Run as a script to write a folder:

    python tests/test_search_videos.py OUT_DIR [--count 24]   # OUT_DIR/*.mp4 + OUT_DIR/captions.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cma_jax.data.builders import synthetic  # noqa: E402


def write_scene_video(path: str, indices: list[int], *, seconds: int = 2, fps: int = 10, scale: int = 4,
                      split: str = "test") -> list[str]:
    """A video of the adapt variant's clips `indices` (of `split`), `seconds` each, 32 x `scale` pixels
    square, as H.264 -> the captions of its scenes, in order (scene s fills [s * seconds, (s + 1) * seconds))."""
    captions = []
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32 * scale
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "12"}
        for i in indices:
            _, frames, caption = synthetic.make_clip("adapt", split, i, num_frames=seconds * fps, resolution=32)
            captions.append(caption)
            for f in frames:
                big = np.repeat(np.repeat(f, scale, 0), scale, 1)
                for packet in stream.encode(av.VideoFrame.from_ndarray(big, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return captions


def write_folder(out_dir: str, count: int, scenes: int = 3) -> dict[str, list[str]]:
    """`count` videos of `scenes` scenes each (clips 0, 1, 2, ... of the test split) -> {file: captions}."""
    os.makedirs(out_dir, exist_ok=True)
    captions = {}
    for v in range(count):
        name = f"scenes_{v:03d}.mp4"
        captions[name] = write_scene_video(os.path.join(out_dir, name), list(range(v * scenes, (v + 1) * scenes)))
    with open(os.path.join(out_dir, "captions.json"), "w") as f:
        json.dump(captions, f, indent=1)
    return captions


def test_each_second_shows_its_scene(tmp_path):
    from cma_jax.data import video

    path = str(tmp_path / "v.mp4")
    captions = write_scene_video(path, [0, 1, 2])
    assert captions == [synthetic.make_clip("adapt", "test", i)[2] for i in range(3)]
    frames = video.decode_video(path, fps=1.0, resolution=32)  # as the index decodes it
    assert len(frames) == 6
    for second, f in enumerate(frames):
        errors = [np.abs(f.astype(int) - c.astype(int)).mean() for c in
                  (synthetic.make_clip("adapt", "test", s, num_frames=20, resolution=32)[1][0] for s in range(3))]
        assert int(np.argmin(errors)) == second // 2, (second, errors)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="write videos of the demo's synthetic scenes with known captions")
    p.add_argument("out_dir")
    p.add_argument("--count", type=int, default=24)
    args = p.parse_args()
    written = write_folder(args.out_dir, args.count)
    print(f"{len(written)} videos of 3 scenes x 2 s each -> {args.out_dir} (captions in captions.json)")
