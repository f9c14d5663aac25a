"""python -m cma_jax.convert import SRC OUT_DIR [--adapters_out DIR] [--text_heads N] [--overwrite]
python -m cma_jax.convert export ADAPTERS_DIR OUT.pth [--backbone DIR]
python -m cma_jax.convert merge RUN_OR_ADAPTERS OUT_DIR --backbone SPEC [--overwrite]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
from flax import nnx

from cma_jax import checkpoint, loader
from cma_jax.convert.mapping import convert_checkpoint, export_adapters
from cma_jax.errors import CheckpointError
from cma_jax.models import state
from cma_jax.models.clip import CLIPConfig
from cma_jax.models.peft.adapter import AdapterConfig, AdapterParam
from cma_jax.models.retrieval import RetrievalModel


def _abstract_model(clip_cfg: CLIPConfig, adapter_cfg: AdapterConfig) -> RetrievalModel:
    """Shapes only (no memory for the backbone): a vessel for the adapters being converted."""
    return nnx.eval_shape(lambda: RetrievalModel(clip_cfg, adapter_cfg, rngs=nnx.Rngs(0)))


def merge(adapters: str, out: str, backbone: loader.Backbone, overwrite: bool = False) -> None:
    """Write backbone folder `out`: `backbone` with the trained parameters of `adapters` folded into its weights
    (the method's `merge`: LoRA's updates; the tuned weights of partial / projection / full), its tokenizer kept."""
    model, _ = loader.build_model(backbone=backbone, adapters=adapters)
    model.clip.method.merge(model.clip)
    tokenizer = [os.path.join(backbone.tokenizer, f) for f in sorted(os.listdir(backbone.tokenizer))
                 ] if backbone.tokenizer else ()
    checkpoint.save_backbone(out, model.clip.config, jax.device_get(state.backbone_state(model)), tokenizer, overwrite)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cma_jax.convert", description="PyTorch CLIP / Cross-Modal-Adapter "
                                "checkpoints <-> cma_jax backbone and adapter folders.")
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="PyTorch checkpoint -> read-only Orbax backbone (+ adapters)")
    imp.add_argument("src", help="OpenAI .pt / state dict, Hugging Face CLIPModel folder, or CMA checkpoint")
    imp.add_argument("out", help="backbone checkpoint folder to create")
    imp.add_argument("--adapters_out", help="folder for the adapters of a Cross-Modal-Adapter checkpoint")
    imp.add_argument("--text_heads", type=int, help="text attention heads (default: width // 64, as OpenAI)")
    imp.add_argument("--activation", default="quick_gelu", help="adapter activation (not stored in CMA files)")
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="adapters (run workdir or adapter folder) -> the original repo's format")
    exp.add_argument("adapters", help="folder written by `import --adapters_out`, or a run workdir")
    exp.add_argument("out", help="output .pth file")
    exp.add_argument("--backbone", help="also include this backbone's tensors (a full CLIP4Clip dict)")
    mer = sub.add_parser("merge", help="a run (or adapter folder) of lora, partial, projection or full, folded into "
                         "its backbone -> a backbone folder that evaluates as the run's model at plain CLIP's cost")
    mer.add_argument("adapters", help="a run workdir, its checkpoints/ folder or an adapter folder")
    mer.add_argument("out", help="backbone folder to create")
    mer.add_argument("--backbone", required=True, help="the backbone the run trained from (anything "
                     "config.backbone takes: a folder, ViT-B/32, a Hugging Face id, a .pt file)")
    mer.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        _run(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        p.exit(1, f"error: {e}\n")


def _run(args) -> None:
    if args.cmd == "import":
        overrides = {"text_heads": args.text_heads} if args.text_heads else {}
        conv = convert_checkpoint(args.src, **overrides)
        checkpoint.save_backbone(args.out, conv.clip_config, conv.backbone, conv.tokenizer_files, args.overwrite)
        print(f"backbone {conv.clip_config} -> {args.out}")
        if conv.tokenizer_files:
            print(f"tokenizer files -> {os.path.join(args.out, checkpoint.TOKENIZER_DIR)}")
        if conv.ignored:
            print(f"ignored {len(conv.ignored)} CLIP4Clip head tensors: {', '.join(conv.ignored)}")
        if conv.adapters is not None:
            acfg = dataclasses.replace(conv.adapter_config, activation=args.activation)
            if args.adapters_out:
                model = _abstract_model(conv.clip_config, acfg)
                state.apply_state(model, conv.adapters)
                checkpoint.save_adapters(args.adapters_out, model, args.overwrite)
                print(f"adapters {acfg} -> {args.adapters_out}")
            else:
                print("the checkpoint has adapters; pass --adapters_out DIR to keep them")
        return
    if args.cmd == "merge":
        merge(args.adapters, args.out, loader.resolve(args.backbone), args.overwrite)
        print(f"{args.adapters} folded into {args.backbone} -> {args.out}")
        return
    meta = checkpoint.saved_meta(args.adapters)
    method = checkpoint.method_of(meta)
    if not isinstance(method, AdapterConfig):  # only the original's own adapters have its format
        raise CheckpointError(f"{args.adapters}: holds no Cross-Modal Adapters (method={method.name!r}); only "
                              "they export to the original repo's format")
    cfg = CLIPConfig(**meta["clip"])
    model = _abstract_model(cfg, method)
    checkpoint.load_adapters(args.adapters, model)
    backbone = None
    if args.backbone:
        bcfg, backbone = checkpoint.load_backbone(args.backbone)
        if not bcfg.same_architecture(cfg):
            raise CheckpointError(f"{args.backbone}: its architecture {bcfg} differs from the adapters' {cfg}")
    export_adapters(args.out, nnx.to_pure_dict(nnx.state(model, AdapterParam)), cfg, backbone)
    print(f"adapters -> {args.out}")


if __name__ == "__main__":
    main()
