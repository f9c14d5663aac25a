"""The TFDS builder base of every benchmark: one ArrayRecord record per video (or image), in the order listed.

Subclasses set `name`, `BUILDER_CONFIGS`, `MANUAL_DOWNLOAD_INSTRUCTIONS` and `REQUIRED_FILES` and implement
`_split_entries`; the record format is `features()`, the caption index is `info.metadata` (see
`VideoTextBuilder`). `ensure_built` and `open_source` (cma_jax/data/builders/reader.py) are importable from
here too, the path the pipeline and tests use.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import numpy as np
import requests
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.download import download_manager, extractor
from tensorflow_datasets.core.download import util as download_util

from cma_jax import network
from cma_jax.data import video
from cma_jax.data.builders import decode_pool, tf_free
from cma_jax.data.builders.reader import build_command
from cma_jax.data.builders.reader import ensure_built, open_source  # noqa: F401  (the import path callers use)

# TFDS hashes keys to 128 bits, and with shuffling disabled uses a key as is: keys spread evenly over that space
# put record i of N into spill bucket i * 1000 // N, so records stay in order and a bucket sort sees ~N/1000.
_KEY_SPACE = 2**128

tf_free.install()  # TFDS's writer spills to disk and its extractor writes through tf.io.gfile


@dataclasses.dataclass(frozen=True)
class Entry:
    """One video (or image) of a split: its id, its captions and where its frames come from."""

    video_id: str
    captions: tuple[str, ...]
    source: Any  # a file path for the real datasets (None when no file was found)


@dataclasses.dataclass(eq=False)
class VideoTextConfig(tfds.core.BuilderConfig):
    """Frame sampling of a build: `fps` frames per second, square `resolution`, JPEG quality.

    `variant` is the builder's own choice within a dataset (e.g. MSR-VTT's '9k' / '7k' train list).
    """

    name: str = "default"
    fps: float = 1.0
    resolution: int = 224
    jpeg_quality: int = 90
    variant: str = ""

    def __post_init__(self):
        if self.fps <= 0 or self.resolution <= 0 or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(
                f"VideoTextConfig {self.name!r}: expected fps > 0, resolution > 0 and "
                f"1 <= jpeg_quality <= 100, got {self.fps}, {self.resolution}, "
                f"{self.jpeg_quality}"
            )


def features() -> tfds.features.FeaturesDict:
    """One record: video_id, frames (JPEG bytes, stored and returned undecoded; at least one), num_frames,
    captions (one for MSR-VTT's test, several for multi-caption sets, a joined paragraph for ActivityNet)."""
    return tfds.features.FeaturesDict(
        {
            "video_id": tfds.features.Text(),
            "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "num_frames": tfds.features.Scalar(np.int32),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }
    )


class NoVideosDecodedError(RuntimeError):
    """Every video (or image) of a split failed to load."""


class ManualDirLayoutError(FileNotFoundError):
    """The manual dir lacks files the builder needs."""


class DownloadChecksumError(OSError):
    """A downloaded archive whose size or SHA256 differ from the ones checksums.tsv records."""


def _default_workers() -> int:
    return int(os.environ.get("CMA_JAX_BUILD_WORKERS", os.cpu_count() or 1))


class VideoTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: one ArrayRecord record per video (or image, `MEDIA = 'image'`: a one-frame record).

    Records are written with `disable_shuffling=True`: record i of a split is the i-th entry `_split_entries`
    listed for it (skipped ones leave no hole); the pipeline shuffles. `info.metadata[split]` = {'video_ids',
    'num_captions', 'captions' (record order), 'skipped': [{'video_id', 'path', 'reason'}]}: enumerating every
    (video, caption) pair needs no frame read.

    Where the files come from: a manual_dir that exists and is not empty is used and must hold every required
    file. Without one, a builder with public archives (`download_urls()` -> {'annotations': URL, <media>: URL,
    ...}, from its module's `URLS`) downloads and extracts them with TFDS's download manager (cached in
    DATA_DIR/downloads, checked against checksums.tsv for the URLs it lists) and gets
    `_split_entries(annotation folder, *media roots)`; without public archives it stops with its instructions.
    A builder that makes its own frames overrides `_frame_loader()` (a picklable `source -> list[bytes]` raising
    `video.VideoDecodeError` for a bad source).

    A download needs the network: without it (no name resolution, a connection refused, or `CMA_JAX_OFFLINE=1`)
    the build stops at once with one line naming the URL and the ways to build offline, and whatever a failed
    build created in the data dir is removed again (complete downloads stay, for the next try).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [VideoTextConfig()]
    REQUIRED_FILES: Sequence[str] = ()  # relative to manual_dir
    MEDIA = "video"  # what a record holds, as messages name it

    def __init__(self, *, num_workers: int | None = None, file_format=None, **kwargs):
        # ArrayRecord is the only random-access format; it is the default, not an option.
        super().__init__(file_format=file_format or "array_record", **kwargs)
        self._num_workers = _default_workers() if num_workers is None else num_workers

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=features(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    # --- what subclasses provide ---------------------------------------------------------

    def _split_entries(self, manual_dir: epath.Path | None, *media_roots: epath.Path) -> dict[str, list[Entry]]:
        raise NotImplementedError

    def required_files(self) -> Sequence[str]:
        """Annotation files (relative to manual_dir) the current config needs."""
        return self.REQUIRED_FILES

    def download_urls(self) -> dict[str, str]:
        """{'annotations': URL, <media>: URL, ...} of the benchmark's public archives; {} = manual only."""
        return {}

    def needs_manual_dir(self) -> bool:
        """Whether building needs files put into a manual_dir by hand (neither public nor generated)."""
        return bool(self.MANUAL_DOWNLOAD_INSTRUCTIONS) and not self.download_urls()

    def _frame_loader(self) -> Callable[[Any], list[bytes]]:
        """Picklable `source -> list of JPEG bytes`; the default decodes a video file."""
        cfg = self.builder_config
        return functools.partial(
            video.load_frames, fps=cfg.fps, resolution=cfg.resolution, jpeg_quality=cfg.jpeg_quality
        )

    # --- generic build -------------------------------------------------------------------

    def download_and_prepare(self, *args, **kwargs):
        """TFDS's, except that a failed build leaves nothing half-built in the data dir (see the class)."""
        root = epath.Path(self.data_dir_root)
        watched = [root, root / self.name, root / "downloads"]
        before = _entries(watched)
        try:
            super().download_and_prepare(*args, **kwargs)
        except BaseException:
            _remove_half_built(watched, before)
            raise

    def _make_download_manager(self, download_dir, download_config):
        dl_manager = super()._make_download_manager(download_dir, download_config)
        fetch = dl_manager._download  # TFDS calls it only for a URL it has not downloaded before

        def fetch_if_online(resource):
            self._check_online(resource.url)
            return fetch(resource)

        dl_manager._download = fetch_if_online
        return dl_manager

    def _check_online(self, url: str) -> None:
        """Raises DownloadError (one line: the URL, why, the offline ways) unless `url` can be downloaded now."""
        try:
            if network.offline():
                raise network.DownloadError(f"downloads are off ({network.offline()}=1) and it is not downloaded")
            network.check_reachable(url)
        except network.DownloadError as e:
            raise network.DownloadError(f"{self.name}: cannot download {url}: {e}; {self._offline_ways()}") from None

    def _offline_ways(self) -> str:
        names = [os.path.basename(u) for u in self.download_urls().values()]
        files = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        return (f"to build offline, download {files} elsewhere, unpack them into one folder holding "
                f"{', '.join(self.required_files())} and the {self.MEDIA}s (docs/data.md, Preparing the datasets) "
                f"and run `{build_command(self)} --manual_dir=DIR`, or point {type(self).__module__}.URLS at a mirror")

    def check_manual_dir(self, manual_dir: epath.Path) -> None:
        """Raises ManualDirLayoutError listing every required file that is missing."""
        missing = [f for f in self.required_files() if not (epath.Path(manual_dir) / f).exists()]
        if missing:
            raise ManualDirLayoutError(
                f"{self.name}: manual_dir {manual_dir} is missing {len(missing)} required file(s): "
                + ", ".join(missing)
                + f".\nExpected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )

    def has_required_files(self, folder: epath.PathLike) -> bool:
        """Whether `folder` holds every annotation file the current config needs."""
        return all((epath.Path(folder) / f).exists() for f in self.required_files())

    def _split_generators(self, dl_manager):
        if not self.MANUAL_DOWNLOAD_INSTRUCTIONS:  # generated data: no files
            entries = self._split_entries(None)
        else:
            manual_dir = _manual_dir(dl_manager)
            if manual_dir is not None:  # files put there by hand: all of them, never a silent download
                self.check_manual_dir(manual_dir)
                entries = self._split_entries(manual_dir)
            elif self.download_urls():
                annotations_dir, media_roots = self._download(dl_manager)
                entries = self._split_entries(annotations_dir, *media_roots)
            else:
                raise ManualDirLayoutError(
                    f"{self.name}: its files must be downloaded by hand into a manual_dir (none given, or it is "
                    f"empty); pass it with --manual_dir=DIR.\nExpected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {split: self._generate_examples(split, items) for split, items in entries.items()}

    def _download(self, dl_manager) -> tuple[epath.Path, list[epath.Path]]:
        """Download and extract the public archives -> (folder holding the annotation files, media roots in
        the order of `download_urls()`)."""
        urls = self.download_urls()
        try:
            paths = dl_manager.download_and_extract(urls)
        except download_manager.NonMatchingChecksumError as e:  # the file stays in a .tmp folder, never used
            raise DownloadChecksumError(f"{self.name}: {e}") from None
        except (download_util.DownloadError, extractor.ExtractError, requests.RequestException) as e:
            # an HTTP error, a damaged archive, or a network that failed after TFDS's retries
            raise network.DownloadError(f"{self.name}: {e}; {self._offline_ways()}") from None
        extracted = epath.Path(paths["annotations"])
        media_roots = [epath.Path(paths[k]) for k in urls if k != "annotations"]
        for folder, _, _ in os.walk(os.fspath(extracted)):  # the archive may wrap its files in a folder
            if self.has_required_files(folder):
                return epath.Path(folder), media_roots
        raise ManualDirLayoutError(
            f"{self.name}: the archive {urls['annotations']} (extracted to {extracted}) has no folder holding "
            f"{', '.join(self.required_files())}; point {type(self).__module__}.URLS at a copy in the "
            f"expected layout, or build from a manual_dir.\nExpected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

    def _generate_examples(self, split: str, entries: list[Entry]):
        """Yields (key, record) in entry order; skips (and lists) entries that fail to load."""
        what = self.MEDIA
        if not entries:
            raise NoVideosDecodedError(f"{self.name}: split {split!r} lists no {what}s")
        stride = _KEY_SPACE // len(entries)
        kept: list[Entry] = []
        skipped: list[dict[str, str]] = []
        for i, (entry, frames) in enumerate(decode_pool.load_all(self._frame_loader(), entries, self._num_workers)):
            if not entry.captions:
                frames = video.VideoDecodeError(f"the annotations give this {what} no caption")
            if isinstance(frames, Exception):
                skipped.append({"video_id": entry.video_id, "path": str(entry.source), "reason": str(frames)})
                logging.warning("%s/%s: skipping %s %s: %s", self.name, split, what, entry.video_id, frames)
                continue
            kept.append(entry)
            yield (
                i * stride,
                {
                    "video_id": entry.video_id,
                    "frames": frames,
                    "num_frames": len(frames),
                    "captions": list(entry.captions),
                },
            )
        if not kept:
            reasons = "; ".join(f"{s['video_id']}: {s['reason']}" for s in skipped[:5])
            raise NoVideosDecodedError(
                f"{self.name}: none of the {len(entries)} {what}s of split {split!r} could be "
                f"loaded (first failures: {reasons})"
            )
        if skipped:
            logging.warning("%s/%s: skipped %d of %d %ss: %s", self.name, split, len(skipped), len(entries), what,
                            ", ".join(s["video_id"] for s in skipped))
        logging.info("%s/%s: wrote %d %ss, %d captions", self.name, split, len(kept), what,
                     sum(len(e.captions) for e in kept))
        self.info.metadata[split] = {
            "video_ids": [e.video_id for e in kept],
            "num_captions": [len(e.captions) for e in kept],
            "captions": [list(e.captions) for e in kept],
            "skipped": skipped,
        }


def _entries(roots: Sequence[epath.Path]) -> set[epath.Path]:
    """The roots that exist and what is in them, two levels down."""
    out = set()
    for root in roots:
        if root.is_dir():
            out.add(root)
            for child in root.iterdir():
                out.add(child)
                if child.is_dir():
                    out.update(child.iterdir())
    return out


def _remove_half_built(roots: Sequence[epath.Path], before: set[epath.Path]) -> None:
    """Removes what a failed build created below `roots`: the dataset's new folders, TFDS's unfinished
    downloads and extractions (`*.tmp.*`, `*.incomplete*`), then the folders this left empty."""
    dataset = roots[1]
    new = sorted(_entries(roots) - before, key=lambda p: len(p.parts))
    for path in new:
        half = path.parent == dataset or ".tmp." in path.name or ".incomplete" in path.name
        if half and path.exists():
            path.rmtree() if path.is_dir() else path.unlink()
    for path in reversed(new):  # deepest first
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _manual_dir(dl_manager) -> epath.Path | None:
    """The download config's manual_dir, or None when it does not exist or is empty."""
    try:
        return epath.Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS's way of saying "missing or empty"
        return None
