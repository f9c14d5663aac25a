"""The learning rates of the ten baselines, chosen on val: each method of `extra.methods` that has an
`extra.lr_grid` entry trained once per rate (one seed, the table's steps), scored by val t2v R@1
-> lr_search.md / lr_search.json (`configs/demo.py:methods_lr`; `extra.lr` holds what it chose)."""

from __future__ import annotations

import os
import time

from cma_jax.demo import stages
from cma_jax.demo.stages import rows, say
from cma_jax.files import write_atomic


def run(config, workdir: str, data_dir: str, backbone: str, pre: dict, t_start: float) -> dict:
    """Every (method, learning rate) run on val -> {method: {runs, best_lr}}, also written as md / json."""
    methods = [m for m in config.extra.methods if m in config.extra.lr_grid]
    say(f"[3/3] choosing the learning rate of {len(methods)} methods on the val split (seed {config.seed})")
    tree, sets = stages.evaluators(config, data_dir, backbone, ["val"])
    val_set = sets["val"]
    results = {}
    for method in methods:
        runs = []
        for lr in config.extra.lr_grid[method]:
            cfg = stages.stage_config(config, method, data_dir, backbone, config.seed)
            cfg.train.lr = lr
            run_dir = os.path.join(workdir, "lr_search", method, f"lr{lr:g}")
            rec = stages.train_and_test(cfg, method, run_dir, tree, val_set, test_name="val")
            m = rec["metrics"]
            runs.append({"lr": lr, "val_t2v_R1": m["t2v"]["R1"], "val_v2t_R1": m["v2t"]["R1"],
                         "final_loss": rec["history"][-1]["loss"]})
            say(f"  {rows()[method]}, lr {lr:g}: val t2v R@1 {m['t2v']['R1']:.1f}, v2t R@1 {m['v2t']['R1']:.1f}")
        best = max(runs, key=lambda r: (r["val_t2v_R1"], r["val_v2t_R1"]))  # ties: the better v2t
        results[method] = {"runs": runs, "best_lr": best["lr"], "in_config": config.extra.lr[method]}
    out = {"methods": results, "seed": config.seed, "num_steps": config.train.num_steps,
           "wall_seconds_this_run": time.time() - t_start, "machine": stages.machine()}
    took = stages.write_results(os.path.join(workdir, "lr_search.json"), out)
    write_atomic(os.path.join(workdir, "lr_search.md"), markdown(out))
    print("\n" + markdown(out), flush=True)
    say(f"written: {workdir}/lr_search.md, lr_search.json ({took})")
    return out


def markdown(out: dict) -> str:
    lines = [f"# Learning rates on val ({out['num_steps']} steps, seed {out['seed']})", "",
             "| method | learning rate: val t2v R@1 (v2t R@1) | best | in the demo's config |", "|---|---|---|---|"]
    for method, r in out["methods"].items():
        cells = ", ".join(f"{x['lr']:g}: {x['val_t2v_R1']:.1f} ({x['val_v2t_R1']:.1f})" for x in r["runs"])
        lines.append(f"| {rows()[method]} | {cells} | {r['best_lr']:g} | {r['in_config']:g} |")
    return "\n".join(lines) + "\n"
