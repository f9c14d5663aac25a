"""Build throughput: N generated videos (textured, moving, H.264 like MSR-VTT's) through a builder.

  python benchmarks/bench_build.py [--videos 32] [--seconds 10] [--size 320x240] [--fps 30]
                                   [--resolution 224] [--workers 2]

Prints decode-only throughput on one core and the full build's videos/s and frames/s (stored
frames, at 1 frame per second) with `--workers` decoding processes.
"""

import argparse
import json
import os
import tempfile
import time

import av
import numpy as np
import tensorflow_datasets as tfds

from cma_jax.data import builders, video


def write_textured_video(path: str, seed: int, seconds: float, size: tuple[int, int],
                         fps: int) -> None:
  """A scrolling random texture plus noise: something a codec has to work for."""
  w, h = size
  rng = np.random.default_rng(seed)
  texture = rng.integers(0, 256, (h + 64, w + 64, 3), np.uint8)
  texture = ((texture.astype(np.uint16) + np.roll(texture, 1, 0) + np.roll(texture, 1, 1))
             // 3).astype(np.uint8)
  with av.open(path, 'w') as out:
    stream = out.add_stream('libx264' if 'libx264' in av.codecs_available else 'mpeg4', rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, 'yuv420p'
    stream.bit_rate = 500_000
    stream.options = {'preset': 'veryfast'} if stream.codec_context.name == 'libx264' else {}
    for i in range(int(seconds * fps)):
      dy, dx = (i // 2) % 64, i % 64
      img = texture[dy:dy + h, dx:dx + w]
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img),
                                                             format='rgb24')):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--videos', type=int, default=32)
  p.add_argument('--seconds', type=float, default=10.0)
  p.add_argument('--size', default='320x240')
  p.add_argument('--fps', type=int, default=30)
  p.add_argument('--resolution', type=int, default=224)
  p.add_argument('--workers', type=int, default=os.cpu_count())
  args = p.parse_args()
  size = tuple(int(x) for x in args.size.split('x'))

  with tempfile.TemporaryDirectory() as tmp:
    manual = os.path.join(tmp, 'manual')
    os.makedirs(os.path.join(manual, 'videos'))
    ids = [f'video{i}' for i in range(args.videos)]
    t0 = time.perf_counter()
    for i, vid in enumerate(ids):
      write_textured_video(os.path.join(manual, 'videos', f'{vid}.mp4'), i, args.seconds, size,
                           args.fps)
    print(f'generated {args.videos} videos of {args.seconds:g} s {size[0]}x{size[1]} '
          f'@{args.fps} fps in {time.perf_counter() - t0:.1f} s')
    sentences = [{'caption': f'caption {k} of {v}', 'video_id': v} for v in ids for k in range(2)]
    with open(os.path.join(manual, 'MSRVTT_data.json'), 'w') as f:
      json.dump({'sentences': sentences}, f)
    with open(os.path.join(manual, 'MSRVTT_train.9k.csv'), 'w') as f:
      f.write('video_id\n' + ''.join(v + '\n' for v in ids))
    with open(os.path.join(manual, 'MSRVTT_JSFUSION_test.csv'), 'w') as f:
      f.write('key,vid_key,video_id,sentence\nret0,msr0,video0,caption 0 of video0\n')

    n = min(8, args.videos)
    t0 = time.perf_counter()
    frames = [video.load_frames(os.path.join(manual, 'videos', f'{v}.mp4'),
                                resolution=args.resolution) for v in ids[:n]]
    dt = time.perf_counter() - t0
    nf = sum(map(len, frames))
    jpeg_kb = sum(len(j) for fr in frames for j in fr) / nf / 1024
    print(f'decode + resize + JPEG, 1 process: {n / dt:.2f} videos/s, {nf / dt:.1f} frames/s '
          f'({jpeg_kb:.1f} KiB per {args.resolution}px JPEG frame)')

    config = f'9k-{args.resolution}px'
    builder = builders.get_builder('msrvtt', os.path.join(tmp, 'data'), config,
                                   num_workers=args.workers)
    t0 = time.perf_counter()
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    dt = time.perf_counter() - t0
    src = builders.open_source('msrvtt', 'train', os.path.join(tmp, 'data'), config)
    nf = sum(src[i]['num_frames'] for i in range(len(src)))
    nv = len(src) + 1  # + the one test video
    print(f'build ({args.workers} workers, incl. process start-up): {nv / dt:.2f} videos/s, '
          f'{nf / dt:.1f} frames/s ({nv} videos in {dt:.1f} s)')


if __name__ == '__main__':
  main()
