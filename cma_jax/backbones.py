"""Backbone names (a preset, a Hugging Face repo id, a URL, a file, a folder) -> converted, read-only backbone folders
in a local cache: `resolve(spec)`; docs/backbones.md lists what a spec may be, the cache's layout, which source each
preset comes from, offline use and mirrors.

CLI (fill the cache, e.g. before going offline): python -m cma_jax.backbones SPEC [SPEC ...]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request

import filelock
import huggingface_hub
import huggingface_hub.errors
from tqdm import tqdm

from cma_jax import checkpoint, convert, paths
from cma_jax.network import TIMEOUT_S, DownloadError, offline, reason
from cma_jax.convert.tables import TOKENIZER_FILES
from cma_jax.models.clip import OPENAI_NAMES

CACHE_ENV = "CMA_JAX_CACHE"
MIRROR_ENV = "CMA_JAX_MIRROR"
RANDOM = "random"

# OpenAI's released checkpoints (clip/clip.py `_MODELS` in github.com/openai/CLIP; the same table is in the
# Cross-Modal-Adapter repo's modules/module_clip_jointvt_upshare_adapter.py). The directory before the file
# name is the file's SHA256.
OPENAI_URLS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/"
                      "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
ALIASES = OPENAI_NAMES  # our preset names -> OpenAI's
# OpenAI's BPE merges file, at a fixed commit of github.com/openai/CLIP (unchanged since 3bee281, Jan 2021).
BPE_URL = ("https://raw.githubusercontent.com/openai/CLIP/d05afc436d78f1c48dc0dbf8e5980a9d471f35f6/clip/"
           "bpe_simple_vocab_16e6.txt.gz#sha256=924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a")
# Files of a Hugging Face CLIPModel repo: config and tokenizer, then the first weight format present.
HF_FILES = ["config.json", *TOKENIZER_FILES]
HF_WEIGHTS = (["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
              ["pytorch_model.bin"])
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")

log = logging.getLogger(__name__)


class BackboneError(ValueError):
    """A backbone spec that names nothing usable."""


# ----------------------------------------------------------------------------- resolve
def resolve(spec: str, *, cache_dir: str | None = None, revision: str | None = None) -> str | None:
    """The converted backbone folder for `spec` (see the module docstring); None for `random`."""
    spec = (spec or "").strip()
    if spec == RANDOM:
        return None
    if not spec:
        raise BackboneError(
            "no backbone given: set --config.backbone=ViT-B/32 (or ViT-B/16, ViT-L/14, ViT-L/14@336px, a Hugging "
            "Face repo id such as openai/clip-vit-base-patch32, a URL, a .pt file or a converted folder); "
            "--config.backbone=random trains a randomly initialised CLIP (tests and benchmarks only)")
    cache = cache_root(cache_dir)
    name = ALIASES.get(spec, spec)
    if name in OPENAI_URLS:
        return _from_url(OPENAI_URLS[name], cache)
    scheme = urllib.parse.urlsplit(spec).scheme
    if scheme in ("http", "https", "file"):
        return _from_url(spec, cache)
    if paths.is_remote(spec):  # gs://bucket/ckpt: a converted folder, read by Orbax
        return spec
    path = os.path.abspath(os.path.expanduser(spec))
    if _is_converted(path):
        return path
    if os.path.exists(path):
        beside = f"in {path}" if os.path.isdir(path) else f"next to {path}"
        return _convert_cached(cache, _local_key(path), path, hint=f"put it {beside}")
    if _REPO_ID.fullmatch(spec):
        repo_id, _, rev = spec.partition("@")
        return _from_hub(repo_id, revision or rev or None, cache)
    raise BackboneError(
        f"backbone {spec!r}: not a preset ({', '.join(OPENAI_URLS)}), an existing file or folder, an "
        f"http(s):// URL or a Hugging Face repo id (org/name[@revision])")


def cache_root(cache_dir: str | None = None) -> str:
    """The cache folder: `cache_dir`, else $CMA_JAX_CACHE, else ~/.cache/cma_jax."""
    return os.path.abspath(os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/cma_jax"))


def _is_converted(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE))
            and os.path.isdir(os.path.join(path, checkpoint.PARAMS_DIR)))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "backbone"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- sources
def _from_url(url: str, cache: str) -> str:
    base, sha = split_sha256(url)
    filename = _filename(base)
    key = f"{_slug(os.path.splitext(filename)[0])}-{sha[:12] if sha else 'url' + _short_hash(base)}"
    out = os.path.join(cache, "backbones", key)
    if _is_converted(out):  # no network once converted
        return out
    pt = download(url, cache, hint=f"pass the file: --config.backbone=/path/{filename}")
    return _convert_cached(cache, key, pt, hint=f"put it at {_download_target(cache, BPE_URL)}")


def _local_key(path: str) -> str:
    """A local file or folder is converted again when a file in it changes (path, size, mtime)."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    stats = "|".join(f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)
    return f"{_slug(os.path.basename(path.rstrip(os.sep)))}-local{_short_hash(stats)}"


def _from_hub(repo_id: str, revision: str | None, cache: str) -> str:
    local_only = offline() is not None
    try:
        for weights in HF_WEIGHTS:  # safetensors if the repo has them, else pytorch_model.bin
            folder = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=local_only,
                                                       allow_patterns=HF_FILES + weights)
            if any(os.path.exists(os.path.join(folder, w)) for w in weights if "*" not in w):
                break
    except (huggingface_hub.errors.LocalEntryNotFoundError, huggingface_hub.errors.HfHubHTTPError, OSError) as e:
        where = f"{repo_id}@{revision}" if revision else repo_id
        why = (f"not in the Hugging Face cache and downloads are off ({offline()}=1)" if local_only
               else str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise DownloadError(
            f"backbone {where}: cannot get it from the Hugging Face Hub ({why}); on a machine with internet run "
            f"`python -m cma_jax.backbones {where}` (or `hf download {repo_id}`) and copy the cache, or "
            f"pass a local folder: --config.backbone=/path/to/{repo_id.split('/')[-1]}") from None
    commit = os.path.basename(os.path.normpath(folder))  # snapshots/<commit>: a new revision converts again
    key = f"hf-{_slug(repo_id.replace('/', '--'))}-{commit[:12]}"
    return _convert_cached(cache, key, folder, hint=f"put it at {_download_target(cache, BPE_URL)}")


# ----------------------------------------------------------------------------- conversion
def _convert_cached(cache: str, key: str, src: str, hint: str) -> str:
    """Convert `src` once into backbones/<key> (under a lock); later calls return the folder."""
    out = os.path.join(cache, "backbones", key)
    with _lock(cache, f"backbone-{key}"):
        if not _is_converted(out):
            extra = [] if _has_tokenizer(src) else [download(BPE_URL, cache, hint=hint)]
            log.info("converting %s -> %s", src, out)
            _convert_into(src, out, extra)
    return out


def _has_tokenizer(src: str) -> bool:
    """Whether the converter finds tokenizer files with `src` (beside a file, inside a folder)."""
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def _convert_into(src: str, out_dir: str, extra_tokenizer_files: list[str]) -> None:
    """Convert a checkpoint file or HF folder and save it as a read-only backbone folder (atomic)."""
    conv = convert.convert_checkpoint(src)
    if conv.adapters is not None:
        log.warning("%s holds Cross-Modal-Adapter weights too; only its backbone is used here (keep the adapters "
                    "with `python -m cma_jax.convert import %s BACKBONE --adapters_out DIR`)", src, src)
    checkpoint.save_backbone(out_dir, conv.clip_config, conv.backbone, conv.tokenizer_files or extra_tokenizer_files)


# ----------------------------------------------------------------------------- downloads
def split_sha256(url: str) -> tuple[str, str | None]:
    """(URL without a `#sha256=` fragment, expected SHA256 or None). OpenAI's URLs carry it as the
    directory before the file name."""
    base, _, fragment = url.partition("#")
    if fragment.startswith("sha256="):
        sha = fragment[len("sha256="):].lower()
        if not _SHA256.fullmatch(sha):
            raise BackboneError(f"{url}: #sha256= must be 64 hexadecimal digits")
        return base, sha
    parts = urllib.parse.urlsplit(base).path.split("/")
    return base, parts[-2].lower() if len(parts) >= 2 and _SHA256.fullmatch(parts[-2].lower()) else None


def _filename(url: str) -> str:
    return os.path.basename(urllib.parse.urlsplit(url).path) or "download"


def _download_target(cache: str, url: str) -> str:
    base, sha = split_sha256(url)
    return os.path.join(cache, "downloads", sha or "url-" + _short_hash(base), _filename(base))


def _source(url: str) -> str:
    """Where `url` is fetched from: $CMA_JAX_MIRROR/<file name> for OpenAI's files when set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    ours = url in OPENAI_URLS.values() or url == split_sha256(BPE_URL)[0]
    return f"{mirror.rstrip('/')}/{_filename(url)}" if mirror and ours else url


def download(url: str, cache_dir: str | None = None, *, hint: str = "") -> str:
    """The verified copy of `url` in the cache (downloads/<sha256>/<file>), fetched once.

    The SHA256 comes from a `#sha256=` fragment or OpenAI's URL path; without one the file is kept by URL.
    A mismatch deletes the file and raises DownloadError; so does a failed or cut download (its `.part`
    stays, not trusted, and the next call resumes it). `hint` says how to provide the file by hand.
    """
    cache = cache_root(cache_dir)
    base, sha = split_sha256(url)
    target = _download_target(cache, url)
    with _lock(cache, "download-" + os.path.basename(os.path.dirname(target))):
        if os.path.isfile(target):
            if sha is None or _sha256_of(target) == sha:
                return target
            log.warning("%s does not match its SHA256 %s; downloading it again", target, sha)
            os.remove(target)
        source = _source(base)
        advice = f"; without internet, download it elsewhere and {hint}" if hint else ""
        if offline():
            raise DownloadError(f"cannot download {source}: downloads are off ({offline()}=1) and it is not "
                                f"cached{advice}")
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        part = target + ".part"
        try:
            got = _fetch(source, part)
        except (OSError, http.client.HTTPException) as e:
            _remove_if_empty(folder)  # a partial file stays, to be resumed
            raise DownloadError(f"cannot download {source}: {reason(e)}{advice}") from None
        if sha is not None and got != sha:
            os.remove(part)
            _remove_if_empty(folder)
            raise DownloadError(f"{source}: SHA256 {got} does not match the expected {sha}; the file was deleted "
                                f"(a damaged download or a wrong mirror: try again, or check the source)")
        os.chmod(part, 0o444)
        os.replace(part, target)
    return target


def _remove_if_empty(folder: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def _fetch(url: str, part: str) -> str:
    """Download `url` into `part`, resuming what is there; -> SHA256 of the complete file."""
    for _ in range(2):  # a second pass only when the server refused to resume
        have = os.path.getsize(part) if os.path.exists(part) else 0
        digest = _hash_file(hashlib.sha256(), part) if have else hashlib.sha256()
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - http(s)/file URLs only
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: start over rather than trust the part
                os.remove(part)
                continue
            raise
        with response:
            if have and getattr(response, "status", None) != 206:  # the server ignores Range: from the start
                have, digest = 0, hashlib.sha256()
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1,
                    desc=_filename(url)) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
        if total is not None and have != total:
            raise DownloadError(f"the connection closed after {have:,} of {total:,} bytes (run again to resume)")
        return digest.hexdigest()
    raise DownloadError("the server refused to resume and to restart the download")


def _hash_file(digest, path: str):
    """`digest` updated with the bytes of the file at `path`."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest


def _sha256_of(path: str) -> str:
    return _hash_file(hashlib.sha256(), path).hexdigest()


@contextlib.contextmanager
def _lock(cache: str, name: str):
    """An inter-process lock on `name` in the cache; says once when it has to wait."""
    os.makedirs(os.path.join(cache, "locks"), exist_ok=True)
    lock = filelock.FileLock(os.path.join(cache, "locks", _slug(name) + ".lock"))
    try:
        lock.acquire(timeout=1)
    except filelock.Timeout:
        log.info("waiting for another process working on %s (lock %s)", name, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cma_jax.backbones", description="Download and convert backbones "
                                "into the cache; print each converted folder.")
    p.add_argument("specs", nargs="+", help="preset (ViT-B/32, ...), Hugging Face repo id, URL or local file")
    p.add_argument("--cache_dir", help=f"default: ${CACHE_ENV} or ~/.cache/cma_jax")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for spec in args.specs:
        try:
            print(resolve(spec, cache_dir=args.cache_dir))
        except (ValueError, OSError) as e:
            p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
