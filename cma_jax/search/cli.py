"""The command line: `python -m cma_jax.search index | query | report | serve` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os

from cma_jax import api, console, paths
from cma_jax.files import write_atomic
from cma_jax.search import build, report, scoring, serve, store

DESCRIPTION = "Search your own videos: index a folder once, then query it with text (or serve a search page)."


def _source(spec: str | None) -> str | None:
    """A model path as recorded in the manifest: local paths absolute, names and URLs as they are."""
    if not spec or paths.is_remote(spec) or not os.path.exists(spec):
        return spec or None
    return os.path.abspath(spec)


def _retriever(args, manifest: dict | None):
    source = (manifest or {}).get("model_source", {})
    backbone = args.backbone or source.get("backbone")
    if not backbone:
        raise SystemExit("--backbone is required (ViT-B/32, a Hugging Face repo id, a .pt file or URL, a converted "
                         "folder)")
    adapters = args.adapters if args.adapters is not None else source.get("adapters")
    tokenizer = args.tokenizer or source.get("tokenizer")
    # Explicit flags, else the index's own settings; None leaves them to api.load (the adapters' training).
    settings = (manifest or {}).get("settings", {})
    num_frames = getattr(args, "num_frames", None) or settings.get("num_frames")
    fps = getattr(args, "fps", None) or settings.get("fps")
    dtype = args.dtype or source.get("dtype")  # part of the fingerprint, so it defaults to the index's too
    head = args.head or source.get("head") or "text_conditioned"
    tau = args.tau if args.tau is not None else source.get("tau", 5.0)
    r = api.load(backbone, adapters or None, tokenizer=tokenizer, head=head, tau=tau, num_frames=num_frames,
                 max_words=args.max_words or source.get("max_words"), fps=fps, batch_size=args.batch_size,
                 dtype=dtype)
    src = {"backbone": _source(r.backbone.backbone.folder), "adapters": _source(adapters),
           "tokenizer": _source(tokenizer) if isinstance(tokenizer, str) else None, "dtype": dtype,
           "head": head, "tau": tau, "max_words": r.max_words}
    return r, src


def _lines(path: str) -> list[str]:
    """The non-empty lines of a text file."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _queries(args) -> list[str]:
    texts = list(args.texts)
    if getattr(args, "queries_file", None):
        texts += _lines(args.queries_file)
    if not texts:
        raise SystemExit("no queries: give texts on the command line or --queries_file")
    return texts


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none to show (None, a flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cma_jax.search", description=DESCRIPTION, formatter_class=_Help)
    sub = p.add_subparsers(dest="cmd", required=True)
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("--backbone", help="anything config.backbone takes: ViT-B/32, a Hugging Face repo id, a .pt "
                                            "file or URL, a converted folder (default for query/report/serve: the "
                                            "index's)")
    loading.add_argument("--tokenizer", help="tokenizer (default: the index's, else the backbone's tokenizer/ folder)")
    model = argparse.ArgumentParser(add_help=False, parents=[loading])
    model.add_argument("--batch_size", type=int, default=16, help="videos / texts per encode batch")
    model.add_argument("--adapters", help="run workdir / checkpoints folder or converted adapter folder; "
                                          "'' = none (default for query/report: the index's)")
    model.add_argument("--head", choices=("text_conditioned", "meanp"),
                       help="how a query weighs a video's frames (default: the index's, else text_conditioned)")
    model.add_argument("--tau", type=float, help="text-conditioned head temperature (default: the index's, else 5)")
    model.add_argument("--max_words", type=int,
                       help="words per query (default: the index's, else what the adapters were trained with, "
                            "else 32)")
    model.add_argument("--dtype", choices=("float32", "bfloat16"),
                       help="compute dtype (default: the index's, else the backbone's)")

    ix = sub.add_parser("index", parents=[model], formatter_class=_Help,
                        help="encode a folder of videos into an index (resumable)")
    ix.add_argument("video_dir", help="folder of videos (searched recursively)")
    ix.add_argument("index_dir", help="index folder (created, or resumed when it holds an index)")
    ix.add_argument("--num_frames", type=int, help="frames per video, T (default: the index's when resuming, "
                                                   "else what the adapters were trained with, else 12)")
    ix.add_argument("--fps", type=float, help="frame sampling rate before taking T frames (default: the index's "
                                              "when resuming, else what the adapters were trained with, else 1)")
    ix.add_argument("--shard_size", type=int, default=256, help="videos per shard file (resume granularity)")
    ix.add_argument("--workers", type=int, default=4, help="decoding threads")
    ix.add_argument("--overwrite", action="store_true", help="delete an existing index in index_dir first")
    ix.add_argument("--retry_failed", action="store_true", help="try the videos reported unreadable again")
    ix.add_argument("--no_progress", action="store_true", help="no progress bar")

    queries = argparse.ArgumentParser(add_help=False, parents=[model])  # what query and report share
    queries.add_argument("index_dir")
    queries.add_argument("texts", nargs="*", help="query texts")
    queries.add_argument("--queries_file", help="one query per line")
    queries.add_argument("-k", type=int, default=5, help="hits per query")
    queries.add_argument("--qbnorm_bank", help="captions file (one per line): rank by QB-Norm with them as the "
                         "query bank (e.g. a training split's captions)")
    queries.add_argument("--qbnorm_k", type=int, default=1, help="QB-Norm's k (the paper's 1)")
    queries.add_argument("--qbnorm_beta", type=float, default=20.0, help="QB-Norm's beta on cosines (the paper's 20)")

    q = sub.add_parser("query", parents=[queries], formatter_class=_Help, help="top-k videos for text queries")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rp = sub.add_parser("report", parents=[queries], formatter_class=_Help, help="HTML page with each hit's frames")
    rp.add_argument("--out", default="search_report.html", help="the HTML file to write")
    rp.add_argument("--thumbs", type=int, default=4, help="thumbnails per hit")

    sv = sub.add_parser("serve", parents=[loading], formatter_class=_Help,
                        help="a search page over one or more indexes of one backbone")
    sv.add_argument("index_dirs", nargs="+", metavar="index_dir", help="index folders (built on one backbone)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="port")
    sv.add_argument("--exact_up_to", type=int, default=20000,
                    help="indexes with more videos search in two stages (mean-pooled candidates, then the head)")
    sv.add_argument("--candidates", type=int, default=1000, help="candidates per query in a two-stage search")
    sv.add_argument("--batch_size", type=int, default=1, help="texts per encode batch (queries come one by one)")
    return p


def _query_or_report(args) -> int:
    texts = _queries(args)
    index = store.load_index(args.index_dir)
    retriever, _ = _retriever(args, index["manifest"])
    store.check_model(index["manifest"], retriever.fingerprint, args.index_dir)
    bank = _lines(args.qbnorm_bank) if args.qbnorm_bank else None
    results = scoring.search(retriever, index, texts, args.k, bank, qbnorm_k=args.qbnorm_k,
                             qbnorm_beta=args.qbnorm_beta)
    if args.cmd == "query":
        if args.json:
            print(json.dumps([{"query": t, "hits": h} for t, h in zip(texts, results)], indent=1))
        else:
            for t, hits in zip(texts, results):
                print(f"query: {t}")
                for h in hits:
                    print(f"  {h['rank']:>3}. {h['score']:+.4f}  {h['video']}  (best at {h['time']:.1f} s)")
        return 0
    page = report.render_report(results, texts, index, thumbs=args.thumbs, fps=index["manifest"]["settings"]["fps"])
    write_atomic(args.out, page)
    hits = len(results[0])  # every query gets min(k, videos in the index)
    line = f"report with {console.plural(len(texts), 'query', 'queries')} x {console.plural(hits, 'hit', 'hits')}"
    if hits < args.k:
        line += f" (k={args.k}, but the index holds {hits} videos)"
    unreadable = len(index["manifest"]["failed"])
    if unreadable:
        line += f", listing {console.plural(unreadable, 'unreadable video', 'unreadable videos')}"
    print(f"{line} -> {args.out}")
    return 0


def _serve(args) -> int:
    backbone, served = serve.load_indexes(args.index_dirs, backbone=args.backbone, tokenizer=args.tokenizer,
                                          batch_size=args.batch_size, exact_up_to=args.exact_up_to,
                                          candidates=args.candidates)
    for line in serve.memory_lines(backbone, served):
        print(line)
    serve.serve(served, host=args.host, port=args.port)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    where = args.index_dirs[0] if args.cmd == "serve" else args.index_dir
    try:
        if args.cmd == "index":
            existing = None if args.overwrite else store.read_manifest(args.index_dir)
            retriever, src = _retriever(args, existing)  # resuming: the model defaults to the index's
            build.build_index(retriever, args.video_dir, args.index_dir, shard_size=args.shard_size,
                              workers=args.workers, overwrite=args.overwrite, retry_failed=args.retry_failed,
                              model_source=src, progress=not args.no_progress)
            return 0
        if args.cmd == "serve":
            return _serve(args)
        return _query_or_report(args)
    except Exception as e:  # bad input or a full disk: one line, exit 2; a bug keeps its traceback
        console.print_error_or_raise(e, where)
        return 2
