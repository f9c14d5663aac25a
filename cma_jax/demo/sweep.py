"""The demo's training-set-size sweep (`configs/demo.py:sweep`): where adapters win, and whether sharing helps.

From the demo's one pre-trained backbone, every method of `extra.methods` trains on the first N training
videos of `adapt`, for each N of `extra.sweep.train_videos`, with `extra.seeds` seeds and one protocol for
every method (the table's step budget at every N, the checkpoint chosen on val); test t2v R@1 against N
goes to `sweep.png`, `sweep.md` and `sweep.json`, and whether sharing helps is the paired (same seed)
difference of Cross-Modal and uni-modal adapters. docs/demo.md ("Training-set-size sweep") has the
protocol, why the steps are not scaled with N, and the results.
"""

from __future__ import annotations

import os
import time

import numpy as np

from cma_jax.demo import stages
from cma_jax.data.builders import synthetic
from cma_jax.files import write_atomic

COLOURS = {"zero_shot": "0.45", "uni": "tab:blue", "cma": "tab:red", "full": "tab:green"}


def builder_configs(config) -> list[str]:
    """The synthetic builder configs of the sweep's training sets."""
    return [synthetic.adapt_train_config(n) for n in config.extra.sweep.train_videos]


def run_config(config, method: str, num_videos: int, seed: int, data_dir: str, backbone: str):
    """The stage config of one sweep run: the table's, on the first num_videos training videos."""
    cfg = stages.stage_config(config, method, data_dir, backbone, seed)
    cfg.data.builder_config = synthetic.adapt_train_config(num_videos)
    cfg.train.batch_size = min(config.train.batch_size, num_videos)
    return cfg


# ----------------------------------------------------------------------------- runs
def run(config, workdir: str, data_dir: str, backbone: str, pre: dict, t_start: float) -> dict:
    """Every (seed, N, method) run, then sweep.{json,md,png} -> the sweep's results."""
    stages.say(f"[3/3] training-set-size sweep: {len(config.extra.sweep.train_videos)} sizes x "
               f"{config.extra.seeds} seeds, evaluated on the test split")
    sizes = sorted(config.extra.sweep.train_videos)
    base = stages.stage_config(config, "zero_shot", data_dir, backbone)  # val and test of `adapt`
    tree, sets = stages.evaluators(config, data_dir, backbone, ["test", "val"])
    test_set, val_set = sets["test"], sets["val"]
    records = {m: {n: [] for n in sizes} for m in config.extra.methods}
    seeds = stages.seeds(config)
    for i, seed in enumerate(seeds):
        for n in sizes:
            for method in config.extra.methods:
                if method == "zero_shot":
                    if i or n != sizes[0]:
                        continue  # trains on nothing: one evaluation
                    cfg, run_dir = base, os.path.join(workdir, "sweep", method)
                else:
                    cfg = run_config(config, method, n, seed, data_dir, backbone)
                    run_dir = os.path.join(workdir, "sweep", method, f"n{n}", f"seed{seed}")
                reused = os.path.exists(os.path.join(run_dir, stages.RECORD))
                t0 = time.time()
                rec = stages.train_and_test(cfg, method, run_dir, tree, test_set, val_set,
                                            val_checks=config.extra.sweep.val_checks)
                records[method][n].append(rec)
                sel = rec.get("selection")
                chosen = f", val chose step {sel['best_step']}/{rec['num_steps']}" if sel else ""
                took = "reused" if reused else f"{time.time() - t0:.0f}s"
                stages.say(f"  seed {seed} ({i + 1}/{len(seeds)}) N={n:<5d} {stages.rows()[method]}: test t2v R@1 "
                           f"{rec['metrics']['t2v']['R1']:.1f}{chosen} ({took})")
    results = summarize(config, records, sizes, seeds)
    results.update(backbone=backbone, pretrain={k: v for k, v in pre.items() if k not in ("config", "history")},
                   test_videos=test_set.num_videos, wall_seconds_this_run=time.time() - t_start,
                   machine=stages.machine())
    took = stages.write_results(os.path.join(workdir, "sweep.json"), results)
    table = markdown(results)
    write_atomic(os.path.join(workdir, "sweep.md"), table)
    plot(results, os.path.join(workdir, "sweep.png"))
    print("\n" + table, flush=True)
    stages.say(f"written: {workdir}/sweep.md, sweep.json, sweep.png ({took})")
    return results


# ----------------------------------------------------------------------------- summary
def _stats(values) -> dict:
    mean, std = stages.mean_std(values)
    return {"mean": mean, "std": std, "runs": [float(v) for v in values]}


def summarize(config, records: dict, sizes: list[int], seeds: list[int]) -> dict:
    """Per method and N: test t2v R@1 (val-chosen and last step) over seeds; paired CMA - uni."""
    out = {"train_videos": sizes, "percent": [100.0 * n / synthetic.ADAPT_TRAIN_VIDEOS for n in sizes],
           "seeds": seeds, "methods": {},
           "protocol": {**config.extra.sweep.to_dict(), "batch_size": config.train.batch_size,
                        "num_steps": config.train.num_steps}}
    for method, by_size in records.items():
        runs = [r for rs in by_size.values() for r in rs]
        full_batch = [r["step_time_s"] for r in runs if r["step_time_s"] and r["batch_size"] == config.train.batch_size]
        entry = {"name": stages.rows()[method], "trainable_params": runs[0]["trainable_params"],
                 "trainable_percent": runs[0]["trainable_percent"],
                 "step_time_s": float(np.median(full_batch)) if full_batch else None, "by_size": {}}
        for n in sizes:
            rs = by_size[n] or by_size[sizes[0]]  # zero-shot: the one evaluation holds for every N
            final = [r.get("selection", {}).get("final_metrics", r["metrics"]) for r in rs]
            entry["by_size"][str(n)] = {
                "batch_size": rs[0]["batch_size"], "num_steps": rs[0]["num_steps"],
                "t2v_R1": _stats([r["metrics"]["t2v"]["R1"] for r in rs]),
                "v2t_R1": _stats([r["metrics"]["v2t"]["R1"] for r in rs]),
                "last_step_t2v_R1": _stats([m["t2v"]["R1"] for m in final]),
                "best_val_step": [r.get("selection", {}).get("best_step") for r in rs],
                "runs": [{k: v for k, v in r.items() if k not in ("config", "history")} for r in rs],
            }
        out["methods"][method] = entry
    if "cma" in records and "uni" in records:  # same seed, same data order: a paired difference
        out["sharing"] = {}
        for n in sizes:
            cma, uni = (out["methods"][m]["by_size"][str(n)] for m in ("cma", "uni"))
            out["sharing"][str(n)] = {key: _stats(np.subtract(cma[key]["runs"], uni[key]["runs"]))
                                      for key in ("t2v_R1", "last_step_t2v_R1")}
    return out


def _size_label(results, i: int) -> str:
    return f"{results['train_videos'][i]:,} ({results['percent'][i]:g} %)"


def _legend(entry) -> str:
    step = f", {1000 * entry['step_time_s']:.0f} ms/step" if entry["step_time_s"] else ""
    return f"{entry['name']} ({entry['trainable_params']:,} trained{step})"


def markdown(results: dict) -> str:
    """sweep.md: test t2v R@1 per method and training-set size (val-chosen step and last step)."""
    sizes, n = results["train_videos"], len(results["seeds"])
    cols = ["Method", "Trained params", "ms/step"] + [_size_label(results, i) for i in range(len(sizes))]
    p = results["protocol"]
    lines = [f"# Training-set-size sweep: test t2v R@1 (mean ± std over {n} seeds) vs training videos", "",
             f"Test split: {results['test_videos']} videos of `synthetic/adapt`. Batch min({p['batch_size']}, N), "
             f"{p['num_steps']} steps at every N; val t2v R@1 checked {p['val_checks']} times per run. "
             f"Step time: median at the full batch on this machine ({results['machine']['cpu']}, "
             f"{results['machine']['cpu_count']} cores), which follows its load. Wall time of this run: "
             f"{results['wall_seconds_this_run'] / 60:.1f} min.", ""]
    for title, key in (("Checkpoint chosen on val (early stopping)", "t2v_R1"),
                       ("Last step (no early stopping)", "last_step_t2v_R1")):
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for entry in results["methods"].values():
            step = f"{1000 * entry['step_time_s']:.0f}" if entry["step_time_s"] else "-"
            runs = len(entry["by_size"][str(sizes[0])][key]["runs"])
            cells = [stages.pm(s[key]["mean"], s[key]["std"], runs) for s in
                     (entry["by_size"][str(k)] for k in sizes)]
            lines.append("| " + " | ".join([entry["name"], f"{entry['trainable_params']:,}", step, *cells]) + " |")
        if "sharing" in results:
            cells = [stages.pm(results["sharing"][str(k)][key]["mean"], results["sharing"][str(k)][key]["std"], n)
                     for k in sizes]
            lines.append("| " + " | ".join(["CMA − uni-modal (paired by seed)", "", "", *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """sweep.png: test t2v R@1 vs N (val-chosen step, last step) with std bands; the CMA - uni difference."""
    import matplotlib  # heavy: only when the plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [str(n) for n in results["train_videos"]]
    x = np.asarray(results["train_videos"], float)

    def series(by_size, key):  # mean, std over seeds at every N
        return (np.asarray([by_size[k][key]["mean"] for k in keys]), np.asarray([by_size[k][key]["std"] for k in keys]))

    sharing = "sharing" in results
    fig, axes = plt.subplots(1, 3 if sharing else 2, figsize=(16 if sharing else 11, 4.6),
                             gridspec_kw={"width_ratios": [1.25, 1.0, 0.8][:3 if sharing else 2]})
    axes[1].sharey(axes[0])  # the same scale: how much stopping on val saves is read across
    for ax, key, title in ((axes[0], "t2v_R1", "checkpoint chosen on val (early stopping)"),
                           (axes[1], "last_step_t2v_R1", "last step (no early stopping)")):
        for method, entry in results["methods"].items():
            mean, std = series(entry["by_size"], key)
            colour = COLOURS.get(method)
            if method == "zero_shot":
                ax.plot(x, mean, "--", color=colour, label=_legend(entry))
                continue
            ax.plot(x, mean, "o-", ms=4, color=colour, label=_legend(entry))
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
        ax.set_title(f"test t2v R@1, {title}", fontsize=10)
        ax.set_ylabel("t2v R@1 (%)")
    if sharing:
        for key, fmt, colour, shift, label in (("t2v_R1", "o-", "tab:red", 0.97, "checkpoint chosen on val"),
                                               ("last_step_t2v_R1", "s--", "tab:purple", 1.03, "last step")):
            mean, std = series(results["sharing"], key)  # nudged apart on x so the bars do not overlap
            axes[2].errorbar(x * shift, mean, yerr=std, fmt=fmt, ms=4, capsize=3, color=colour, label=label)
        axes[2].axhline(0.0, color="0.3", lw=0.8)
        axes[2].set_title("does sharing help? CMA − uni-modal (same seed)", fontsize=10)
        axes[2].set_ylabel("difference in t2v R@1 (points)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([_size_label(results, i).replace(" (", "\n(") for i in range(len(x))], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("training videos (log scale)")
        ax.grid(alpha=0.3)
    for ax in axes[::2]:  # the middle panel has the first one's lines
        ax.legend(fontsize=7)
    fig.suptitle(f"Synthetic adapt task, {len(results['seeds'])} seeds (mean, band / bars = ± std); "
                 f"backbone {results['pretrain']['total_params']:,} parameters", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
