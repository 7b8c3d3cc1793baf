"""The benchmark harnesses, end to end on the CPU at tiny sizes (--cpu-smoke), and the cost arithmetic by hand.

Nothing here asserts a speed: CPU numbers only prove that the harnesses run and write well-formed results.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from bench import cost, kernels, throughput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    return env


def test_gpu_suite_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", "gpu_suite.sh")], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_gpu_nothing_is_measured(tmp_path, capsys):
    assert kernels.main(["--out", str(tmp_path)]) == 0
    assert throughput.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_kernels_cpu_smoke_every_op(tmp_path):
    variants = ["torch", "grouped_mm", "torch_F"] + ([] if torch.cuda.is_available() else ["triton"])
    assert kernels.main(["--cpu-smoke", "--out", str(tmp_path), "--variants", *variants,
                         "--warmup_ms", "1", "--rep_ms", "1"]) == 0
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["env"]["device_kind"] == "cpu" and "CPU smoke" in doc["env"]["label"]
    assert doc["ceilings"]["copy_GBps"] > 0 and doc["ceilings"]["matmul_TFLOPs"] > 0
    rows = doc["results"]
    assert {r["op"] for r in rows} == set(kernels.OPS)
    for r in rows:
        if r["variant"] == "torch":  # the reference itself must always run
            assert r["status"] == "ok", r
        if r["status"] == "ok":
            assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
            # fp32 on both sides, different summation orders: far under 1e-4 when the variant is right
            assert r["rel_err_out"] < 1e-4 and r["rel_err_grad"] < 1e-4, r
            assert (r.get("fwd_GBps") is not None) != (r.get("fwd_TFLOPs") is not None), r
    if not torch.cuda.is_available():
        assert all(r["status"] == "ok" for r in rows if r["variant"] == "triton"), rows
    assert any(r["variant"] == "grouped_mm" and r["status"] == "ok" for r in rows) == kernels.grouped_mm_available()
    md = (tmp_path / "kernels.md").read_text()
    assert "CPU smoke" in md and "| linear_cross_entropy |" in md and "| moe |" in md


def test_kernels_cli_cpu_smoke_runs_triton(tmp_path):
    """From the command line, without TRITON_INTERPRET set by the caller: the CLI sets it before anything imports
    triton, so the Triton kernels run under the interpreter instead of failing."""
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-m", "bench.kernels", "--cpu-smoke", "--op", "swiglu", "--variants", "triton",
                    "--warmup_ms", "1", "--rep_ms", "1", "--out", str(tmp_path)], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    rows = json.loads((tmp_path / "kernels.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["ok"], rows


def test_kernels_grouped_mm_moe_matches_the_loop():
    """The grouped-GEMM MoE baseline computes MiniMind2's loop (fp32 reference, fresh random inputs)."""
    if not kernels.grouped_mm_available():
        pytest.skip("this torch has no grouped matmul")
    from kernels import reference
    g = torch.Generator().manual_seed(3)
    N, H, I, E, K = 40, 16, 24, 4, 2
    x = torch.randn(N, H, generator=g)
    w = [torch.randn(E, I, H, generator=g) * 0.1, torch.randn(E, I, H, generator=g) * 0.1,
         torch.randn(E, H, I, generator=g) * 0.1]
    scores = torch.randn(N, E, generator=g)
    for idle in (None, 2):  # then with expert 2 chosen by no token: an empty group between two others
        if idle is not None:
            scores[:, idle] = float("-inf")
        topk_weight, topk_idx = scores.softmax(-1).topk(K, dim=-1)
        got = kernels.moe_grouped_mm(x, topk_idx, topk_weight, *w)
        want = reference.moe_experts(x.double(), topk_idx, topk_weight.double(), *(t.double() for t in w))
        assert ((got.double() - want).norm() / want.norm()) < 1e-5  # fp32 vs fp64


def test_kernels_budget_starts_no_compile_it_cannot_finish(tmp_path):
    """With less of --budget_s left than a torch.compile needs, the eager variant runs and the compiled one is
    recorded as skipped (so a suite run ends near its budget instead of at the caller's timeout)."""
    budget = kernels.COMPILE_SECONDS_NEEDED / 2
    assert kernels.main(["--cpu-smoke", "--op", "swiglu", "--variants", "torch", "torch_compile", "--budget_s",
                         str(budget), "--warmup_ms", "1", "--rep_ms", "1", "--out", str(tmp_path)]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "kernels.json").read_text())["results"]}
    assert rows["torch"]["status"] == "ok"
    assert rows["torch_compile"]["status"] == "skipped" and "budget" in rows["torch_compile"]["reason"]


def test_throughput_padding_and_plan():
    g = torch.Generator().manual_seed(0)
    for p in (0.0, 0.3, 0.5, 0.7):
        lengths = throughput.row_lengths(4000, 512, p, g)
        assert lengths.min() >= 1 and lengths.max() <= 512
        assert abs(1 - lengths.float().mean().item() / 512 - p) < 0.02  # mean of 4000 uniform draws
    cfg = throughput.tiny_config("small")
    batch, useful = throughput.make_batch(cfg, 8, 64, padded=True, pad_fraction=0.5)
    pads = batch["input_ids"] == cfg.pad_token_id
    assert useful == int((~pads).sum()) and bool((batch["labels"][pads] == -100).all())
    assert bool((batch["labels"][~pads] == batch["input_ids"][~pads]).all())
    batch, useful = throughput.make_batch(cfg, 8, 64, padded=False, pad_fraction=0.5)
    assert useful == 8 * 64 and bool((batch["labels"] == batch["input_ids"]).all())
    order = throughput.plan([512, 1024], ["small", "base"], ["minimind2", "triton", "triton+compile"])
    assert order[:4] == [(512, "small", "minimind2"), (512, "small", "triton"), (512, "base", "minimind2"),
                         (512, "base", "triton")]
    assert order[4] == (512, "small", "triton+compile") and len(order) == len(set(order)) == 12


def test_throughput_counts_fp16_steps_that_skipped_the_optimizer(monkeypatch):
    """A GradScaler that overflows on every step (scale 2^40) skips AdamW on each timed step: counted and flagged;
    with the default scale nothing is skipped."""
    from train import engine
    cfg, device = throughput.tiny_config("small"), torch.device("cpu")
    v = throughput.VARIANTS["minimind2"]  # fp16 + GradScaler (CPU autocast runs fp16 too)
    row = throughput.measure(cfg, v, device, 2, 32, 0.5, warmup=1, repeats=2, peak_flops=None)
    assert row["fp16_skipped_steps"] == 0
    monkeypatch.setattr(engine, "grad_scaler", lambda dev: torch.amp.GradScaler(dev.type, init_scale=2.0 ** 40))
    row = throughput.measure(cfg, v, device, 2, 32, 0.5, warmup=1, repeats=2, peak_flops=None)
    assert row["fp16_skipped_steps"] == 2
    row.update(preset="small", seq_len=32, batch_size=2, variant="minimind2", status="ok")
    assert "2 timed fp16 steps skipped the optimizer" in throughput.markdown(
        {"env": {}, "repeats": 2, "warmup": 1, "pad_fraction": 0.5, "peak_TFLOPs": None, "results": [row]})


def test_throughput_backend_without_the_op_is_unavailable(tmp_path, monkeypatch):
    """A backend missing an op (liger has no MoE) raises NotImplementedError: the row says unavailable, not
    error."""
    from kernels.backend import _missing
    monkeypatch.setattr(throughput, "measure", lambda *args, **kwargs: _missing("liger", "moe_experts", "why")())
    assert throughput.main(["--cpu-smoke", "--preset", "moe", "--variants", "torch", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "throughput.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["unavailable"], rows


def test_throughput_measures_the_minimind3_presets(tmp_path):
    """--preset minimind3-moe on the CPU: a tiny model of its structure, both steps measured; the MFU count's
    attention term uses heads x head_dim, not the hidden size."""
    from minimind.config import MiniMindConfig
    cfg = throughput.tiny_config("minimind3-moe")
    assert cfg.qk_norm and cfg.head_dim == 16 and cfg.num_key_value_heads == 4 and cfg.n_shared_experts == 0
    assert throughput.main(["--cpu-smoke", "--preset", "minimind3-moe", "--variants", "minimind2", "torch",
                            "--warmup", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "throughput.json").read_text())["results"]
    assert [(r["preset"], r["variant"], r["status"]) for r in rows] == [("minimind3-moe", "minimind2", "ok"),
                                                                       ("minimind3-moe", "torch", "ok")]
    from minimind.model import MiniMindForCausalLM
    from train import flops
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig.from_preset("minimind3", head_dim=64))
    assert flops.default_flops_per_token(model, 512) == 6 * flops.matmul_params(model) + 12 * 8 * 8 * 64 * 512


def _throughput_doc(device="NVIDIA H200"):
    """A throughput file as bench.throughput writes it, with round numbers for hand computation."""
    def row(variant, preset, tok_s, step_ms, useful, flops_per_token=1e9):
        return {"preset": preset, "seq_len": 512, "variant": variant, "status": "ok", "useful_tokens_per_s": tok_s,
                "step_ms": step_ms, "tokens_per_step": 16384, "useful_tokens_per_step": useful,
                "flops_per_token": flops_per_token, "peak_GiB": 10.0}
    return {"env": {"device": device, "device_kind": "cuda"}, "results": [
        row("minimind2", "small", 100_000.0, 81.92, 8192), row("triton", "small", 400_000.0, 40.96, 16384),
        row("torch", "small", 200_000.0, 81.92, 16384)]}


def test_cost_arithmetic_by_hand():
    doc = cost.build(_throughput_doc(), kernels={"env": {"device": "NVIDIA H200"}, "ceilings": {"matmul_TFLOPs": 800.0}},
                     tokens={"pretrain": 720_000_000, "sft_mini_512": 360_000_000}, epochs={"sft_mini_512": 2},
                     price=1.5)
    rows = {(r["model"], r["stage"]): r for r in doc["rows"]}
    pre, sft = rows[("small", "pretrain")], rows[("small", "sft_mini_512")]
    # 7.2e8 tokens / 4e5 tokens/s = 1800 s = 0.5 h -> 0.75 yuan at 1.5 yuan/h; the fastest variant is chosen
    assert pre["variant"] == "triton" and pre["hours"] == pytest.approx(0.5) and pre["yuan"] == pytest.approx(0.75)
    assert pre["minimind2_step_hours_here"] == pytest.approx(2.0)  # 7.2e8 / 1e5 s
    # ratio projection: published 1.1 h / (4e5 / 1e5) = 0.275 h
    assert pre["speedup"] == pytest.approx(4.0) and pre["proj_3090_ratio_h"] == pytest.approx(0.275)
    # roofline: t_mm = 16384 * 1e9 / 800e12 = 0.02048 s of the 0.04096 s step; on a 3090
    # 0.02048 * 989/71 + 0.02048 * 4800/936 = 0.285276... + 0.105025... = 0.390301 s per 16384 tokens
    t3090 = 0.02048 * 989 / 71 + 0.02048 * 4800 / 936
    assert pre["proj_3090_roofline_h"] == pytest.approx(7.2e8 / (16384 / t3090) / 3600)
    t3090_low = 0.02048 * 989 / 71 + 0.02048  # the rest unscaled: launch-bound
    assert pre["proj_3090_roofline_low_h"] == pytest.approx(7.2e8 / (16384 / t3090_low) / 3600)
    # two epochs of 3.6e8 tokens at 4e5 tokens/s = 0.5 h
    assert sft["hours"] == pytest.approx(0.5) and sft["token_source"] == "given"
    h = doc["headline"]
    assert h["hours"] == pytest.approx(1.0) and h["yuan"] == pytest.approx(1.5)
    assert h["proj_3090_ratio_h"] == pytest.approx(1.1 / 4 + 2 * 1.0 / 4)  # sft published 1 h per epoch
    assert h["target_met_ratio"] is False  # 0.775 h > 0.7 h
    assert rows[("small", "rlhf")]["token_source"] == "estimate"
    assert rows[("small", "rlhf")]["tokens"] == pytest.approx(0.9e9 / 2.6)
    assert rows[("small", "rlhf")]["hours"] == pytest.approx(0.9e9 / 2.6 * 4 / 3 / 4e5 / 3600)
    assert "MISSED (projection)" in cost.markdown(doc)


def test_cost_knows_minimind3_table_and_data_sizes():
    """minimind-3's presets get minimind-3's stages (not MiniMind2's): token estimates from its published sizes,
    its published 3090 hours per epoch, and the Zero model (pretrain_t2t_mini + sft_t2t_mini) adding up to the
    published 2.31 h / 3.0 yuan; stages without a published size show only the published hours."""
    doc = _throughput_doc()
    for r in list(doc["results"]):
        doc["results"].append({**r, "preset": "minimind3"})
    doc = cost.build(doc, tokens={"sft_t2t_mini": 400_000_000})
    rows = {(r["model"], r["stage"]): r for r in doc["rows"]}
    assert {s for m, s in rows if m == "minimind3"} == {s for s, v in cost.STAGES.items() if v["generation"] == cost.M3}
    assert ("small", "pretrain_t2t_mini") not in rows and ("minimind3", "pretrain") not in rows
    pre = rows[("minimind3", "pretrain_t2t_mini")]
    assert pre["tokens"] == pytest.approx(1.2e9 / 3.70) and pre["token_source"] == "estimate" and pre["seq_len"] == 340
    assert pre["hours"] == pytest.approx(1.2e9 / 3.70 / 4e5 / 3600)  # the fastest variant: 4e5 useful tok/s
    assert pre["proj_3090_ratio_h"] == pytest.approx(1.21 / 4.0)
    assert rows[("minimind3", "pretrain_t2t")]["tokens"] == pytest.approx(10e9 / 3.70)
    assert rows[("minimind3", "sft_t2t_mini")]["hours"] == pytest.approx(4e8 / 4e5 / 3600)
    for stage, published in (("toolcall", 0.9), ("rlaif", 1.1)):
        assert rows[("minimind3", stage)]["published_3090_h"] == published
        assert rows[("minimind3", stage)].get("hours") is None and rows[("minimind3", stage)]["tokens"] is None
    zero = doc["zero"]["minimind3"]
    assert zero["published_3090_h"] == pytest.approx(2.31) and zero["published_3090_yuan"] == pytest.approx(3.0, abs=0.01)
    assert zero["hours"] == pytest.approx(pre["hours"] + 4e8 / 4e5 / 3600)
    assert "minimind-3 Zero (minimind3" in cost.markdown(doc)


def test_cost_datasheet_and_matmul_rate_source():
    """PCIe / NVL parts are not read as the SXM part whose name they contain; a matmul rate measured on another
    device is not used, and the method line says the rate was assumed."""
    assert cost._datasheet("NVIDIA H200") == (989.0, 4800.0)
    assert cost._datasheet("NVIDIA H200 NVL") == (835.0, 4800.0)
    assert cost._datasheet("NVIDIA H100 80GB HBM3") == (989.0, 3350.0)
    assert cost._datasheet("NVIDIA H100 PCIe") == (756.0, 2000.0)
    assert cost._datasheet("NVIDIA A100-SXM4-40GB") == (312.0, 1555.0)
    assert cost._datasheet("NVIDIA A100-SXM4-80GB") == (312.0, 2039.0)
    other = {"env": {"device": "NVIDIA A100-SXM4-80GB"}, "ceilings": {"matmul_TFLOPs": 250.0}}
    for kernels_doc in (other, None):
        doc = cost.build(_throughput_doc(), kernels=kernels_doc)
        assert doc["matmul_rate_TFLOPs"] == pytest.approx(0.8 * 989)
        assert "assumed" in cost._method_line(doc) and "measured here" not in cost._method_line(doc)
    same = {"env": {"device": "NVIDIA H200"}, "ceilings": {"matmul_TFLOPs": 700.0}}
    doc = cost.build(_throughput_doc(), kernels=same)
    assert doc["matmul_rate_TFLOPs"] == pytest.approx(700.0) and "measured here" in cost._method_line(doc)


def test_cost_cli_rejects_bad_pairs(tmp_path):
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(_throughput_doc()))
    with pytest.raises(SystemExit, match="pretraining=5"):
        cost.main(["--throughput", str(path), "--tokens", "pretraining=5"])
    assert cost.main(["--throughput", str(path), "--tokens", "pretrain=7.2e8", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "cost.json").read_text())
    assert doc["rows"][0]["tokens"] == 720_000_000 and (tmp_path / "cost.md").is_file()


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_suite_end_to_end_on_cpu(tmp_path):
    """The suite's plumbing with tiny CPU runs: every part writes its result and at most 8 files remain."""
    out = tmp_path / "suite"
    env = _env(GPU_SUITE_CPU_SMOKE="1", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "summary.md" in files and "logs.tar.gz" in files, files
    summary = (out / "summary.md").read_text()
    assert summary in proc.stdout  # printed last
    for section in ("## Kernel microbenchmarks", "## Training-step throughput", "## Training cost",
                    "## Triton compile report", "## One GRPO step, ours vs MiniMind's full-logits log-probs"):
        assert section in summary, section
    for name in ("env", "kernels", "throughput", "cost", "compile_report"):
        doc = json.loads((out / f"{name}.json").read_text())
        if name in ("kernels", "throughput", "cost"):  # measured on the CPU, and saying so
            assert doc["env"]["device_kind"] == "cpu" and doc["env"]["label"].startswith("CPU smoke"), name
    tp = json.loads((out / "throughput.json").read_text())
    assert [r["variant"] for r in tp["results"]] == ["minimind2", "torch"]
    assert all(r["status"] == "ok" and r["useful_tokens_per_s"] > 0 for r in tp["results"])
    assert tp["results"][1]["speedup"] > 0
    with tarfile.open(out / "logs.tar.gz") as tar:  # bench.rl's JSON travels in the logs (8 files at most)
        rl = json.load(tar.extractfile("rl.json"))
    assert rl["device"] == "cpu" and rl["gen_len"] == 8 and rl["results"]["ours"]["peak_MiB"] > 0
    cr = json.loads((out / "compile_report.json").read_text())
    assert cr["rows"] and not cr["failures"] and all(r["cc"] == 90 for r in cr["rows"])
    if importlib.util.find_spec("pytest_benchmark"):  # the pytest-benchmark part (CPU loaders in the smoke run)
        names = [b["name"] for b in json.loads((out / "benchmarks.json").read_text())["benchmarks"]]
        assert sorted(names) == ["test_loader[pretrain-False]", "test_loader[pretrain-True]"]
        assert "## pytest-benchmark" in summary and "loader_tokens_s" in summary


def test_token_counts_and_padding_through_the_pipeline(tmp_path):
    """cost --data: packed pretrain rows of 512 tokens, counted by the project's loader (the last partial row
    dropped); throughput --pad_fraction_from: the pad share of one document per 512-token row."""
    from minimind.tokenizer import load_tokenizer
    texts = [f"第{i}段：小模型也能学会加法，{i} 加 {i} 等于 {2 * i}。" * 6 for i in range(40)]
    path = tmp_path / "pretrain.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    n = cost.count_tokens("pretrain", str(path))
    tok = load_tokenizer()
    content = sum(len(tok.encode(t)) for t in texts)
    assert n > 0 and n % 512 == 0
    assert content - 512 < n <= content + 2 * len(texts)  # plus at most the two wrapping tokens per document
    pad = throughput.padding_fraction_of(str(path), 512)
    per_row = [len(tok.encode(t)) for t in texts]  # each document alone in a row of 512 (+ up to 2 wrappers)
    assert 1 - (sum(per_row) + 2 * len(texts)) / (512 * len(texts)) - 1e-9 <= pad <= 1 - sum(per_row) / (512 * 40)


def test_summary_survives_missing_and_broken_parts(tmp_path):
    """A suite run where parts died: the summary still names what is missing instead of failing."""
    from bench import report
    (tmp_path / "parts.txt").write_text("| kernels | 124 (timed out) | 115 |\n")
    (tmp_path / "throughput.json").write_text("{broken")
    (tmp_path / "tests.log").write_text("tests/test_moe.py::test_a PASSED\ntests/test_moe.py::test_b FAILED\n")
    text = report.summary(str(tmp_path))
    assert "| kernels | 124 (timed out) | 115 |" in text
    assert "## kernels: no result" in text and "## throughput: could not summarise" in text
    assert "1 PASSED, 1 FAILED" in text


def test_vs_minimind2_data_has_pretrain_hqs_shape(tmp_path):
    """The side-by-side's text: lines of three <|im_start|>...<|im_end|> segments joined by a space, to which
    pretraining's default markers add nothing (MiniMind2's trainer adds nothing either)."""
    from bench import vs_minimind2 as vs
    from minimind.data import load_token_cache
    from minimind.tokenizer import load_tokenizer
    (tmp_path / "README.md").write_text("# MiniMind\n\n此开源项目旨在完全从0开始训练超小语言模型。项目同时开源了极简结构。\n"
                                        "```python\nprint('code is left out')\n```\n", encoding="utf-8")
    (tmp_path / "README_en.md").write_text("* This open-source project aims to train a super-small language model\n"
                                           "  with only 3 RMB cost and 2 hours. It is also a tutorial.\n",
                                           encoding="utf-8")
    train, heldout = vs.make_data(str(tmp_path), str(tmp_path), batch_size=4, steps=5, heldout=3)
    lines = [json.loads(l)["text"] for l in open(train, encoding="utf-8")]
    assert len(lines) == 4 * 4 + 2 and len(open(heldout, encoding="utf-8").readlines()) == 3  # last batch partial
    for line in lines:
        segments = line.split(f"{vs.EOS} {vs.BOS}")
        assert len(segments) == 3 and line.startswith(vs.BOS) and line.endswith(vs.EOS), line
        assert line.count(vs.BOS) == line.count(vs.EOS) == 3 and len(line) < 512
    paragraphs = vs._markdown_paragraphs((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert paragraphs == ["MiniMind", "此开源项目旨在完全从0开始训练超小语言模型。项目同时开源了极简结构。"]  # no code
    meta = load_token_cache(train, "pretrain", load_tokenizer()).meta["markers"]
    assert meta["im_start_added"] == meta["im_end_added"] == 0 and meta["segments"] == 3 * len(lines)


def test_vs_minimind2_instrument_and_heldout_loss(tmp_path):
    """The instrument records one clock pair per optimizer step and keeps every weight file the trainer writes
    (ours overwrites one file, as MiniMind2's does); held-out loss is the mean cross-entropy of every non-pad target."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from bench import vs_minimind2 as vs
    from minimind.tokenizer import BUNDLED_TOKENIZER
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{vs.BOS}the river {i} runs north{vs.EOS} {vs.BOS}数据 {i}{vs.EOS}"})
                            + "\n" for i in range(22)), encoding="utf-8")
    record = tmp_path / "record"
    record.mkdir()
    cmd = [sys.executable, os.path.join(ROOT, "bench", "vs_minimind2.py"), "--instrument", str(record), "--threads",
           "1", "--", "-m", "train.pretrain", "--data_path", str(data), "--out_dir", str(tmp_path / "out"),
           "--device", "cpu", "--hidden_size", "64", "--num_hidden_layers", "2", "--max_seq_len", "24",
           "--batch_size", "4", "--accumulation_steps", "1", "--log_interval", "1", "--save_interval", "2",
           *vs.MINIMIND2_SWITCHES]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((record / "record.json").read_text())
    assert len(rec["steps"]) == 6  # 22 lines in batches of 4, the last partial batch kept (--shuffle 0)
    assert [s for s, _ in rec["weights"]] == [2, 4, 6]  # every 2 steps, and at the end
    cfg = SimpleNamespace(hidden_size=64, num_hidden_layers=2, max_seq_len=24)
    got = vs.heldout_loss(rec["weights"][-1][1], str(data), str(BUNDLED_TOKENIZER), cfg)
    from minimind.config import MiniMindConfig
    from minimind.model import MiniMindForCausalLM
    from minimind.tokenizer import load_tokenizer
    tok = load_tokenizer()
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, vocab_size=tok.vocab_size))
    model.load_state_dict({k: v.float() for k, v in torch.load(rec["weights"][-1][1]).items()})
    total = count = 0
    with torch.no_grad():
        for line in open(data, encoding="utf-8"):
            ids = torch.tensor(tok.encode(json.loads(line)["text"])[:24])[None]
            logits = model(ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert abs(got - total / count) < 1e-5


def test_vs_minimind2_needs_a_minimind2_checkout(tmp_path, capsys):
    from bench import vs_minimind2 as vs
    with pytest.raises(SystemExit):
        vs.main(["--minimind", str(tmp_path)])
    assert "trainer/train_pretrain.py" in capsys.readouterr().err


def test_data_bench_builds_a_given_files_cache_beside_it_once(tmp_path):
    """bench.data --pretrain FILE: the parallel build is the cache training uses (FILE.tokcache), reused when it is
    already there; the in-process build is timed on a copy of the file's first MBs, not on the whole file again."""
    from bench import data as bench_data
    from minimind.tokenizer import load_tokenizer
    tok = load_tokenizer()
    path = tmp_path / "pretrain.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(300)))
    (tmp_path / "tmp").mkdir()
    first = bench_data.bench_cache(tok, path, "pretrain", 2, tmp_path / "tmp", sample_mb=0.01)
    second = bench_data.bench_cache(tok, path, "pretrain", 2, tmp_path / "tmp", sample_mb=0.01)
    assert first["parallel"]["folder"].startswith(f"{path}.tokcache") and not first["parallel"]["reused"]
    assert second["parallel"]["reused"] and second["parallel"]["cache_build_mb_s"] is None
    assert second["parallel"]["folder"] == first["parallel"]["folder"]
    head = first["in_process"]
    assert head["folder"].startswith(str(tmp_path / "tmp")) and head["mb"] <= 0.01 < first["parallel"]["mb"]
    assert head["cache_build_mb_s"] > 0 and head["workers"] == 0
