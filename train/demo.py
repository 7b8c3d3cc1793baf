"""The whole MiniMind pipeline on a CPU in a few minutes: pretrain -> tool SFT -> SFT -> DPO -> reasoning, and GRPO.

    python -m train.demo                 # bundled demo data, a tiny model (hidden 128, 4 layers), out/
    python -m train.demo --quick         # a few steps per stage: checks the plumbing in well under a minute

The bundled data describes a small invented world (people, their favourite colours and home cities, small sums)
in English and Chinese. Before training and after every stage the demo scores the model two ways, each on held-out
questions (facts that pretraining states but no training question ever asks: generalisation) and seen ones (the
same kinds of question about facts the training data does ask about: memorisation):
  quiz       multiple choice by likelihood (minimind.demo.evaluate, chance 25%): does the model rank the right
             answer first?
  generated  greedy exact match of the model's own answers (minimind.demo.answers): what a user sees. The base
             model is asked in plain text ("Question: ...\nAnswer:"), the others in the chat template; after the
             reasoning stage the answer is read inside <answer>.
  tool       for a chat model: its use of the calculator tool (minimind.demo.tools) on sums no training
             conversation asks: a valid call with the question's numbers, then the right answer from its result.
             The tool SFT stage (train.sft on the tool conversations alone, as minimind-3 has a tool-call SFT)
             teaches it; the SFT after it keeps some of them.
Then it shows a greedy reply to two questions. The quiz scores a direct answer, so after the reasoning stage, whose
replies open with <think>, it is also scored inside the template (the model writes its own <think> part, then the
answers are ranked after <answer>: the "in template" line). Each stage is the real one (`train.<stage>.main`), so
the checkpoints it leaves in out/ are MiniMind2-format weight files: pretrain_128.pth, tool_sft_128.pth,
full_sft_128.pth, rlhf_128.pth, reason_128.pth, grpo_128.pth. GRPO starts from the DPO model (rlhf) with the
`answer` reward on the seen sums and on questions about a part of the world only its prompts ask about
(minimind.demo.world.World.grpo_items); its row against the DPO row shows what it did to the held-out answers.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from train import dpo, engine, flags, grpo, pretrain, reason, sft

DEMO_MODEL = ["--hidden_size", "128", "--num_hidden_layers", "4", "--num_attention_heads", "4",
              "--num_key_value_heads", "2"]

# (row, stage module, demo data file, flags). Pretraining uses short packed rows (64 tokens, 16 rows): a 1.6M-parameter
# model learns the name -> fact lookups only after several hundred optimizer steps, so steps count more than row length.
# Its learning rate is far above MiniMind2's (tuned for 100M-parameter models and days of data), so it warms up over 100
# steps: with 10, Adam's first steps at 3e-3 threw the loss from 4.9 to 15.8 at step 20, and it sat near 4.9 for the
# next 20 steps. The tool SFT is 400 steps of calculator conversations alone (minimind.demo.tools) at 1e-3: copying the
# question's numbers into the call comes in a sudden transition (valid calls 8% after 150 steps, 25-42% after 250, 100%
# after 400), whose step varies with the seed (--seed 7: 54% after 400; 560 steps of 12 rows took that to 96% but cost
# seed 42 8 points of held-out answers downstream and 18 s), and which a share of the SFT records never reached (none
# with 35% of them); after SFT it cost the chat answers (seen 91% -> 1%); first, the SFT after it keeps both, and its
# copying lifts the held-out sums the SFT and DPO models answer (8-15 of 20 right in five runs without it, 17 with it).
# SFT runs 2 epochs at 5e-4: answering in the chat template means copying the question's subject to a new place, which 1
# epoch at 3e-4 had not learnt (22% of seen questions answered right, against 96%). DPO uses beta 2, not MiniMind2's
# 0.1: its sequence log-probability is the mean over the answer's ~8 tokens and a pair differs in one of them, so at 0.1
# beta * margin stays near 0.01 and the loss at ln 2 (0.693 -> 0.688 in 93 steps); a higher rate instead (2e-4) pushed
# chosen and rejected down together and cost 15 points of seen answers. The reasoning stage keeps its tags at weight 1
# (MiniMind2: 10: this model then learns to repeat "<answer>") and a gentle rate: at 1e-3 it lost the held-out answers
# (7% right, 44% at 5e-4); it runs 4 epochs: after 2 the model still copied the question wrong inside <think> (held-out
# answers 22%, seen 59%; after 4: 50% and 100%, seed 7: 44% and 100%). SFT rows are 192 tokens: a calculator
# conversation is ~180. GRPO: 120 steps of 8 prompts x 6 samples at temperature 1, lr 1e-4, from the DPO model. 70%
# of its prompts have an answer to match (the rl and the seen part of the world, World.grpo_items); 30% ask the age of
# a person no other data asks about (rl or held out), which minimind.demo.rewards.asked_person pays when the reply is
# about the person asked. The held-out answers GRPO can fix name someone else: with the age questions the DPO model's
# probability of the asked held-out person's name as its answer's first token goes from 0.18 to 0.37, the held-out
# facts from 3 of 16 to 6-7 over four seeds of the stage, the answers from 20 of 36 to 21-25 (19-21 without the age
# questions; 60 steps: 20-24; lr 2e-4: 18-22); the 60 steps more cost ~20 s and gave 2 answers more with the default
# seed (0.75 on average over the four). The demo data are sized for about 6.5 minutes on an idle 2-core CPU
# (minimind.demo.data.SIZES; README).
PIPELINE = [
    ("pretrain", pretrain, "pretrain", ["--epochs", "2", "--batch_size", "16", "--max_seq_len", "64",
                                        "--accumulation_steps", "1", "--learning_rate", "3e-3", "--warmup_iters", "100",
                                        "--from_weight", "none"]),
    ("tool sft", sft, "tools", ["--epochs", "1", "--batch_size", "16", "--max_seq_len", "192", "--learning_rate",
                                "1e-3", "--warmup_iters", "5", "--from_weight", "pretrain",
                                "--save_weight", "tool_sft"]),
    ("sft", sft, "sft", ["--epochs", "2", "--batch_size", "16", "--max_seq_len", "192", "--learning_rate", "5e-4",
                         "--warmup_iters", "5", "--from_weight", "tool_sft"]),
    ("dpo", dpo, "dpo", ["--epochs", "1", "--batch_size", "16", "--max_seq_len", "128", "--learning_rate", "2e-5",
                         "--beta", "2", "--from_weight", "full_sft"]),
    ("reason", reason, "reason", ["--epochs", "4", "--batch_size", "16", "--max_seq_len", "128", "--learning_rate",
                                  "5e-4", "--warmup_iters", "5", "--template_weight", "1", "--from_weight", "rlhf"]),
    ("grpo", grpo, "grpo", ["--epochs", "1", "--batch_size", "8", "--num_generations", "6", "--max_seq_len", "96",
                            "--max_gen_len", "24", "--temperature", "1.0", "--reward",
                            "answer,minimind.demo.rewards:asked_person", "--loss_type", "cispo",
                            "--beta", "0.1", "--learning_rate", "1e-4", "--from_weight", "rlhf"]),
]
QUICK_STEPS = 3
TOOL_TRANSITION_DONE = 0.9  # share of valid calls after the tool SFT below which the demo says the copy is unfinished

SAMPLE_QUESTIONS = {"en": "What is 3 plus 5?", "zh": "4加0等于多少？"}


def build_parser():
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__, epilog=flags.GPU_RECIPE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="checkpoints and metrics go here")
    p.add_argument("--data_dir", default=None, help="where the demo data is written (default OUT_DIR/demo_data)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per stage (a plumbing check)")
    p.add_argument("--steps", type=int, default=0, help="cap every stage at this many optimizer steps")
    p.add_argument("--kernels", default=None, choices=("torch", "triton", "liger"),
                   help="op backend (default triton on CUDA, torch on CPU)")
    p.add_argument("--device", default=None, help="default cuda when there is one, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(flags.DTYPES),
                   help="autocast compute dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=42, help="seeds the initial weights and the data order")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores idle when the demo starts, at least 1; "
                        "more threads than free cores makes PyTorch's spinning workers 10-25x slower, not faster)")
    p.add_argument("--no_eval", action="store_true", help="skip the quiz and the sample replies")
    return p


def tool_transition_note(valid_calls: float):
    """A line for a tool SFT that ended before its copy transition finished (fewer than TOOL_TRANSITION_DONE of the
    calls valid), else None: the README's table was measured after a finished one."""
    if valid_calls >= TOOL_TRANSITION_DONE:
        return None
    return (f"   note: the tool SFT ended with {valid_calls:.0%} valid calls. Its copy of the question's numbers comes "
            "in a sudden transition whose step depends on the seed (from the README's pretrained model, tool-SFT "
            "seeds 1-4 gave 67%, 100%, 100% and 67%; the README's run 100%), so the later stages will likely answer "
            "fewer held-out sums than the README's table, and GRPO has more to fix (README: \"The demo, stage by "
            "stage\").")


def free_cores(sample_s: float = 0.5) -> int:
    """The cores idle right now, at least 1: the idle share of a half-second sample of /proc/stat (Linux), else what
    the last minute's load average leaves. Both cores of an idle 2-core machine (1.37x faster than one for this
    model), one while another job runs."""
    cores = os.cpu_count() or 1

    def idle_and_total():
        with open("/proc/stat") as f:  # "cpu  user nice system idle iowait irq softirq steal ...", all cores summed
            ticks = [int(v) for v in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)
    try:
        idle0, total0 = idle_and_total()
        time.sleep(sample_s)
        idle1, total1 = idle_and_total()
        idle = cores * (idle1 - idle0) / max(1, total1 - total0)
    except (OSError, ValueError, IndexError):
        try:
            idle = cores - os.getloadavg()[0]
        except OSError:  # neither on this platform
            idle = cores / 2
    return max(1, min(cores, int(idle + 0.5)))


def sample_replies(model, tokenizer, reason_mode=False):
    """Greedy replies to the sample questions (the reasoning stage's template shows in its reply)."""
    from minimind.generate import SamplingConfig, chat
    cfg = SamplingConfig(max_new_tokens=64 if reason_mode else 24, temperature=0.0)
    return {lang: chat(model, tokenizer, [{"role": "user", "content": q}], cfg).strip()
            for lang, q in SAMPLE_QUESTIONS.items()}


def report(title, model, tokenizer, data_dir, device, reason_mode=False, answer_style="chat"):
    """Quiz (ranked answers) and exact match (generated answers), held-out and seen, and for a chat model its use of
    the calculator tool; prints them and returns the scores. answer_style: "text" for the base model (it has never
    seen the chat template), else "chat"."""
    from minimind.demo import evaluate, exact_match
    from minimind.demo.tools import tool_use
    from minimind.demo.answers import ANSWER_TOKENS, REASON_TOKENS
    t = time.perf_counter()
    scores = evaluate(model, tokenizer, data_dir=data_dir, device=device)
    scores["seen_accuracy"] = evaluate(model, tokenizer, data_dir=data_dir, device=device, split="seen")["accuracy"]
    if reason_mode:
        for split in ("held_out", "seen"):
            scores[f"reason_{split}_accuracy"] = evaluate(model, tokenizer, data_dir=data_dir, device=device,
                                                          style="reason", split=split)["accuracy"]
    n_tokens = REASON_TOKENS if reason_mode else ANSWER_TOKENS
    for split in ("held_out", "seen"):
        em = exact_match(model, tokenizer, data_dir, device, answer_style, split, n_tokens)
        scores[f"answer_{split}_accuracy"], scores[f"answer_{split}_n"] = em["accuracy"], em["n"]
    scores["answer_style"] = answer_style
    if answer_style == "chat":
        tools = tool_use(model, tokenizer, device)
        scores.update(tool_n=tools["n"], tool_well_formed=tools["well_formed_calls"],
                      tool_valid_calls=tools["valid_calls"], tool_right_answers=tools["right_answers"],
                      tool_example=tools["replies"][0])
    replies = sample_replies(model, tokenizer, reason_mode)
    print(f"\n== {title}: held-out quiz {scores['accuracy']:.1%} (text {scores['text_accuracy']:.1%}, chat "
          f"{scores['chat_accuracy']:.1%}; n={scores['n']}), seen-facts quiz {scores['seen_accuracy']:.1%}; "
          f"chance {scores['chance']:.0%} [{time.perf_counter() - t:.1f}s]")
    if reason_mode:
        print(f"   in the reasoning template: held-out {scores['reason_held_out_accuracy']:.1%}, seen "
              f"{scores['reason_seen_accuracy']:.1%}")
    where = " inside <answer>" if reason_mode else ""
    print(f"   generated answers right ({answer_style} prompt, greedy{where}): held-out "
          f"{scores['answer_held_out_accuracy']:.1%} (n={scores['answer_held_out_n']}), seen "
          f"{scores['answer_seen_accuracy']:.1%} (n={scores['answer_seen_n']})")
    if "tool_n" in scores:
        q, call, final, _, _ = scores["tool_example"]
        print(f"   calculator tool (sums no training conversation asks): well-formed calls "
              f"{scores['tool_well_formed']:.1%}, with the right numbers {scores['tool_valid_calls']:.1%}, "
              f"right final answers "
              f"{scores['tool_right_answers']:.1%} (n={scores['tool_n']})\n"
              f"   Q: {q}\n   A: {call!r}\n   (tool) -> A: {final!r}")
    for lang, reply in replies.items():
        print(f"   Q: {SAMPLE_QUESTIONS[lang]}\n   A: {reply!r}")
    return scores


def training_curves(metrics_logs, out) -> str:
    """Draw the stages' loss, lr and tokens/s (train.plot) to `out`; a line saying where, or why not."""
    from train.plot import plot_runs
    try:
        return f"training curves (loss, lr, tokens/s; python -m train.plot): {plot_runs(metrics_logs, out)}"
    except RuntimeError as e:  # matplotlib is an optional extra
        return f"no picture of the training curves: {e}"


def main(argv=None):
    args = build_parser().parse_args(argv)
    from minimind.config import MiniMindConfig
    from minimind.demo import write_demo_data
    from minimind.model import MiniMindForCausalLM
    from minimind.tokenizer import load_tokenizer

    t0, cpu0 = time.perf_counter(), time.process_time()
    out_dir = Path(args.out_dir)
    data_dir = Path(args.data_dir) if args.data_dir else out_dir / "demo_data"
    paths = write_demo_data(data_dir)
    print(f"demo data in {data_dir}: " + ", ".join(f"{k} {p.stat().st_size / 1e6:.1f} MB" for k, p in paths.items()))
    steps = QUICK_STEPS if args.quick else args.steps
    common = [*DEMO_MODEL, "--out_dir", str(out_dir), "--seed", str(args.seed), "--log_interval", "10",
              "--save_interval", "100000"]
    for flag in ("kernels", "device", "dtype"):
        if getattr(args, flag):
            common += [f"--{flag}", getattr(args, flag)]
    if steps:
        common += ["--max_steps", str(steps), "--log_interval", "1"]

    tokenizer = load_tokenizer()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cpu":
        torch.set_num_threads(args.threads or free_cores())
        print(f"CPU threads: {torch.get_num_threads()} (--threads)")
    rows, metrics_logs = [], []
    if not args.no_eval:
        torch.manual_seed(args.seed)
        cfg = MiniMindConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=tokenizer.vocab_size)
        scores = report("before training (random weights)", MiniMindForCausalLM(cfg).to(device), tokenizer,
                        data_dir, device, answer_style="text")
        rows.append(("random init", scores, 0.0, 0.0, float("nan")))
    for name, stage, data_key, flags in PIPELINE:
        module = stage.STAGE.name
        print(f"\n### {name}: python -m train.{module} --data_path {paths[data_key]} " + " ".join(flags))
        cpu = time.process_time()
        result = stage.main([*common, *flags, "--data_path", str(paths[data_key])])
        cpu = time.process_time() - cpu  # all of the process's threads: on a busy machine, what the stage costs
        if result["interrupted"]:  # Ctrl-C: the stage saved its resume state; the next stage must not start
            print(f"demo stopped during {name}", file=sys.stderr)
            if argv is None:
                sys.exit(engine.STOPPED_EXIT_STATUS)
            return rows
        metrics_logs.append(result["metrics_path"])
        if not args.no_eval:
            scores = report(f"after {name}", result["model"], tokenizer, data_dir, device, reason_mode=name == "reason",
                            answer_style="text" if name == "pretrain" else "chat")
            rows.append((name, scores, result["seconds"], cpu, result["final_loss"]))
            note = tool_transition_note(scores["tool_valid_calls"]) if name == "tool sft" and not steps else None
            if note:
                print(note)

    if rows:
        print("\n                  quiz (ranked)      generated answers    calculator tool")
        print("stage          held-out     seen    held-out     seen    calls  answers   train s    cpu s   final loss")
        for name, s, secs, cpu, loss in rows:
            style = "(text)" if s["answer_style"] == "text" else ""
            tool = (f"{s['tool_valid_calls']:8.1%} {s['tool_right_answers']:8.1%}" if "tool_n" in s
                    else f"{'-':>8s} {'-':>8s}")
            print(f"{name:12s} {s['accuracy']:10.1%} {s['seen_accuracy']:8.1%} {s['answer_held_out_accuracy']:11.1%} "
                  f"{s['answer_seen_accuracy']:8.1%} {tool} {secs:9.1f} {cpu:8.1f}   {loss:.4f} {style}")
            if "reason_held_out_accuracy" in s:
                print(f"{'  in template':12s} {s['reason_held_out_accuracy']:10.1%} {s['reason_seen_accuracy']:8.1%}")
        print("(quiz: 4 candidates ranked by likelihood, chance 25%; generated: greedy reply is the canonical answer "
              "or its value; (text): a plain-text prompt, the base model knows no chat template; calculator tool: "
              "a valid call with the question's numbers, then the right answer from the tool's result)")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s ({time.process_time() - cpu0:.0f} CPU seconds); "
          f"checkpoints in {out_dir}/")
    print(training_curves(metrics_logs, out_dir / "demo_metrics.png"))
    flag = "" if str(out_dir) == "out" else f" --out_dir {out_dir}"
    print(f"talk to the models: python -m minimind.chat rlhf{flag}   |   python -m minimind.chat reason{flag}   |   "
          f"python -m minimind.serve rlhf{flag}   (web chat at http://127.0.0.1:8998/)")
    return rows


if __name__ == "__main__":
    main()
