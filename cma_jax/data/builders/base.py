"""Shared TFDS machinery for the video-text builders, and the reader the pipeline uses.

Contract (the input pipeline and the synthetic builder rely on it):

* One record per video, features `FEATURES`:
    video_id    str
    frames      Sequence of JPEG bytes, one per sampled frame (fps and resolution of the
                builder config: shorter side resized to `resolution` (bicubic), centre crop to
                resolution x resolution, RGB); at least one frame
    num_frames  int32 == len(frames)
    captions    Sequence of str (1 for MSR-VTT 1k-A test, several for multi-caption sets,
                a single joined paragraph for ActivityNet / DiDeMo)
* Files are ArrayRecord, written with `disable_shuffling=True`: record i of a split is the
  i-th video `_split_entries` listed for it (skipped videos leave no hole). Records are not
  shuffled on disk; the pipeline shuffles.
* `builder.info.metadata[split]` = {'video_ids': [...], 'num_captions': [...],
  'captions': [[...], ...], 'skipped': [{'video_id', 'path', 'reason'}, ...]}, the first three
  in record order. It is what makes enumerating every (video, caption) pair cheap.
* `open_source(name, split, data_dir, builder_config=None)` -> `VideoTextSource`: `len(src)`,
  `src[i]` -> {'video_id': str, 'frames': list[bytes] (JPEG, not decoded), 'num_frames': int,
  'captions': list[str]}; `src.num_captions` (int32 [N]), `src.video_ids`, `src.captions` come
  from the metadata without reading any frames. The source pickles (grain workers).

Subclasses set `name`, `BUILDER_CONFIGS` (VideoTextConfig), `MANUAL_DOWNLOAD_INSTRUCTIONS`,
`REQUIRED_FILES` and implement `_split_entries(manual_dir) -> {split: [Entry, ...]}`. A builder
that makes its own frames (no files) overrides `_frame_loader()` to return a picklable
callable `source -> list[bytes]`, raising `video.VideoDecodeError` for a bad source.

Where the files come from: a manual_dir that exists and is not empty is used, and must hold every
required file. Without one, a builder whose benchmark has public archives (`download_urls()` ->
{'annotations': URL, 'videos': URL}, from its module-level `URLS`) downloads and extracts them with
TFDS's download manager (cached in DATA_DIR/downloads; checked against `checksums.tsv` beside the
builders for the URLs that file lists), and its `_split_entries(annotations_dir, videos_dir)` reads
the annotation files from the folder of the extracted archive that holds them and finds the videos
anywhere in the other. A builder without public archives stops with its full manual instructions.

Building without TensorFlow: TFDS' writer keeps up to 1 GiB of records in memory and then
spills them to 1000 on-disk buckets through `tf.io.gfile`, which fails without TF.
`_install_tf_free_io` gives that module (and TFDS's archive extractor, which writes extracted
files through `tf.io.gfile` too) plain-file I/O, and the record keys are spread evenly over the
128-bit key space so that, with shuffling disabled, bucket b holds records in [b/1000, (b+1)/1000)
of the split in order: records stay in order and only ~1/1000 of a split is ever sorted in memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import csv
import dataclasses
import functools
import json
import multiprocessing
import os
import re
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.download import download_manager

from cma_jax.data import video

_KEY_SPACE = 2**128  # TFDS hashes keys to 128 bits; with shuffling disabled the key is used as is.


@dataclasses.dataclass(frozen=True)
class Entry:
    """One video of a split: its id, its captions and where its frames come from."""

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
    """The record features (frames stay JPEG bytes: stored and returned undecoded)."""
    return tfds.features.FeaturesDict(
        {
            "video_id": tfds.features.Text(),
            "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "num_frames": tfds.features.Scalar(np.int32),
            "captions": tfds.features.Sequence(tfds.features.Text()),
        }
    )


class NoVideosDecodedError(RuntimeError):
    """Every video of a split failed to decode."""


class ManualDirLayoutError(FileNotFoundError):
    """The manual dir lacks files the builder needs."""


class DownloadChecksumError(OSError):
    """A downloaded archive whose size or SHA256 differ from the ones checksums.tsv records."""


def _default_workers() -> int:
    return int(os.environ.get("CMA_JAX_BUILD_WORKERS", os.cpu_count() or 1))


class VideoTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: one ArrayRecord record per video (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [VideoTextConfig()]
    REQUIRED_FILES: Sequence[str] = ()  # relative to manual_dir

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

    def _split_entries(self, manual_dir: epath.Path | None) -> dict[str, list[Entry]]:
        raise NotImplementedError

    def required_files(self) -> Sequence[str]:
        """Annotation files (relative to manual_dir) the current config needs."""
        return self.REQUIRED_FILES

    def download_urls(self) -> dict[str, str]:
        """{'annotations': URL, 'videos': URL} of the benchmark's public archives; {} = manual only."""
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
                entries = self._split_entries(*self._download(dl_manager))
            else:
                raise ManualDirLayoutError(
                    f"{self.name}: its files must be downloaded by hand into a manual_dir (none given, or it is "
                    f"empty); pass it with --manual_dir=DIR.\nExpected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {split: self._generate_examples(split, items) for split, items in entries.items()}

    def _download(self, dl_manager) -> tuple[epath.Path, epath.Path]:
        """Download and extract the public archives -> (folder holding the annotation files, video root)."""
        urls = self.download_urls()
        try:
            paths = dl_manager.download_and_extract(urls)
        except download_manager.NonMatchingChecksumError as e:  # the file stays in a .tmp folder, never used
            raise DownloadChecksumError(f"{self.name}: {e}") from None
        extracted = epath.Path(paths["annotations"])
        for folder, _, _ in os.walk(os.fspath(extracted)):  # the archive may wrap its files in a folder
            if self.has_required_files(folder):
                return epath.Path(folder), epath.Path(paths["videos"])
        raise ManualDirLayoutError(
            f"{self.name}: the archive {urls['annotations']} (extracted to {extracted}) has no folder holding "
            f"{', '.join(self.required_files())}; point {type(self).__module__}.URLS at a copy in the "
            f"expected layout, or build from a manual_dir.\nExpected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

    def _generate_examples(self, split: str, entries: list[Entry]):
        """Yields (key, record) in entry order; skips (and lists) videos that fail to load."""
        if not entries:
            raise NoVideosDecodedError(f"{self.name}: split {split!r} lists no videos")
        stride = _KEY_SPACE // len(entries)
        kept: list[Entry] = []
        skipped: list[dict[str, str]] = []
        for i, (entry, frames) in enumerate(_load_all(self._frame_loader(), entries, self._num_workers)):
            if not entry.captions:
                frames = video.VideoDecodeError("the annotations give this video no caption")
            if isinstance(frames, Exception):
                skipped.append({"video_id": entry.video_id, "path": str(entry.source), "reason": str(frames)})
                logging.warning("%s/%s: skipping video %s: %s", self.name, split, entry.video_id, frames)
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
                f"{self.name}: none of the {len(entries)} videos of split {split!r} could be "
                f"decoded (first failures: {reasons})"
            )
        if skipped:
            logging.warning(
                "%s/%s: skipped %d of %d videos: %s",
                self.name,
                split,
                len(skipped),
                len(entries),
                ", ".join(s["video_id"] for s in skipped),
            )
        logging.info(
            "%s/%s: wrote %d videos, %d captions",
            self.name,
            split,
            len(kept),
            sum(len(e.captions) for e in kept),
        )
        self.info.metadata[split] = {
            "video_ids": [e.video_id for e in kept],
            "num_captions": [len(e.captions) for e in kept],
            "captions": [list(e.captions) for e in kept],
            "skipped": skipped,
        }


def _manual_dir(dl_manager) -> epath.Path | None:
    """The download config's manual_dir, or None when it does not exist or is empty."""
    try:
        return epath.Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS's way of saying "missing or empty"
        return None


def _load_one(loader, entry: Entry):
    if not entry.captions:
        return None  # skipped by the caller; no need to decode
    return video.load_or_error(loader, entry.source, entry.video_id)


def _submit(pool, loader, entry: Entry) -> concurrent.futures.Future:
    if not entry.captions:
        done = concurrent.futures.Future()
        done.set_result(None)
        return done
    # Only cma_jax.data.video travels: the workers never import TFDS.
    try:
        return pool.submit(video.load_or_error, loader, entry.source, entry.video_id)
    except concurrent.futures.process.BrokenProcessPool as e:
        # A worker died since the last result (e.g. while the build wrote a record): fail this future
        # like the ones in flight, so `_load_all` retries it in isolation instead of stopping.
        failed = concurrent.futures.Future()
        failed.set_exception(e)
        return failed


def _load_all(loader, entries: list[Entry], workers: int) -> Iterator[tuple[Entry, Any]]:
    """(entry, frames or the VideoDecodeError) in entry order, decoded by `workers` processes.

    A decoder that kills its process (a crash in FFmpeg on a broken file) costs that one video:
    the videos that were in flight are retried one by one, each in a fresh process.
    """
    if workers <= 1 or len(entries) < 2:
        for entry in entries:
            yield entry, _load_one(loader, entry)
        return
    # spawn: the parent may hold threads (JAX, TFDS) that fork would copy in a broken state.
    ctx = multiprocessing.get_context("spawn")
    pending = collections.deque(entries)
    inflight: collections.deque = collections.deque()
    window = 4 * workers  # bounded look-ahead keeps order and memory bounded
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        while pending or inflight:
            while pending and len(inflight) < window:
                entry = pending.popleft()
                inflight.append((entry, _submit(pool, loader, entry)))
            entry, fut = inflight.popleft()
            try:
                result = fut.result()
            except concurrent.futures.process.BrokenProcessPool:
                pool.shutdown(cancel_futures=True)
                inflight.appendleft((entry, fut))
                for e, f in inflight:
                    ok = f.done() and not f.cancelled() and f.exception() is None
                    yield e, f.result() if ok else _load_isolated(loader, e, ctx)
                inflight.clear()
                pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
                continue
            yield entry, result
    finally:
        pool.shutdown(cancel_futures=True)


def _load_isolated(loader, entry: Entry, ctx):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        try:
            return _submit(pool, loader, entry).result()
        except concurrent.futures.process.BrokenProcessPool:
            return video.VideoDecodeError(f"the decoder crashed on {entry.source}")


# --- annotation helpers --------------------------------------------------------------------


def read_json(path: epath.PathLike) -> Any:
    """The parsed JSON file; ValueError naming the file if it is not JSON (a cut-off download)."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_list(path: epath.PathLike) -> list[str]:
    """Non-empty stripped lines of a text file (a split's video ids)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_csv(path: epath.PathLike, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header that must contain `columns`."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: expected columns {list(columns)}, missing {missing} (header: {reader.fieldnames})"
            )
        return list(reader)


# --- video file lookup ---------------------------------------------------------------------


def index_videos(root: epath.PathLike) -> dict[str, str]:
    """Maps every video file under `root` by name and by name without its extension(s).

    Tolerates the layouts people use (flat, `videos/all/`, `YouTubeClips/`, ...) and ids
    given with or without an extension (DiDeMo ids carry `.mov`, files may be `.mov.mp4`).
    """
    index: dict[str, str] = {}
    for dirpath, _, files in os.walk(os.fspath(root)):
        for f in sorted(files):
            if not f.lower().endswith(video.VIDEO_EXTENSIONS):
                continue
            path = os.path.join(dirpath, f)
            name = f
            while True:
                index.setdefault(name, path)
                stem, ext = os.path.splitext(name)
                if not ext or ext.lower() not in video.VIDEO_EXTENSIONS:
                    break
                name = stem
    return index


def find_video(index: dict[str, str], video_id: str, *alternatives: str) -> str | None:
    """The file of `video_id` (or of one of its alternative spellings), None if absent."""
    for key in (video_id, *alternatives):
        if key in index:
            return index[key]
        stem, ext = os.path.splitext(key)
        if ext.lower() in video.VIDEO_EXTENSIONS and stem in index:
            return index[stem]
    return None



def entries_from_lists(manual_dir: epath.Path, split_lists: dict[str, str],
                       captions: dict[str, tuple[str, ...]], videos_dir: epath.Path | None = None
                       ) -> dict[str, list[Entry]]:
    """{split: [Entry]} for splits given as files of video ids (one a line) in `manual_dir`, captions by
    video id, videos found under `videos_dir` (default: `manual_dir`)."""
    videos = index_videos(videos_dir or manual_dir)
    return {
        split: [Entry(v, captions.get(v, ()), find_video(videos, v)) for v in read_list(manual_dir / f)]
        for split, f in split_lists.items()
    }

# --- TF-free building ----------------------------------------------------------------------


class _ResourceExhaustedError(Exception):
    """Never raised: stands in for tf.errors.ResourceExhaustedError."""


class _Gfile:
    GFile = staticmethod(open)
    exists = staticmethod(os.path.exists)
    remove = staticmethod(os.remove)


def _as_text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else x


class _TfShim:
    """The slice of `tf` that tfds.core.shuffle and the archive extractor use, on local files."""

    class io:  # noqa: N801 (mirrors tf.io)
        gfile = _Gfile

    class errors:  # noqa: N801
        ResourceExhaustedError = _ResourceExhaustedError

    class compat:  # noqa: N801
        as_text = staticmethod(_as_text)


def _install_tf_free_io() -> None:
    try:
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel
        from tensorflow_datasets.core.download import extractor  # pylint: disable=import-outside-toplevel

        shuffle.tf = _TfShim
        extractor.tf = _TfShim


_install_tf_free_io()


# --- reading -------------------------------------------------------------------------------


class VideoTextSource:
    """Random access to a built split: items are dicts with undecoded JPEG frames."""

    def __init__(self, data_source, meta: dict[str, Any], name: str):
        self._source = data_source
        self.name = name
        self.video_ids: list[str] = meta["video_ids"]
        self.captions: list[list[str]] = meta["captions"]
        self.num_captions = np.asarray(meta["num_captions"], np.int32)  # [N]
        self.skipped: list[dict[str, str]] = list(meta.get("skipped", []))
        if len(self.video_ids) != len(data_source):
            raise ValueError(
                f"{name}: metadata lists {len(self.video_ids)} videos but the split "
                f"holds {len(data_source)} records; rebuild the dataset"
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self._source[int(i)]
        return {
            "video_id": _text(rec["video_id"]),
            "frames": [bytes(f) for f in rec["frames"]],
            "num_frames": int(rec["num_frames"]),
            "captions": [_text(c) for c in rec["captions"]],
        }

    def __repr__(self) -> str:
        return f"VideoTextSource({self.name}, {len(self)} videos)"


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


_SUFFIX = re.compile(r"^(?:(?P<px>\d+)px|(?P<fps>\d+(?:\.\d+)?)fps|q(?P<q>\d+))$")


def resolve_config(
    builder_cls: type[VideoTextBuilder], builder_config: str | VideoTextConfig | None
) -> VideoTextConfig:
    """A config object from a name: a predefined config, optionally with `-<N>px`, `-<F>fps`,
    `-q<Q>` suffixes overriding resolution, fps and JPEG quality (e.g. '9k-336px')."""
    if isinstance(builder_config, VideoTextConfig):
        return builder_config
    predefined = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
    name = builder_config or builder_cls.BUILDER_CONFIGS[0].name
    base, *suffixes = name.split("-")
    if base not in predefined:
        raise ValueError(
            f"{builder_cls.name}: unknown config {name!r}; expected one of "
            f"{sorted(predefined)} optionally followed by -<N>px, -<F>fps, -q<Q>"
        )
    if not suffixes:
        return predefined[base]
    overrides = {}
    for suffix in suffixes:
        m = _SUFFIX.match(suffix)
        if not m:
            raise ValueError(
                f"{builder_cls.name}: bad config suffix {suffix!r} in {name!r}; "
                "expected <N>px, <F>fps or q<Q>"
            )
        if m["px"]:
            overrides["resolution"] = int(m["px"])
        elif m["fps"]:
            overrides["fps"] = float(m["fps"])
        else:
            overrides["jpeg_quality"] = int(m["q"])
    return dataclasses.replace(predefined[base], name=name, **overrides)


def get_builder(name: str, data_dir: epath.PathLike, builder_config=None, **kwargs) -> VideoTextBuilder:
    """The registered builder `name` (see builders/__init__.py) for `data_dir`."""
    from cma_jax.data.builders import REGISTRY  # pylint: disable=import-outside-toplevel

    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    config = resolve_config(cls, builder_config)
    if any(config is c for c in cls.BUILDER_CONFIGS):
        # By name: TFDS rejects a copy of a predefined config object, which is what unpickling the
        # builder (grain worker processes) would pass back.
        config = config.name
    # expanduser: `--data_dir=~/...` reaches us unexpanded (no shell expands `~` after `=`).
    return cls(data_dir=os.path.expanduser(os.fspath(data_dir)), config=config, **kwargs)


def build_command(builder: VideoTextBuilder) -> str:
    """The command line that builds `builder`'s dataset."""
    cmd = (f"python -m cma_jax.data.builders {builder.name} --data_dir={builder.data_dir_root} "
           f"--config={builder.builder_config.name}")
    return cmd + " --manual_dir=DIR" if builder.needs_manual_dir() else cmd


def _not_built(builder: VideoTextBuilder) -> str:
    msg = (f"dataset {builder.name} (config {builder.builder_config.name}) is not built in "
           f"{builder.data_dir_root} (expected {builder.data_dir}); build it with: {build_command(builder)}")
    if builder.needs_manual_dir():
        msg += f"\nwhere DIR holds the files it needs, downloaded by hand:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    return msg


def ensure_built(name: str, data_dir: epath.PathLike, builder_config=None, *, build: bool = True) -> None:
    """Builds the dataset if it is not built and needs no manual_dir (its files are public, or generated) and
    `build` allows it; else raises FileNotFoundError saying how to build it.

    Downloading and building show TFDS's progress bars; a later call finds the dataset built.
    """
    builder = get_builder(name, data_dir, builder_config)
    if builder.is_prepared():
        return
    if not build or builder.needs_manual_dir():
        raise FileNotFoundError(_not_built(builder))
    logging.info("%s (config %s) is not built in %s: building it once (downloading its public files, if any)",
                 name, builder.builder_config.name, builder.data_dir_root)
    builder.download_and_prepare()


def open_source(name: str, split: str, data_dir: epath.PathLike, builder_config=None) -> VideoTextSource:
    """Random-access source over a built split (see the module docstring)."""
    builder = get_builder(name, data_dir, builder_config)
    if not builder.is_prepared():
        raise FileNotFoundError(_not_built(builder))
    if split not in builder.info.splits:
        raise ValueError(f"{name} has no split {split!r}; built splits: {list(builder.info.splits)}")
    meta = builder.info.metadata.get(split) if builder.info.metadata else None
    if meta is None:
        raise ValueError(
            f"{name}/{split}: no caption index in {builder.data_dir}/metadata.json; rebuild the dataset"
        )
    return VideoTextSource(builder.as_data_source(split), meta, f"{name}/{split}")
