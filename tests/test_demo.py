"""The demo (configs/demo.py + cma_jax.demo): stage configs, error bars, the sweep's protocol and
report, and the quick variant end to end (it must learn: adapters far above zero-shot)."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cma_jax import demo, train
from cma_jax import loader
from cma_jax import run as run_lib
from cma_jax.demo import stages as demo_stages
from cma_jax.demo import sweep as demo_sweep
from cma_jax.demo import table as demo_table
from cma_jax.data import pipeline
from cma_jax.data.builders.synthetic import Synthetic
from cma_jax.models import peft
from configs import demo as demo_config


@pytest.mark.parametrize("arg", ["", "quick", "sweep", "sweep,width=128"])
def test_stage_configs_are_valid_and_differ_as_intended(arg):
    config = demo_config.get_config(arg)
    run_lib.check(config, num_devices=1)
    stages = {s: demo_stages.stage_config(config, s, "/data", "/bb") for s in
              ("pretrain", "pretrain_eval", "zero_shot", "uni", "cma", "full")}
    for s, c in stages.items():
        run_lib.check(c, num_devices=1)
        assert c.data.data_dir == "/data"
        assert c.data.tokenizer == os.path.join("/data", demo_stages.VOCAB_FILE)
    pre = stages["pretrain"]
    assert (pre.method, pre.mode, pre.backbone) == ("full", "train", "random")  # from scratch
    assert pre.model.train_logit_scale and pre.train.backbone_lr == pre.train.lr == config.extra.pretrain.lr
    assert pre.data.builder_config.startswith("pretrain") and pre.data.num_frames == 1
    assert stages["pretrain_eval"].mode == "eval" and stages["pretrain_eval"].data.eval_split == "val"
    assert (stages["zero_shot"].method, stages["zero_shot"].mode) == ("zero_shot", "eval")
    assert stages["uni"].method == "unimodal" and loader.method(stages["uni"]).share_dim == 0
    assert stages["cma"].adapter.share_dim == config.adapter.share_dim > 0
    assert stages["full"].method == "full" and stages["full"].train.backbone_lr == config.extra.full_lr
    for s in ("zero_shot", "uni", "cma", "full"):  # same starting point, same task, same test split
        c = stages[s]
        assert c.backbone == "/bb" and c.data.builder_config == config.data.builder_config
        assert c.data.eval_split == "test"
    assert config.model.clip.vision_width == config.model.clip.text_width == (128 if "width" in arg else 64)
    assert config.extra.seeds == (1 if arg == "quick" else 3)
    assert config.extra.task == ("sweep" if arg.startswith("sweep") else "table")


@pytest.mark.parametrize("arg", ["methods", "methods_quick", "methods_lr"])
def test_the_methods_variants_train_every_row_of_the_papers_table(arg):
    """A row per declared method, each a valid stage of its own method, with the demo's fields and learning rate
    for it as the method declares them."""
    config = demo_config.get_config(arg)
    run_lib.check(config, num_devices=1)
    assert list(config.extra.methods) == list(demo_stages.rows()) and len(config.extra.methods) == len(peft.METHODS)
    for stage in config.extra.methods:
        c = demo_stages.stage_config(config, stage, "/data", "/bb")
        run_lib.check(c, num_devices=1)
        method = loader.method(c)
        assert method.name == demo_stages.STAGE_METHOD.get(stage, stage)
        if stage in config.extra.lr:
            demo = peft.get(method.name).demo
            assert c.train.lr == config.extra.lr[stage] == demo.lr
            assert tuple(config.extra.lr_grid[stage]) == demo.lr_grid
            assert dict(config.extra.fields.get(stage, {})) == demo.fields
            for k, v in demo.fields.items():
                assert getattr(method, k) == v
        assert c.mode == ("eval" if stage == "zero_shot" else "train")
    # every caption keeps its words: 12 words + start and end tokens + a method's text prompts fit 16
    prompted = [demo_stages.stage_config(config, s, "/d", "/bb") for s in ("coop", "vl_prompt", "maple", "vop")]
    assert all(loader.method(c).extra_text_tokens() + 14 <= c.model.clip.context_length for c in prompted)
    assert config.extra.task == ("lr_search" if arg == "methods_lr" else "table")
    assert (config.extra.seeds, config.train.num_steps) == {"methods": (3, 300), "methods_quick": (1, 100),
                                                            "methods_lr": (1, 300)}[arg]


def test_seeds_vary_runs_but_not_the_pretraining():
    config = demo_config.get_config("")
    assert demo_stages.seeds(config) == [0, 1, 2]
    runs = [demo_stages.stage_config(config, "cma", "/data", "/bb", seed) for seed in demo_stages.seeds(config)]
    assert [c.seed for c in runs] == [0, 1, 2]  # adapter init and data order (pipeline seed)
    # The pre-training does not depend on adapter settings: the table and a variant with another r
    # share one backbone.
    other = demo_config.get_config("")
    other.adapter.reduction_dim = 4
    key = demo_stages.config_key
    pretrain = [demo_stages.stage_config(c, "pretrain", "/d") for c in (config, other)]
    assert key(pretrain[0]) == key(pretrain[1])
    assert key(runs[0]) != key(runs[1])


def test_bad_variant_width_and_method_are_named():
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        demo_config.get_config("fast")
    with pytest.raises(ValueError, match="bad option 'width=100'"):
        demo_config.get_config("sweep,width=100")
    config = demo_config.get_config("quick")
    config.extra.methods = ("cma", "no_such_method")
    with pytest.raises(ValueError, match="config.extra.methods: unknown \\['no_such_method'\\]"):
        demo.run(config, "/nonexistent/never/created")
    config = demo_config.get_config("quick")
    config.extra.seeds = 0
    with pytest.raises(ValueError, match="config.extra.seeds must be >= 1"):
        demo.run(config, "/nonexistent/never/created")


def test_mean_std_and_the_plus_minus_cells():
    assert demo_stages.mean_std([47.0, 48.0, 49.0]) == (48.0, 1.0)  # sample std (ddof = 1)
    assert demo_stages.mean_std([48.0]) == (48.0, 0.0)
    assert demo_stages.pm(48.63, 0.31, 3) == "48.6 ± 0.3" and demo_stages.pm(48.63, 0.0, 1) == "48.6"
    m = {d: {k: 0.0 for k in ("R1", "R5", "R10", "MdR", "MnR")} for d in ("t2v", "v2t")}
    runs = [{d: {**v, "R1": r1} for d, v in m.items()} for r1 in (47.0, 48.0, 49.0)]
    mean, std = demo_stages.metrics_mean_std(runs)
    assert mean["t2v"]["R1"] == 48.0 and std["t2v"]["R1"] == 1.0 and std["v2t"]["R5"] == 0.0
    row = {"name": "Cross-Modal Adapter", "metrics": mean, "metrics_std": std, "num_seeds": 3,
           "trainable_params": 15936, "trainable_percent": 6.59, "step_time_s": 0.077, "checkpoint_bytes": 2048}
    table = demo_table.markdown_table([row], "# t")
    assert "| Method | Trainable params | Trained share | t2v R@1 |" in table  # trained / all, not d_s
    assert "| Cross-Modal Adapter | 15,936 | 6.59 % | 48.0 ± 1.0 | 0.0 ± 0.0 |" in table
    assert "| 77 ms | 2.0 KiB |" in table


def test_sweep_steps_batches_and_data_follow_the_training_set_size():
    config = demo_config.get_config("sweep")
    assert list(config.extra.sweep.train_videos) == [30, 90, 300, 900, 3000]
    got = {}
    for n in config.extra.sweep.train_videos:
        c = demo_sweep.run_config(config, "full", n, 2, "/data", "/bb")
        run_lib.check(c, num_devices=1)
        got[n] = (c.data.builder_config, c.train.batch_size, c.train.num_steps, c.seed)
    # The table's 300 steps at every size (the checkpoint is chosen on val); the whole subset when it
    # is smaller than a batch.
    assert got == {30: ("adapt_train30", 30, 300, 2), 90: ("adapt_train90", 64, 300, 2),
                   300: ("adapt_train300", 64, 300, 2), 900: ("adapt_train900", 64, 300, 2),
                   3000: ("adapt", 64, 300, 2)}
    assert demo_sweep.builder_configs(config) == [v[0] for v in got.values()]


def _fake_run(method, n, seed, r1, last):
    metrics = {d: {"R1": r1, "R5": 0.0, "R10": 0.0, "MdR": 1.0, "MnR": 1.0} for d in ("t2v", "v2t")}
    final = {d: {**v, "R1": last} for d, v in metrics.items()}
    params = {"zero_shot": 0, "uni": 17024, "cma": 15936, "full": 225728}[method]
    rec = {"method": method, "name": demo_stages.rows()[method], "seed": seed, "metrics": metrics,
           "batch_size": min(64, n), "num_steps": 100, "trainable_params": params, "trainable_percent": 1.0,
           "step_time_s": None if method == "zero_shot" else 0.1, "history": [], "config": "{}"}
    if method != "zero_shot":
        rec["selection"] = {"best_step": 40, "val_t2v_R1": [], "final_metrics": final}
    return rec


def test_sweep_summary_pairs_seeds_and_writes_its_report(tmp_path):
    config = demo_config.get_config("sweep")
    config.extra.sweep.train_videos = (30, 3000)
    sizes, seeds = [30, 3000], [0, 1, 2]
    records = {"zero_shot": {30: [_fake_run("zero_shot", 30, 0, 1.0, 1.0)], 3000: []}}
    for m, base in (("uni", 20.0), ("cma", 22.0), ("full", 10.0)):
        records[m] = {n: [_fake_run(m, n, s, base + s + (n == 3000) * 30, base) for s in seeds] for n in sizes}
    records["cma"][30][2]["metrics"]["t2v"]["R1"] = 21.0  # CMA - uni per seed: 2, 2, -1
    res = demo_sweep.summarize(config, records, sizes, seeds)
    assert res["percent"] == [1.0, 100.0]
    cma30 = res["methods"]["cma"]["by_size"]["30"]
    assert cma30["t2v_R1"]["runs"] == [22.0, 23.0, 21.0] and cma30["last_step_t2v_R1"]["mean"] == 22.0
    assert res["methods"]["zero_shot"]["by_size"]["3000"]["t2v_R1"]["mean"] == 1.0  # one evaluation, flat
    assert res["sharing"]["30"]["t2v_R1"]["runs"] == [2.0, 2.0, -1.0]
    sharing = res["sharing"]["30"]["t2v_R1"]
    assert sharing["mean"] == 1.0 and sharing["std"] == pytest.approx(np.sqrt(3))
    assert res["methods"]["full"]["step_time_s"] == 0.1  # median at the full batch (64)
    res.update(test_videos=1000, wall_seconds_this_run=60.0, pretrain={"total_params": 225728},
               machine={"cpu": "a CPU", "cpu_count": 2})
    md = demo_sweep.markdown(res)
    assert "| Cross-Modal Adapter | 15,936 | 100 | 22.0 ± 1.0 | 53.0 ± 1.0 |" in md
    assert "| CMA − uni-modal (paired by seed) |  |  | 1.0 ± 1.7 |" in md
    demo_sweep.plot(res, str(tmp_path / "sweep.png"))
    with Image.open(tmp_path / "sweep.png") as png:
        assert png.size[0] > 1000 and png.size[1] > 300
    assert os.path.getsize(tmp_path / "sweep.png") < 200_000


def test_a_rerun_that_reuses_everything_keeps_the_wall_time_of_the_run_that_made_it(tmp_path):
    path = str(tmp_path / "results.json")
    made = {"methods": {"cma": {"t2v": 49.3}}, "wall_seconds_this_run": 430.0, "machine": {"cpu": "a"}}
    assert demo_stages.write_results(path, dict(made)) == "430s this run"
    again = {**made, "wall_seconds_this_run": 0.178, "machine": {"cpu": "b"}}
    assert demo_stages.write_results(path, again) == "every stage reused; 430s when they ran"
    assert json.load(open(path))["wall_seconds_this_run"] == again["wall_seconds_this_run"] == 430.0
    retrained = {**made, "methods": {"cma": {"t2v": 49.4}}, "wall_seconds_this_run": 120.0}
    assert demo_stages.write_results(path, retrained) == "120s this run"
    assert json.load(open(path))["wall_seconds_this_run"] == 120.0


def test_building_the_data_says_what_it_builds_without_tfds_download_wording(tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING)
    demo_stages.prepare_data(str(tmp_path), ["pretrain_mini"])
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "  synthetic/pretrain_mini: generating 384 videos and their captions"
    assert out.splitlines()[-1].startswith("  synthetic/pretrain_mini: built (train 256, val 64, test 64 videos) in ")
    for tfds_words in ("Downloading and preparing", "downloaded and prepared", "Shuffling", "Generating splits"):
        assert tfds_words not in out + err
    assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]
    demo_stages.prepare_data(str(tmp_path), ["pretrain_mini"])
    assert capsys.readouterr().out.startswith("  synthetic/pretrain_mini: already built in ")


def test_help_exits_0():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "cma_jax.demo", "--help"], capture_output=True, text=True, cwd=root,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "--workdir: Folder for the demo's data, runs and results." in p.stdout


class _InterruptAfter:
    """A training iterator that raises KeyboardInterrupt (a Ctrl-C) before batch `n`."""

    def __init__(self, it, n):
        self.it, self.n, self.seen = it, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.seen == self.n:
            raise KeyboardInterrupt
        self.seen += 1
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def _check_results(workdir, config):
    res = json.load(open(os.path.join(workdir, "results.json")))
    rows = res["methods"]
    assert list(rows) == ["zero_shot", "uni", "cma", "full"]
    num_videos = next(c for c in Synthetic.BUILDER_CONFIGS if c.name == config.data.builder_config).num_test
    for r in rows.values():
        assert len(r["seeds"]) == r["num_seeds"] == 1  # quick: one seed; every seed's numbers are kept
        assert r["seeds"][0]["metrics"] == r["metrics"] and r["metrics_std"]["t2v"]["R1"] == 0.0
        for d in ("t2v", "v2t"):
            m = r["metrics"][d]
            assert 0 <= m["R1"] <= m["R5"] <= m["R10"] <= 100
            assert 1 <= m["MdR"] <= num_videos and 1 <= m["MnR"] <= num_videos
    zs, uni, cma, full = (rows[k] for k in ("zero_shot", "uni", "cma", "full"))
    # Parameters: CMA shares part of the up-projection, so it trains fewer than uni-modal adapters.
    assert zs["trainable_params"] == 0 < cma["trainable_params"] < uni["trainable_params"] < full["trainable_params"]
    assert cma["trainable_percent"] < 10 and full["trainable_percent"] > 99
    assert 0 < cma["checkpoint_bytes"] < full["checkpoint_bytes"] and zs["checkpoint_bytes"] == 0
    assert all(r["step_time_s"] > 0 for r in (uni, cma, full)) and zs["step_time_s"] is None
    # The quick run learns: every trained method is far above zero-shot (near chance on the shifted task).
    for r in (uni, cma, full):
        assert r["metrics"]["t2v"]["R1"] >= zs["metrics"]["t2v"]["R1"] + 10, (r["name"], r["metrics"], zs["metrics"])
        for d in ("t2v", "v2t"):
            assert r["metrics"][d]["MnR"] < zs["metrics"][d]["MnR"]
    # The backbone learned its own (pre-training) task well above chance (R@10 = 10/64 by chance).
    assert res["pretrain"]["val_metrics"]["t2v"]["R10"] > 30
    assert res["wall_seconds_this_run"] > 0 and res["machine"]["cpu_count"] >= 1
    table = open(os.path.join(workdir, "results.md")).read()
    for method in config.extra.methods:
        assert demo_stages.rows()[method] in table
    with Image.open(os.path.join(workdir, "curves.png")) as png:
        assert png.size[0] > 400 and png.size[1] > 200
    return res


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """configs/demo.py:quick run three times in one workdir: Ctrl-C in the middle of the Cross-Modal Adapter's
    training, the same command again (it resumes), and once more with every stage done -> what each run left.
    (The all-methods test starts from its data and pre-trained backbone: the same stages as `:methods_quick`.)"""
    config = demo_config.get_config("quick")
    root = tmp_path_factory.mktemp("quick")
    workdir = str(root / "demo")
    cma_dir = os.path.join(workdir, "runs", "cma", "seed0")
    uni_record = os.path.join(workdir, "runs", "uni", "seed0", demo_stages.RECORD)
    seen = {"config": config, "workdir": workdir}

    # Run 1: Ctrl-C in the middle of the CMA training.
    real_iterator = pipeline.train_iterator_from_config

    def interrupting(cfg, *args, **kwargs):
        it = real_iterator(cfg, *args, **kwargs)
        return _InterruptAfter(it, 7) if cfg.method == "cma" and cfg.adapter.share_dim > 0 else it

    logged = []
    records = logging.Handler()
    records.emit = logged.append
    logging.getLogger().addHandler(records)
    try:
        with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit, match="130"):
            mp.setattr(pipeline, "train_iterator_from_config", interrupting)
            demo.run(config, workdir)
    finally:
        logging.getLogger().removeHandler(records)
    seen["run1"] = {
        "messages": [r.getMessage() for r in logged], "backbone": os.path.isdir(os.path.join(workdir, "backbone")),
        "uni_record": os.path.exists(uni_record), "cma_record": os.path.exists(os.path.join(cma_dir, demo_stages.RECORD)),
        "cma_checkpoints": os.listdir(os.path.join(cma_dir, "checkpoints")),
        "results": os.path.exists(os.path.join(workdir, "results.json")), "uni_mtime": os.path.getmtime(uni_record)}

    # Run 2: resumes CMA from step 7, reuses data, backbone and the uni-modal run.
    demo.run(config, workdir)
    seen["run2"] = str(root / "run2")  # what it wrote, kept before run 3 writes again
    os.makedirs(seen["run2"])
    for name in ("results.json", "results.md", "curves.png"):
        shutil.copy(os.path.join(workdir, name), seen["run2"])
    seen["uni_mtime"] = os.path.getmtime(uni_record)
    seen["cma_history"] = [h["step"] for h in train.read_history(cma_dir)]
    seen["cma_record_first_step"] = json.load(open(os.path.join(cma_dir, demo_stages.RECORD)))["history"][0]["step"]

    # Run 3: everything is done: nothing trains, the table is rebuilt from the saved records.
    def no_training(*a, **k):
        raise AssertionError("a finished demo trained again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train", no_training)
        demo.run(config, workdir)
    return seen


@pytest.mark.slow
def test_quick_demo_learns_and_survives_interrupt_resume_reuse(quick_demo):
    config, workdir, run1 = quick_demo["config"], quick_demo["workdir"], quick_demo["run1"]
    assert run1["backbone"]
    # It pre-trains a random CLIP on purpose: no warning about a forgotten backbone.
    assert not [m for m in run1["messages"] if m.startswith("config.backbone=random")]
    assert run1["uni_record"] and not run1["cma_record"]
    assert run1["cma_checkpoints"] == ["7"]  # saved on Ctrl-C
    assert not run1["results"]

    first = _check_results(quick_demo["run2"], config)
    assert quick_demo["uni_mtime"] == run1["uni_mtime"]  # run 2 reused the uni-modal run
    # The curve is whole: steps 1-7 from the interrupted run, 8 on from the resumed one.
    assert quick_demo["cma_history"] == list(range(1, config.train.num_steps + 1))
    assert quick_demo["cma_record_first_step"] == 1

    second = _check_results(workdir, config)  # run 3: rebuilt from the saved records
    assert second["methods"] == first["methods"]
    assert second["wall_seconds_this_run"] == first["wall_seconds_this_run"]  # of the run that trained


def test_a_workdir_made_with_another_config_is_refused(tmp_path):
    config = demo_config.get_config("quick")
    os.makedirs(tmp_path / "pretrain")
    (tmp_path / "pretrain" / "demo_stage_config.json").write_text(json.dumps({"config": "{}"}))
    with pytest.raises(ValueError, match="made with a different configuration; use another --workdir"):
        demo.run(config, str(tmp_path))
    assert not (tmp_path / "backbone").exists()


@pytest.mark.slow
def test_every_method_trains_on_the_quick_demo_and_the_figure_is_drawn(quick_demo, tmp_path):
    """configs/demo.py:methods_quick end to end: a row per method, each trained method's loss goes down, its
    trained-parameter count is its formula's on the demo's CLIP, and the efficiency figure is written. It starts
    from :quick's data and pre-trained backbone and reuses them (the same stage configs)."""
    config = demo_config.get_config("methods_quick")
    workdir = str(tmp_path / "demo")
    for stage in ("data", "pretrain", "backbone"):
        shutil.copytree(os.path.join(quick_demo["workdir"], stage), os.path.join(workdir, stage))
    res = demo.run(config, workdir)
    summary = json.load(open(os.path.join(quick_demo["workdir"], "pretrain", "demo_summary.json")))
    assert res["pretrain"]["val_metrics"] == summary["val_metrics"]  # reused, not trained again
    rows = res["methods"]
    assert list(rows) == list(demo_stages.rows())
    clip = loader.clip_config(config)
    for stage, r in rows.items():
        name = demo_stages.STAGE_METHOD.get(stage, stage)
        run = r["seeds"][0]
        if name == "zero_shot":
            assert run["num_steps"] == 0 and r["trainable_params"] == 0
            continue
        c = demo_stages.stage_config(config, stage, "/d", "/bb")
        assert r["trainable_params"] == loader.method(c).count(clip), stage
        record = demo_stages.read_json(os.path.join(workdir, "runs", stage, "seed0", demo_stages.RECORD))
        loss = [h["loss"] for h in record["history"]]
        assert len(loss) == 100 and np.isfinite(loss).all(), stage
        assert np.mean(loss[-10:]) < np.mean(loss[:10]), stage  # it learned something
        assert 0 < r["step_time_s"] and peft.get(name).label
    assert rows["cma"]["metrics"]["t2v"]["R1"] >= rows["zero_shot"]["metrics"]["t2v"]["R1"] + 5
    with Image.open(os.path.join(workdir, "efficiency.png")) as png:
        assert png.size[0] > 400 and png.size[1] > 200
    # The API takes any method's run as it takes the Cross-Modal Adapter's: VoP (frame-aware prompts) here.
    from cma_jax import api

    r = api.load(os.path.join(workdir, "backbone"), os.path.join(workdir, "runs", "vop", "seed0"))
    assert r.model.clip.method.name == "vop" and r.step == config.train.num_steps
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 32, 32, 3), dtype=np.uint8)
    sim = r.similarity(r.encode_text(["a plain square coloured emerald , tiny , top , over grey"]),
                       *r.encode_videos([frames[0], frames[1]]))
    assert sim.shape == (1, 2) and np.isfinite(sim).all()


def test_efficiency_labels_stay_inside_the_frame_and_clear_of_each_other_and_the_points():
    """The README's `:methods` run: the two adapters side by side, full fine-tuning at the right edge (x = 1),
    prompts bunched at the bottom; and the same with the adapters' step times swapped (another machine)."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - the demo imports it only to draw

    at = {"full": ("Full fine-tuning", 93, 63.5, 0.4), "partial": ("Partial", 63, 60.7, 1.2),
          "projection": ("Projection", 22, 31.6, 0.9), "coop": ("CoOp", 28, 4.2, 0.8), "vpt": ("VPT", 76, 1.0, 0.2),
          "vl_prompt": ("VL-Prompt", 81, 10.6, 2.3), "maple": ("MaPLe", 76, 9.2, 0.9), "vop": ("VoP", 94, 17.3, 0.2),
          "adapter_attn": ("Adapter-ATTN", 64, 41.2, 1.1), "adaptformer": ("AdaptFormer", 55, 44.7, 3.1),
          "st_adapter": ("ST-Adapter", 69, 6.2, 0.6), "uni": ("Uni-modal adapters (d_s=0)", 70, 49.5, 0.6),
          "cma": ("Cross-Modal Adapter", 72, 49.3, 1.3)}
    default = {k: at[k] for k in ("uni", "cma", "full")}  # the default demo's rows on an Intel Xeon
    default.update(uni=default["uni"][:1] + (61, 49.3, 0.7), cma=default["cma"][:1] + (82, 49.1, 1.3),
                   full=default["full"][:1] + (138, 63.1, 0.6))
    swapped = dict(at, uni=at["uni"][:1] + (73, 49.5, 0.6), cma=at["cma"][:1] + (70, 49.3, 1.3))
    for layout in (at, swapped, default):
        rows = [{"method": m, "name": name, "step_time_s": ms / 1000, "metrics": {"t2v": {"R1": r1}},
                 "metrics_std": {"t2v": {"R1": std}}} for m, (name, ms, r1, std) in layout.items()]
        _check_efficiency_labels(demo_table.efficiency_figure(rows), [r["name"] for r in rows])
        plt.close("all")


def _check_efficiency_labels(fig, names):
    from matplotlib.collections import LineCollection  # noqa: PLC0415
    from matplotlib.transforms import Bbox  # noqa: PLC0415

    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    marks = [a.get_window_extent(renderer) for c in ax.containers for a in c.get_children()
             if not isinstance(a, LineCollection)]  # markers and caps
    for bars in (a for c in ax.containers for a in c.get_children() if isinstance(a, LineCollection)):
        ends = ax.transData.transform(np.concatenate(bars.get_segments()))  # an error bar's line, ~1.5 px wide
        marks.append(Bbox.from_extents(ends[:, 0].min() - 0.75, ends[:, 1].min(), ends[:, 0].max() + 0.75,
                                       ends[:, 1].max()))
    frame = ax.get_window_extent(renderer)
    assert [t.get_text() for t in ax.texts] == names
    for i, box in enumerate(labels):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        assert all(demo_table._overlap(box, other) == 0 for other in labels[:i] + labels[i + 1:] + marks)
