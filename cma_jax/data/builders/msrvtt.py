"""MSR-VTT: 9k (or 7k) train videos with all their captions; the 1k-A (JSFusion) test.

Without a manual_dir the public files are downloaded (URLS; the sources CLIP4Clip's README gives):
CLIP4Clip's release `msrvtt_data.zip` (the split CSVs and MSRVTT_data.json) and Frozen-in-Time's
`MSRVTT.zip` (the 10,000 videos, MSRVTT/videos/all/videoN.mp4). TFDS checks them against
checksums.tsv beside this file once it lists them; their sizes and SHA256 are not recorded in this
repository yet (they could not be read offline): record them with
`python -m cma_jax.data.builders msrvtt --register_checksums` (TFDS writes checksums.tsv; commit it).
"""

from __future__ import annotations

import collections

from etils import epath

from cma_jax.data.builders import annotation_files, base, media

# Point these elsewhere (a mirror, a test server) before building; same archives, same layout.
URLS = {
    "annotations": "https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip",
    "videos": "https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip",
}


class MsrVtt(base.VideoTextBuilder):
    """MSR-VTT text-video retrieval: train = every caption of the 9k/7k train videos,
    test = the 1,000 JSFusion (1k-A) video-caption pairs."""

    name = "msrvtt"
    BUILDER_CONFIGS = [
        base.VideoTextConfig(
            name="9k", variant="9k", description="train on MSRVTT_train.9k.csv (9,000 videos)"
        ),
        base.VideoTextConfig(
            name="7k", variant="7k", description="train on MSRVTT_train.7k.csv (7,010 videos)"
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
manual_dir/
  MSRVTT_data.json           ('sentences': [{'caption', 'video_id'}, ...])
  MSRVTT_train.9k.csv        (column video_id; config 9k)
  MSRVTT_train.7k.csv        (column video_id; config 7k)
  MSRVTT_JSFUSION_test.csv   (columns key, vid_key, video_id, sentence)
  any/sub/folder/videoN.mp4  (the 10,000 MSR-VTT videos, anywhere below manual_dir)
(The first four are in CLIP4Clip's msrvtt_data.zip, the videos in Frozen-in-Time's MSRVTT.zip;
without a manual_dir the builder downloads both.)
"""

    def required_files(self):
        return (
            "MSRVTT_data.json",
            f"MSRVTT_train.{self.builder_config.variant}.csv",
            "MSRVTT_JSFUSION_test.csv",
        )

    def download_urls(self):
        return dict(URLS)

    def _split_entries(self, manual_dir: epath.Path, videos_dir: epath.Path | None = None):
        data = annotation_files.read_json(manual_dir / "MSRVTT_data.json")
        if "sentences" not in data:
            raise ValueError(f'{manual_dir / "MSRVTT_data.json"}: expected a "sentences" list')
        captions = collections.defaultdict(list)
        for s in data["sentences"]:
            captions[s["video_id"]].append(s["caption"].strip())
        train_csv = manual_dir / f"MSRVTT_train.{self.builder_config.variant}.csv"
        train_ids = [r["video_id"] for r in annotation_files.read_csv(train_csv, ["video_id"])]
        test_rows = annotation_files.read_csv(
            manual_dir / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"]
        )
        videos = media.index_videos(videos_dir or manual_dir)
        return {
            "train": [
                base.Entry(v, tuple(captions.get(v, ())), media.find_video(videos, v)) for v in train_ids
            ],
            "test": [
                base.Entry(r["video_id"], (r["sentence"].strip(),), media.find_video(videos, r["video_id"]))
                for r in test_rows
            ],
        }
