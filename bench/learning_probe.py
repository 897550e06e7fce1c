"""Does the quickstart's tiny model learn? One version's training, in-process, on a built
workspace's mixture, with the knobs issue 14 §2 asks about: the tiny model's init std, a scale
on its lm_head (the logit range LoRA can reach), learning rate, steps, LoRA rank, 4-bit or not.

    python bench/learning_probe.py --workspace quickstart --version v1 --init 0.02 \
        --head-scale 5 --lr 0.05 --steps 30 --rank 8

    python bench/learning_probe.py --workspace quickstart --base quickstart/models/base \
        --version v1 --lr 5e-3 --epochs 4 --batch 2

Prints the logged training losses, last/first, trl's dev loss after training and the dev
answer loss of the version and of the base (adapter off) on the same 4-bit model (the numbers
in bench/RESULTS.md, "Tiny model learning probe" and "A tiny base that learns"). Without
``--base`` a random base is built in a temp dir from the workspace's params (Qwen2's tokenizer,
rebuilt offline); ``--base`` takes a built one (e.g. the quickstart's pretrained base). Nothing
in the workspace is written.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=str(ROOT / "quickstart"))
    parser.add_argument("--version", default="v1")
    parser.add_argument("--init", type=float, default=0.02, help="initializer_range of the tiny model")
    parser.add_argument("--head-scale", type=float, default=1.0, help="lm_head weights × this")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--base", help="a built base directory (e.g. the workspace's models/base, "
                                       "pretrained) instead of a random one built here")
    parser.add_argument("--epochs", type=float, help="train epochs instead of --steps")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--logging", type=int, default=None, help="logging_steps (default steps/10)")
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="sft.bf16 false, 4-bit compute in float32")
    args = parser.parse_args()

    import torch
    import yaml

    from stages.base_model import build_qwen2_tokenizer, build_tiny_model, save_base, tiny_model_kwargs, TinyModelSpec
    from stages.common.io import read_records
    from stages.train import (attach_adapter, build_trainer, load_base_model, read_base_info,
                              resolve_train, split_examples)

    torch.set_num_threads(2)
    ws = Path(args.workspace)
    params = yaml.safe_load((ws / "params.yaml").read_text(encoding="utf-8"))
    if args.base:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.base)
    else:
        spec = TinyModelSpec(**dict(params["base_model"]["build"], initializer_range=args.init))
        tokenizer, _ = build_qwen2_tokenizer()
        model = build_tiny_model(tokenizer, **tiny_model_kwargs(spec))
        with torch.no_grad():
            model.lm_head.weight.mul_(args.head_scale)
    defaults = params["train_defaults"]
    defaults["sft"].update(learning_rate=args.lr, max_steps=args.steps,
                           logging_steps=max(1, args.steps // 10))
    if args.logging:
        defaults["sft"].update(logging_steps=args.logging, logging_strategy="steps")
    if args.epochs:
        defaults["sft"].update(max_steps=-1, num_train_epochs=args.epochs)
    if args.batch:
        defaults["sft"].update(per_device_train_batch_size=args.batch)
    defaults.setdefault("quant", {})["load_in_4bit"] = not args.no_4bit
    if args.fp32:
        defaults["sft"]["bf16"] = False
        defaults["quant"]["bnb_4bit_compute_dtype"] = "float32"
    defaults["lora"].update(r=args.rank, lora_alpha=2 * args.rank)
    train_params = resolve_train(defaults, params["versions"][args.version]["train"], args.version)
    if train_params.parent is not None:
        raise SystemExit("probe root versions only (a chained one needs its parent's adapter)")
    with tempfile.TemporaryDirectory() as base, tempfile.TemporaryDirectory() as out:
        if args.base:
            base = args.base
        else:
            save_base(base, tokenizer, model, {"model": base, "revision": "probe", "built": True})
        loaded = load_base_model(base, read_base_info(base), train_params, args.version)
        peft_model = attach_adapter(loaded, train_params, base, args.version)
        rows = read_records(ws / "data" / "mixtures" / f"{args.version}.parquet")
        train_rows, dev_rows, _ = split_examples(rows, args.version)
        started = time.monotonic()
        trainer = build_trainer(peft_model, tokenizer, train_rows, dev_rows, train_params, out)
        trainer.train()
        dev = trainer.evaluate()["eval_loss"] if dev_rows else None
        if dev_rows:
            from stages.evaluate import answer_loss
            model = trainer.model
            model.eval()
            mine, _ = answer_loss(model, tokenizer, dev_rows)
            with model.disable_adapter():
                base_dev, _ = answer_loss(model, tokenizer, dev_rows)
            print(f"dev answer loss: version {mine:.3f}, base {base_dev:.3f}")
    losses = [round(e["loss"], 2) for e in trainer.state.log_history if "loss" in e]
    print("losses", losses, "steps", trainer.state.global_step)
    print(f"| {args.version} | {args.init} | ×{args.head_scale:g} | {args.lr:g} | {args.steps} | "
          f"{args.rank} | {'no' if args.no_4bit else 'yes'} | {losses[0]} → {losses[-1]} | "
          f"{losses[-1] / losses[0]:.2f} | {dev and round(dev, 2)} | {time.monotonic() - started:.0f} s |")


if __name__ == "__main__":
    main()
