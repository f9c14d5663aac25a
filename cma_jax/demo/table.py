"""The demo's table: every method of `extra.methods` trained from the one backbone, `extra.seeds` times,
tested on the `adapt` test split -> results.md (mean ± std over seeds), results.json, curves.png, and
with full fine-tuning among them efficiency.png (the paper's figure: t2v R@1 vs relative step time)."""

from __future__ import annotations

import os
import time

import numpy as np

from cma_jax.data.builders import open_source
from cma_jax.demo import stages
from cma_jax.demo.stages import rows, say
from cma_jax.files import write_atomic


# ----------------------------------------------------------------------------- the table's rows
def method_row(config, method: str, workdir: str, data_dir: str, backbone: str, tree: dict, test_set,
               val_set) -> dict:
    """Train (unless zero-shot) and test one method, once per seed -> its row: mean, std and every seed."""
    runs = []
    for seed in [config.seed] if method == "zero_shot" else stages.seeds(config):
        cfg = stages.stage_config(config, method, data_dir, backbone, seed)
        run_dir = os.path.join(workdir, "runs", method)
        if method != "zero_shot":  # zero-shot trains nothing: one evaluation, whatever the seed
            run_dir = os.path.join(run_dir, f"seed{seed}")
        reused = os.path.exists(os.path.join(run_dir, stages.RECORD))
        t0 = time.time()
        rec = stages.train_and_test(cfg, method, run_dir, tree, test_set, val_set)
        m = rec["metrics"]
        label = rows()[method] if method == "zero_shot" else f"{rows()[method]}, seed {seed}"
        took = "reused" if reused else f"{time.time() - t0:.0f}s"
        say(f"  {label}: t2v R@1 {m['t2v']['R1']:.1f}, v2t R@1 {m['v2t']['R1']:.1f} ({took})")
        runs.append(rec)
    mean, std = stages.metrics_mean_std([r["metrics"] for r in runs])
    step_times = [r["step_time_s"] for r in runs if r["step_time_s"]]
    row = {k: runs[0][k] for k in ("method", "name", "num_videos", "total_params", "trainable_params",
                                   "trainable_percent")}
    row.update(metrics=mean, metrics_std=std, num_seeds=len(runs),
               step_time_s=float(np.median(step_times)) if step_times else None,
               checkpoint_bytes=int(np.median([r["checkpoint_bytes"] for r in runs])),
               seeds=[{k: v for k, v in r.items() if k not in ("config", "history")} for r in runs],
               histories=[r["history"] for r in runs])
    if val_set is not None:
        row["val_metrics"] = stages.metrics_mean_std([r["val_metrics"] for r in runs])[0]
    return row


# ----------------------------------------------------------------------------- report
def _fmt_bytes(n: int) -> str:
    if n == 0:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def markdown_table(rows: list[dict], header: str) -> str:
    """The paper's main table in miniature: both directions (mean ± std over seeds), parameters, step
    time, checkpoint size."""
    cols = ["Method", "Trainable params", "Trained share", "t2v R@1", "R@5", "R@10", "MdR", "MnR",
            "v2t R@1", "R@5", "R@10", "MdR", "MnR", "Step time", "Checkpoint"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m, s = r["metrics"], r["metrics_std"]
        metric_cells = [stages.pm(m[d][k], s[d][k], r["num_seeds"]) for d in ("t2v", "v2t")
                        for k in ("R1", "R5", "R10", "MdR", "MnR")]
        step = f"{1000 * r['step_time_s']:.0f} ms" if r["step_time_s"] else "-"
        lines.append("| " + " | ".join([r["name"], f"{r['trainable_params']:,}", f"{r['trainable_percent']:.2f} %",
                                        *metric_cells, step, _fmt_bytes(r["checkpoint_bytes"])]) + " |")
    return "\n".join(lines) + "\n"


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < k or k <= 1:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_curves(pretrain_history: list[dict], rows: list[dict], path: str) -> None:
    """Training loss of the pre-training and of every trained method (moving average, mean over seeds) -> PNG."""
    import matplotlib  # heavy: only when the plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_over_seeds(histories):
        n = min(len(h) for h in histories)
        return [{"step": histories[0][i]["step"], "loss": float(np.mean([h[i]["loss"] for h in histories]))}
                for i in range(n)]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, title, series in (
            (axes[0], "pre-training (synthetic 'pretrain', all weights)", [("CLIP from scratch", pretrain_history)]),
            (axes[1], "adaptation (synthetic 'adapt'), mean over seeds",
             [(r["name"], mean_over_seeds(r["histories"])) for r in rows if r["histories"][0]])):
        for label, hist in series:
            if not hist:
                continue
            steps = np.asarray([h["step"] for h in hist])
            loss = np.asarray([h["loss"] for h in hist])
            k = max(1, len(loss) // 30)
            ax.plot(steps[k - 1:] if len(loss) >= k else steps, _smooth(loss, k), label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("InfoNCE loss (moving average)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_efficiency(rows: list[dict], path: str) -> None:
    """The paper's efficiency figure: test t2v R@1 (mean ± std over seeds) against each method's median step
    time relative to full fine-tuning's, measured in this run -> PNG."""
    import matplotlib.pyplot as plt

    fig = efficiency_figure(rows)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def efficiency_figure(rows: list[dict]):
    """plot_efficiency's matplotlib figure (pyplot's: close it)."""
    import matplotlib  # heavy: only when the plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r["step_time_s"] for r in rows if r["method"] == "full")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = []  # (x, y, name, the label's distance from the point in points)
    for r in rows:
        if not r["step_time_s"]:
            continue  # zero-shot trains nothing
        x, y, e = r["step_time_s"] / full, r["metrics"]["t2v"]["R1"], r["metrics_std"]["t2v"]["R1"]
        ours = r["method"] == "cma"
        size = 14 if ours else 6
        ax.errorbar([x], [y], yerr=[e], fmt="*" if ours else "o", ms=size,
                    color="red" if ours else "grey" if r["method"] == "full" else None, capsize=3)
        points.append((x, y, r["name"], size / 2 + 3))
    ax.margins(x=0.08, y=0.1)
    ax.set_xlabel("relative training time (median step time / full fine-tuning's, this run)")
    ax.set_ylabel("test t2v R@1")
    ax.set_title("synthetic adapt task: R@1 vs training time", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _place_labels(ax, points)  # once the frame is where it stays
    return fig


# Where a point's label may go, in order of preference: (direction, horizontal alignment, vertical alignment);
# beside the point, then higher or lower, clear of a neighbour's error bar.
_LABEL_SPOTS = tuple(((dx, dy * lift), ha, va) for lift in (1, 3, 5) for (dx, dy), ha, va in (
    ((1, 0.7), "left", "bottom"), ((-1, 0.7), "right", "bottom"), ((1, -0.7), "left", "top"),
    ((-1, -0.7), "right", "top"), ((0, 1.5), "center", "bottom"), ((0, -1.5), "center", "top")))


def _place_labels(ax, points) -> None:
    """Each point's name `away` points from it, at the first spot of _LABEL_SPOTS where it stays inside the axes
    and clear of every marker and error bar (each part's drawn box) and of the labels placed before; else where
    it overlaps least. Methods sit close together (the two adapters often side by side), and where depends on the
    machine's step times, so no spot is fixed."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [_drawn_box(ax, a, renderer) for c in ax.containers for a in c.get_children()]
    for x, y, name, away in points:
        best = None
        for (dx, dy), ha, va in _LABEL_SPOTS:
            label = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx * away, dy * away), ha=ha, va=va,
                                fontsize=7)
            box = label.get_window_extent(renderer)
            outside = box.width * box.height - _overlap(box, frame)
            cost = outside * 10 + sum(_overlap(box, t) for t in taken)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label, box)
            else:
                label.remove()
            if cost == 0:
                break
        taken.append(best[2])


def _drawn_box(ax, artist, renderer):
    """Where an error bar's part is drawn, in pixels: a marker or cap as matplotlib measures it, the bar (a
    LineCollection, which measures as empty) from its segments, a pixel wider each side."""
    from matplotlib.collections import LineCollection  # heavy: only when the plot is drawn
    from matplotlib.transforms import Bbox

    if isinstance(artist, LineCollection):
        ends = ax.transData.transform(np.concatenate(artist.get_segments()))  # [2 * bars, 2] pixels
        (x0, y0), (x1, y1) = ends.min(axis=0), ends.max(axis=0)
        return Bbox([[x0 - 1, y0], [x1 + 1, y1]])
    return artist.get_window_extent(renderer)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def r1_ceiling(config, data_dir: str) -> float:
    """Best expected R@1 (%) on the eval split: a caption shared by k videos cannot tell them apart."""
    src = open_source(config.data.name, config.data.eval_split, data_dir, config.data.builder_config)
    captions = [c for caps in src.captions for c in caps]
    counts = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    return 100.0 * float(np.mean([1.0 / counts[c] for c in captions]))


def _header(config, rows, pre, ceiling) -> str:
    trained = next((r["num_seeds"] for r in rows if r["method"] != "zero_shot"), 1)
    spread = (f"Trained methods: mean ± std (sample std) over {trained} seeds, each seed its own adapter init "
              f"and data order, one backbone; zero-shot trains nothing (one number). " if trained > 1 else "")
    return (f"# Cross-Modal Adapter demo: synthetic text-video retrieval\n\n"
            f"Test split of `synthetic/{config.data.builder_config}` ({rows[0]['num_videos']} videos): "
            f"{config.data.num_frames} frames per video, head `{config.model.head}`. "
            f"Identical captions of different videos cap the expected R@1 at {ceiling:.1f}. "
            f"Backbone: a {pre['total_params']:,}-parameter CLIP pre-trained here on "
            f"`synthetic/{config.extra.pretrain.builder_config}` "
            f"(its val t2v R@1 {pre['val_metrics']['t2v']['R1']:.1f}). {spread}"
            f"Trained share: trained / all parameters, not the paper's shared width d_s (0 for uni-modal "
            f"adapters, {config.adapter.share_dim} for the Cross-Modal Adapter). "
            f"Step time: median train step on this machine; checkpoint: what each task stores beyond the "
            f"backbone (its Orbax params folder on disk, per-array metadata included).")


# ----------------------------------------------------------------------------- the table
def run(config, workdir: str, data_dir: str, backbone: str, pre: dict, t_start: float) -> dict:
    """Every method's row, then results.{md,json} and curves.png -> the results dict."""
    n = config.extra.seeds
    say(f"[3/3] adapting to the shifted task ({n} seed{'s' * (n > 1)} per method) and evaluating on its test split")
    tree, sets = stages.evaluators(config, data_dir, backbone,
                                   [config.data.eval_split, "val" if config.extra.eval_val else None])
    test_set, val_set = sets[config.data.eval_split], sets.get("val")
    rows = [method_row(config, m, workdir, data_dir, backbone, tree, test_set, val_set)
            for m in config.extra.methods]
    ceiling = r1_ceiling(config, data_dir)
    table = markdown_table(rows, _header(config, rows, pre, ceiling))
    results = {
        "dataset": f"synthetic/{config.data.builder_config}", "eval_split": config.data.eval_split,
        "r1_ceiling": ceiling, "backbone": backbone, "seeds": stages.seeds(config),
        "pretrain": {k: v for k, v in pre.items() if k not in ("config", "history")},
        "methods": {r["method"]: {k: v for k, v in r.items() if k != "histories"} for r in rows},
        "wall_seconds_this_run": time.time() - t_start, "machine": stages.machine(),
    }
    took = stages.write_results(os.path.join(workdir, "results.json"), results)
    write_atomic(os.path.join(workdir, "results.md"), table)
    plot_curves(pre["history"], rows, os.path.join(workdir, "curves.png"))
    figures = "curves.png"
    if any(r["method"] == "full" for r in rows):
        plot_efficiency(rows, os.path.join(workdir, "efficiency.png"))
        figures += ", efficiency.png"
    print("\n" + table, flush=True)
    say(f"written: {workdir}/results.md, results.json, {figures} ({took})")
    return results
