"""QLoRA training throughput of a Qwen2-7B-shaped model with random weights (no download).

What it measures (issue 5 §7; targets on one H100: >= 3,000 tokens/s, < 24 GB peak):
QLoRA steps exactly as ``stages.train`` runs them — weights loaded 4-bit NF4 (double quant,
bf16 compute) through ``BitsAndBytesConfig``, ``prepare_model_for_kbit_training``, LoRA r=16
on all linear projections, non-reentrant gradient checkpointing, bitsandbytes AdamW8bit,
batch 2 x 2048 tokens — and reports tokens/s, MFU by the 6N rule (6 x all parameters x
tokens/s / peak bf16 FLOP/s) and peak memory. Variants:
- ``baseline``: two rows of real-length examples padded to 2048 (lengths drawn from the
  bench's seed in [512, 2048]), loss on non-pad tokens;
- ``packing``: the same examples packed padding-free into one row with position_ids
  restarting per example (needs flash attention: skipped with a note otherwise);
- ``liger``: baseline + Liger fused kernels (RMSNorm, RoPE, SwiGLU) when liger-kernel is
  installed (skipped with a note otherwise).
Tokens/s counts real (non-pad) tokens, so padding waste shows up as lower throughput.

The random weights are written once as safetensors (``--cache-dir``) and then loaded through
the real 4-bit path, so the bench exercises the same loader as training.

    python bench/train_gpu.py                 # GPU: 7B shape, baseline + packing + liger
    python bench/train_gpu.py --tiny          # CPU: tiny shape, checks the script end to end
    python bench/train_gpu.py --record        # append the table to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, SXM


def peak_flops(device_name: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in device_name:
            return flops
    return None


def random_weights_dir(shape: dict, cache_dir: Path, seed: int) -> Path:
    """A Qwen2 checkpoint with random bf16 weights, written once and reused."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    key = f"qwen2_{shape['hidden_size']}x{shape['num_hidden_layers']}_s{seed}"
    out = cache_dir / key
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    config = Qwen2Config(**shape, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir))
    model.save_pretrained(tmp, max_shard_size="5GB")
    os.replace(tmp, out)
    return out


def load_qlora_model(weights: Path, device: str, gradient_checkpointing: bool, attn: str | None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16")
    kwargs = dict(quantization_config=quant, dtype=torch.bfloat16)
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    if attn:
        kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def make_batches(lengths: list[int], batch: int, seq_len: int, vocab: int, packed: bool,
                 device: str, seed: int) -> list[dict[str, torch.Tensor]]:
    """Steps of ``batch`` examples each: padded rows, or one padding-free packed row."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for start in range(0, len(lengths), batch):
        group = lengths[start:start + batch]
        seqs = [torch.randint(0, vocab - 8, (n,), generator=gen) for n in group]
        if packed:
            ids = torch.cat(seqs)[None]
            pos = torch.cat([torch.arange(n) for n in group])[None]
            labels = ids.clone()
            steps.append({"input_ids": ids.to(device), "position_ids": pos.to(device),
                          "labels": labels.to(device)})
        else:
            ids = torch.zeros(len(group), seq_len, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(seqs):
                ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
            labels = ids.masked_fill(mask == 0, -100)
            steps.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                          "labels": labels.to(device)})
    return steps


def run_variant(name: str, args: argparse.Namespace, weights: Path, shape: dict, device: str) -> dict:
    import bitsandbytes as bnb

    attn = None
    if name == "packing":
        try:
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
        except ImportError:
            return {"variant": name, "skipped": "flash-attn not installed (padding-free packing "
                                                "needs varlen attention)"}
    if name == "liger":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        except ImportError:
            return {"variant": name, "skipped": "liger-kernel not installed"}
        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_qlora_model(weights, device, not args.no_gradient_checkpointing, attn)
    model.train()
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = random.Random(args.seed)
    n_steps = args.warmup + args.steps
    lengths = [rng.randint(args.seq_len // 4, args.seq_len) for _ in range(n_steps * args.batch)]
    if args.full_length:
        lengths = [args.seq_len] * len(lengths)
    batches = make_batches(lengths, args.batch, args.seq_len, shape["vocab_size"],
                           name == "packing", device, args.seed)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)
    tokens, seconds = 0, 0.0
    for step, batch in enumerate(batches):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds += time.perf_counter() - start
            tokens += int((batch["labels"] != -100).sum()) if name != "packing" else batch["input_ids"].numel()
    # 4-bit weights are stored packed two per byte: count the parameters of the shape instead
    n_params = shape_parameters(shape)
    tokens_per_s = tokens / seconds
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    flops = peak_flops(device_name)
    result = {"variant": name, "tokens_per_s": round(tokens_per_s, 1),
              "mfu": round(6 * n_params * tokens_per_s / flops, 4) if flops else None,
              "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda"
              else None, "steps": args.steps, "tokens": tokens, "seconds": round(seconds, 3),
              "loss": round(float(loss), 4), "parameters": n_params, "device": device_name}
    del model, optimizer
    return result


def shape_parameters(shape: dict) -> int:
    h, i, v, layers = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    attn = h * h * 2 + h * kv * 2 + h + 2 * kv  # q, o, k, v (+ q/k/v biases)
    mlp = 3 * h * i
    return layers * (attn + mlp + 2 * h) + 2 * v * h + h


def table(results: list[dict], header: str) -> str:
    lines = [header, "", "| variant | tokens/s | MFU (6N) | peak memory GB | steps | loss |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['tokens_per_s']:,} | {r['mfu'] if r['mfu'] is not None else 'n/a'} | "
                         f"{r['peak_memory_gb'] if r['peak_memory_gb'] is not None else 'n/a'} | {r['steps']} | {r['loss']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape (CPU check of the script)")
    parser.add_argument("--variants", default="baseline,packing,liger")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--full-length", action="store_true", help="every example is seq-len tokens")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "krx_bench_weights"))
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY if args.tiny else QWEN2_7B
    if device == "cpu" and not args.tiny:
        print("no GPU: the 7B shape needs one; run with --tiny to check the script on CPU",
              file=sys.stderr)
        return 2
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    weights = random_weights_dir(shape, cache, args.seed)
    results = []
    for variant in args.variants.split(","):
        result = run_variant(variant, args, weights, shape, device)
        print(json.dumps(result), flush=True)
        results.append(result)
    header = (f"### train_gpu ({'tiny' if args.tiny else 'Qwen2-7B shape'}, {device}: "
              f"{results[0].get('device', device)}, batch {args.batch} x {args.seq_len}, "
              f"torch {torch.__version__})")
    text = table(results, header)
    print(text)
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
