"""Builds a benchmark, from its public files (downloaded) or from a manual dir, without TensorFlow.

  python -m cma_jax.data.builders msrvtt --data_dir=/data/tfds [--manual_dir=/data/msrvtt] \
      [--config=9k|7k|9k-336px|...] [--workers=N] [--register_checksums]

MSR-VTT, MSVD and MSCOCO download their public files when no --manual_dir is given; the other benchmarks
(Flickr30K among them) need --manual_dir. (`tfds build` does the same but its command line imports TensorFlow at start-up.)
"""

import argparse
import os

import tensorflow_datasets as tfds

from cma_jax.data.builders import REGISTRY, base, get_builder, open_source


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cma_jax.data.builders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(REGISTRY))
    parser.add_argument("--manual_dir", help="videos or images + annotation files (see the docs); default for "
                        "MSR-VTT, MSVD and MSCOCO: download the public files")
    parser.add_argument("--data_dir", default=os.path.expanduser("~/tensorflow_datasets"))
    parser.add_argument(
        "--config", default=None, help="builder config, optionally with -<N>px, -<F>fps, -q<Q> suffixes"
    )
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--register_checksums", action="store_true",
                        help="record the downloads' sizes and SHA256 in the builders' checksums.tsv")
    args = parser.parse_args(argv)
    builder = get_builder(args.name, args.data_dir, args.config, num_workers=args.workers)
    if builder.needs_manual_dir() and not args.manual_dir:
        parser.error(f"{args.name} needs --manual_dir:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    try:
        manual_dir = os.path.expanduser(args.manual_dir) if args.manual_dir else None
        if manual_dir:  # given explicitly: it must be complete (no silent download instead)
            builder.check_manual_dir(manual_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, register_checksums=args.register_checksums))
    except (base.ManualDirLayoutError, base.NoVideosDecodedError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    for split in builder.info.splits:
        src = open_source(args.name, split, args.data_dir, builder.builder_config)
        print(
            f"{args.name}/{builder.builder_config.name} {split}: {len(src)} {src.media}s, "
            f"{int(src.num_captions.sum())} captions, {len(src.skipped)} skipped"
            + (": " + ", ".join(s["video_id"] for s in src.skipped[:20]) if src.skipped else "")
        )
    print(f"written to {builder.data_dir}")


if __name__ == "__main__":
    main()
