"""Talk to a trained model in the terminal.

    python -m minimind.chat full_sft                       # out/full_sft_<hidden>.pth, chat template
    python -m minimind.chat out/reason_512.pth --prompt "2+3=?"   # one question, answer, exit
    python -m minimind.chat pretrain --mode text           # a pretrained model continues plain text
    python -m minimind.chat full_sft --lora out/lora/lora_identity_512.pth

Modes: `chat` renders MiniMind2's ChatML template (SFT, DPO, reasoning and distilled models); `text` feeds
<|im_start|> + the prompt and lets the model continue (pretrained models, which never saw the template).
Each line typed is one user turn; `--history N` keeps the last N exchanges as context (0, MiniMind2's default,
makes every question stand alone); `/reset` clears it; an empty line or end of input quits. Ctrl-C stops a reply
(it is not kept in the history); at the prompt it quits.
"""
import argparse
import sys

import torch

from minimind.generate import SamplingConfig, stream_chat, stream_text
from minimind.weights import find_weights, load_model, load_tokenizer_for


def add_model_args(p: argparse.ArgumentParser):
    """The flags that say which model to open (shared by minimind.chat and minimind.serve)."""
    p.add_argument("weights", help="a weight file, or a stage prefix (pretrain, full_sft, rlhf, reason, ...) "
                                   "looked up in --out_dir")
    p.add_argument("--out_dir", default="out", help="where a stage prefix is looked up (default %(default)s)")
    p.add_argument("--lora", default=None, help="a LoRA adapter file to merge into the weights")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the one the weights' .json card names, else the bundled one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default %(default)s here)")
    p.add_argument("--kernels", default="torch", choices=("torch", "triton", "liger"),
                   help="op backend (triton: the fused kernels, on a GPU)")
    p.add_argument("--num_attention_heads", type=int, default=None,
                   help="only for a weight file without its .json config (then default 8, as in MiniMind2)")


def add_sampling_args(p: argparse.ArgumentParser):
    d = SamplingConfig()
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature; 0 = greedy, the same answer every time (default %(default)s)")
    p.add_argument("--top_p", type=float, default=d.top_p,
                   help="sample from the most likely tokens whose probabilities add up to P (1 = off; default "
                        "%(default)s)")
    p.add_argument("--top_k", type=int, default=d.top_k,
                   help="sample from the K most likely tokens only (0 = all; default %(default)s)")
    p.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty,
                   help="a token already in the text has its logit divided by this (multiplied if the logit is "
                        "negative; 1 = off, default %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=512, help="longest reply in tokens (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampler (same seed, same reply)")


def open_model(args):
    """(model, tokenizer) from the model flags; errors say which file or flag is wrong."""
    path = find_weights(args.weights, args.out_dir)
    tokenizer = load_tokenizer_for(path, args.tokenizer)
    model = load_model(path, lora=args.lora, kernels=args.kernels, device=args.device,
                       num_attention_heads=args.num_attention_heads)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {path} only {model.config.vocab_size}; "
                         f"pass the --tokenizer it was trained with")
    return model, tokenizer, path


def parse_and_open(p: argparse.ArgumentParser, argv=None):
    """Parse the flags and open the model: (args, model, tokenizer, weight path, SamplingConfig); a bad file or flag
    ends with a usage error that says which."""
    args = p.parse_args(argv)
    try:
        model, tokenizer, path = open_model(args)
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # RuntimeError: an unavailable --kernels
        p.error(str(e))
    return args, model, tokenizer, path, cfg


def reply(model, tokenizer, mode, history, prompt, cfg, generator, out=None):
    """Stream the answer to `prompt` to `out` and return it. history: earlier messages (chat mode)."""
    if mode == "text":
        pieces = stream_text(model, tokenizer, [tokenizer.bos_id] + tokenizer.encode(prompt), cfg, generator)
    else:
        pieces = stream_chat(model, tokenizer, history + [{"role": "user", "content": prompt}], cfg, generator)
    out, text = out or sys.stdout, []
    for piece in pieces:
        text.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimind.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--mode", choices=("chat", "text"), default="chat",
                   help="chat: the ChatML template (SFT and later models); text: continue the prompt (pretrained)")
    p.add_argument("--system", default=None, help="a system message (chat mode)")
    p.add_argument("--history", type=int, default=0, help="earlier exchanges kept as context (chat mode)")
    p.add_argument("--prompt", action="append", default=None,
                   help="ask this and exit instead of reading input (repeat for several turns)")
    args, model, tokenizer, path, cfg = parse_and_open(p, argv)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
    interactive = args.prompt is None and sys.stdin.isatty()
    if interactive:
        print(f"{path} ({model.num_parameters() / 1e6:.1f}M parameters, {args.mode} mode). "
              f"Empty line to quit, /reset to forget the conversation.")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = []
    prompts = iter(args.prompt) if args.prompt is not None else None
    while True:
        if prompts is not None:
            prompt = next(prompts, None)
        else:
            try:
                prompt = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: quit
                prompt = None
        if not prompt:
            return
        if prompt.strip() == "/reset":
            history = []
            continue
        if interactive:
            print("< ", end="", flush=True)
        try:
            answer = reply(model, tokenizer, args.mode, system + history, prompt, cfg, generator)
        except KeyboardInterrupt:  # Ctrl-C during a reply: drop it, keep the conversation, ask again
            print(" [stopped]", flush=True)
            continue
        if args.history > 0:
            history = (history + [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": answer}])[-2 * args.history:]


if __name__ == "__main__":
    main()
