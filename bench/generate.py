"""Decode throughput of minimind.generate: tokens/s at batch 1, 8 and 16, on the CPU or a GPU.

    python -m bench.generate                            # tiny and small models, batch 1 8 16, greedy and sampled
    python -m bench.generate --preset small --batch 16 --new_tokens 128 --json out.json
    PYTHONPATH=/path/to/other/checkout python bench/generate.py    # the same measurement of another checkout's code

It times only the public `generate(model, input_ids, max_new_tokens=...)`, so the same file measures any checkout
that has it (run as a file, it imports whichever `minimind` comes first on the path, and says which). Decode
tokens/s = batch * (new_tokens - 1) / (time of new_tokens steps - time of 1 step): the prefill and the first token
cancel out. Random weights (the final norm scaled so the logits' std is about 4: next-token distributions as peaked
as a trained model's, which matters to top_p), random prompts of --prompt_len tokens (every row the same length),
no eos, so every row decodes every step. Best of --repeats runs (on a shared machine, the least disturbed one);
`--clock cpu` times this process's CPU time instead of the wall clock, steadier on a CPU shared with other jobs.
Models: `tiny` (hidden 64, 2 layers, vocab 6400) and the MiniMind2 presets (`small` 26M, `base`, `moe`), fp32 on the
CPU and bf16 on a GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import time

if not __package__:  # run as a file: its folder must not shadow the packages (bench/kernels.py is not `kernels`)
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

import minimind  # noqa: E402
from minimind.config import MiniMindConfig  # noqa: E402
from minimind.generate import generate  # noqa: E402
from minimind.model import MiniMindForCausalLM  # noqa: E402

LOGIT_STD = 4.0
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.85, top_p=0.85)}


def model_for(name, device):
    if name == "tiny":
        cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = MiniMindConfig.from_preset(name)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = MiniMindForCausalLM(cfg)
    with torch.no_grad():  # logits of std about LOGIT_STD: peaked like a trained model's, not uniform
        model.model.norm.weight.fill_(LOGIT_STD / (0.02 * cfg.hidden_size ** 0.5))
    return model.to(device=device, dtype=dtype).eval()


def timed(model, ids, new_tokens, mode, device, clock):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = clock()
    out = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=None, generator=torch.Generator(device)
                   .manual_seed(0), **MODES[mode])
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape == (ids.shape[0], new_tokens)
    return clock() - t


def measure(model, batch, args, mode, device):
    ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), device=device)
    clock = CLOCKS[args.clock]
    timed(model, ids, 4, mode, device, clock)  # warm-up
    runs = []
    for _ in range(args.repeats):
        runs.append((timed(model, ids, args.new_tokens, mode, device, clock),
                     timed(model, ids, 1, mode, device, clock)))
    full, first = min(r[0] for r in runs), min(r[1] for r in runs)  # the least disturbed run
    return {"decode_tokens_per_s": batch * (args.new_tokens - 1) / max(full - first, 1e-9),
            "first_token_s": first, "total_s": full}


def source():
    """Which minimind this run measures: its folder and git commit."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(minimind.__file__)))
    try:
        commit = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{folder}" + (f" @ {commit}" if commit else "")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny", "small"], help="tiny, small, base, moe")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16], help="rows generated together")
    p.add_argument("--mode", nargs="+", default=list(MODES), choices=list(MODES),
                   help="greedy (temperature 0) or sampled (temperature 0.85, top_p 0.85)")
    p.add_argument("--prompt_len", type=int, default=128, help="tokens in every prompt")
    p.add_argument("--new_tokens", type=int, default=256, help="tokens generated per row")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best counts")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: steady numbers on a shared machine; more spinning workers than free cores "
                        "make PyTorch many times slower)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="cpu: this process's CPU time, steadier than wall time on a CPU shared with other jobs "
                        "(with --threads 1; meaningless on a GPU)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = source()
    print(f"measuring {where} on {device} ({args.threads} thread(s), {args.clock} clock); prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new, best of {args.repeats}")
    print(f"{'model':6s} {'mode':8s} {'batch':>5s} {'decode tok/s':>13s} {'first token s':>14s}")
    results = []
    for preset in args.preset:
        model = model_for(preset, device)
        for mode in args.mode:
            for batch in args.batch:
                r = {"preset": preset, "mode": mode, "batch": batch, **measure(model, batch, args, mode, device)}
                results.append(r)
                print(f"{preset:6s} {mode:8s} {batch:5d} {r['decode_tokens_per_s']:13.0f} {r['first_token_s']:14.4f}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": where, "device": str(device), "threads": args.threads, **{
                k: getattr(args, k) for k in ("clock", "prompt_len", "new_tokens", "repeats")}, "results": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
