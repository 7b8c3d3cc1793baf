"""Aggregate tokens/s of the server (minimind.serve) with 1 and with 16 concurrent clients: the official openai client
against a real server on loopback.

    python -m bench.serve                                   # small (26M) random weights; 1, 4 and 16 clients
    python -m bench.serve --preset tiny --clients 1 16 --max_tokens 64 --repeats 5 --json out.json
    python -m bench.serve --server_args "--max_batch 1"     # the same server generating one request at a time
    python -m bench.serve --checkout /path/to/other/checkout   # serve another checkout's minimind (its own flags)

The server is `python -m minimind.serve` in a process of its own with --threads CPU threads (1 by default, which
leaves the second core of a 2-core machine to the clients and the server's event loop), serving random weights of
--preset written to a temporary folder (bench.generate's models: logits as peaked as a trained model's; random
weights rarely say eos, so replies run to --max_tokens). One measurement: N clients (threads here, one shared
openai client) send one streamed chat request each at the same moment, each its own prompt of about --prompt_tokens
tokens and its own seed, at the server's default sampling (temperature 0.85, top_p 0.85); it ends when the last
reply is complete. Aggregate tokens/s = completion tokens (the usage of each reply) / wall time from the start to
the last reply. Reported per N, best of --repeats (on a machine shared with other jobs, the least disturbed run):
tokens/s by the wall clock; tokens per CPU-second of the server process (from /proc; steadier than the wall clock
when other jobs take the CPU, but it counts the event loop and the model's thread alike); the mean time to the
first streamed token.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.generate import model_for
from minimind.tokenizer import load_tokenizer
from minimind.weights import config_path, model_card

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("Ada Lovelace wrote the first published program, for Babbage's analytical engine, and saw that such a "
        "machine could work on symbols as well as numbers. ")


def write_weights(preset: str, folder: Path) -> Path:
    """A weight file of random weights (fp16, as the trainer writes it) and its model card, in folder."""
    model = model_for(preset, torch.device("cpu"))
    path = folder / f"bench_{model.config.hidden_size}.pth"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    config_path(path).write_text(json.dumps(model_card(model.config, load_tokenizer())))
    return path


class Server:
    """`python -m minimind.serve` of `checkout` in its own process, on a free loopback port."""

    def __init__(self, weights: Path, checkout: Path, threads: int, extra_args, log: Path):
        env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minimind.serve", str(weights), "--port", "0", "--device", "cpu",
             "--max_tokens_cap", "100000", *extra_args], cwd=checkout, env=env, stdout=subprocess.PIPE,
            stderr=log.open("w"), text=True)
        line = self.proc.stdout.readline()
        if "API base " not in line:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}{log.read_text()}")
        self.banner = line.strip()
        self.base_url = line.split("API base ")[1].split()[0]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts(n: int, tokens: int):
    """n different user messages of about `tokens` tokens each."""
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(TEXT * (tokens // 20 + 2))[:tokens]
    return [f"Question {i}: " + tokenizer.decode(ids) for i in range(n)]


def ask(client, content: str, seed: int, max_tokens: int, started: float):
    """(completion tokens, seconds from `started` to the first text) of one streamed request."""
    first, tokens = None, None
    for chunk in client.chat.completions.create(model="bench", messages=[{"role": "user", "content": content}],
                                                max_tokens=max_tokens, seed=seed, stream=True,
                                                stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first


def measure(client, server: Server, n: int, max_tokens: int, prompt_tokens: int):
    """One run of n clients at once: (tokens, wall seconds, server CPU seconds, mean first-token seconds)."""
    contents = prompts(n, prompt_tokens)
    results, errors = [None] * n, []
    barrier = threading.Barrier(n + 1)

    def run(i):
        barrier.wait()
        try:
            results[i] = ask(client, contents[i], 1000 + i, max_tokens, started)
        except Exception as e:  # reported below, with the server's log
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    cpu, started = server.cpu_seconds(), time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - started, server.cpu_seconds() - cpu
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed: {errors[0]!r}\n{server.log.read_text()[-2000:]}")
    return sum(r[0] for r in results), wall, cpu, sum(r[1] for r in results) / n


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="random weights of: tiny, small, base, moe, minimind3, ...")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per measurement")
    p.add_argument("--max_tokens", type=int, default=128, help="tokens each reply asks for")
    p.add_argument("--prompt_tokens", type=int, default=64, help="about this many tokens in each user message")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    p.add_argument("--threads", type=int, default=1, help="the server's CPU threads (OMP_NUM_THREADS)")
    p.add_argument("--server_args", default="", help="more flags for minimind.serve, e.g. \"--max_batch 1\"")
    p.add_argument("--checkout", default=str(ROOT), help="the checkout whose minimind.serve runs (default: this one)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    import openai  # (the serve extra)
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_weights(args.preset, Path(tmp))
        server = Server(weights, Path(args.checkout).resolve(), args.threads, shlex.split(args.server_args),
                        Path(tmp) / "server.log")
        try:
            client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=600)
            print(f"{server.banner}\n{args.preset} random weights; {args.threads} server thread(s) "
                  f"{args.server_args}; prompts of ~{args.prompt_tokens} tokens, {args.max_tokens} new each; best "
                  f"of {args.repeats}")
            print(f"{'clients':>7s} {'tokens':>7s} {'tok/s wall':>11s} {'tok/s server CPU':>17s} "
                  f"{'first token s':>14s} {'runs (tok/s wall)':s}")
            measure(client, server, 2, 4, args.prompt_tokens)  # warm-up
            results = []
            for n in args.clients:
                runs = [measure(client, server, n, args.max_tokens, args.prompt_tokens) for _ in range(args.repeats)]
                r = {"clients": n, "tokens": runs[0][0],
                     "tokens_per_s": max(t / w for t, w, _, _ in runs),
                     "tokens_per_server_cpu_s": max(t / c for t, _, c, _ in runs),
                     "first_token_s": min(f for *_, f in runs),
                     "runs_tokens_per_s": [round(t / w, 1) for t, w, _, _ in runs]}
                results.append(r)
                print(f"{n:7d} {r['tokens']:7d} {r['tokens_per_s']:11.1f} {r['tokens_per_server_cpu_s']:17.1f} "
                      f"{r['first_token_s']:14.3f} {r['runs_tokens_per_s']}", flush=True)
        finally:
            server.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"server": server.banner, **{k: getattr(args, k) for k in (
                "preset", "max_tokens", "prompt_tokens", "repeats", "threads", "server_args", "checkout")},
                "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
