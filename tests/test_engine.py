"""The engine's parts: schedule, FLOP count, atomic writes, clear errors before training, metrics and wandb."""
import json
import math
import sys
import types

import pytest
import torch

from minimind.config import MiniMindConfig
from minimind.model import MiniMindForCausalLM
from tests.train_helpers import demo_data, one_thread, run_module, tiny_flags  # noqa: F401  (fixtures)
from train import distill, dpo, engine, flags, flops, metrics, pretrain, sft
from train.checkpoint import atomic_save
from train.engine import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_schedule_is_minimind2_cosine_after_a_linear_warmup():
    lr, total = 1e-3, 100
    assert engine.lr_at(0, total, lr, 0) == pytest.approx(1.1e-3)  # lr/10 + lr at step 0
    assert engine.lr_at(total, total, lr, 0) == pytest.approx(1e-4)  # floor lr/10 at the end
    assert engine.lr_at(50, total, lr, 0) == pytest.approx(1e-4 + 0.5e-3)
    assert engine.lr_at(0, total, lr, 10) == pytest.approx(engine.lr_at(0, total, lr, 0) / 10)
    assert engine.lr_at(9, total, lr, 10) == pytest.approx(engine.lr_at(9, total, lr, 0))


def test_train_step_averages_the_micro_batch_gradients():
    """Plain SGD, no clipping: one train_step over A micro-batches moves each weight by exactly -lr times the mean
    of the A per-micro-batch gradients (computed here one by one), and returns the mean loss and summed metrics.
    With clipping far above the norm, the grad norm it returns is that mean gradient's norm."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    micro_batches = [{"x": torch.randn(4, 5)} for _ in range(3)]

    def step_fn(batch):
        return (model(batch["x"]) ** 2).mean(), {"rows": torch.tensor(4.0)}

    losses, grads = [], []
    for batch in micro_batches:
        loss = step_fn(batch)[0]
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    mean_grad = [sum(g[i] for g in grads) / 3 for i in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0)
    loss, metrics, norm = engine.train_step(step_fn, micro_batches, optimizer, params, 0.5, grad_clip=0)
    assert norm is None and loss.item() == pytest.approx(sum(losses) / 3) and metrics["rows"].item() == 12.0
    for p, b, g in zip(model.parameters(), before, mean_grad):
        torch.testing.assert_close(p.detach(), b - 0.5 * g, rtol=1e-6, atol=1e-7)
        assert p.grad is None  # zeroed for the next step
    grads = [torch.autograd.grad(step_fn(b)[0], params) for b in micro_batches]
    want = torch.cat([sum(g[i] for g in grads).flatten() / 3 for i in range(2)]).norm()
    _, _, norm = engine.train_step(step_fn, micro_batches, optimizer, params, 0.5, grad_clip=1e9)
    assert norm.item() == pytest.approx(want.item(), rel=1e-6)


def test_accumulation_steps_take_the_step_of_one_big_batch(demo_data, tmp_path):  # noqa: F811
    """Packed pretraining rows are all full, so --batch_size 2 --accumulation_steps 2 takes the same optimizer
    steps as --batch_size 4 (the loader cuts the same shuffled rows): same losses and the same logged grad norms
    (AdamW and clipping hide a constant factor on the gradient in the losses, not in the grad norm)."""
    logs = {}
    for batch_size, accumulation in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch_size}"
        pretrain.main(tiny_flags(out, demo_data["pretrain"], steps=3, batch_size=batch_size,
                                 extra=["--accumulation_steps", accumulation]))
        logs[accumulation] = [json.loads(x) for x in (out / "pretrain_metrics.jsonl").read_text().splitlines()]
    for one, two in zip(logs[1], logs[2], strict=True):
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize("use_moe", [False, True])
def test_flops_per_token_counts_matmuls_and_attention(use_moe):
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=1000, use_moe=use_moe)
    model = MiniMindForCausalLM(cfg)
    H, I, L, V, kv = 64, cfg.intermediate_size, 2, 1000, 2 * 16
    attn = H * H * 2 + 2 * H * kv  # q, o and k, v
    mlp = 3 * H * I
    if use_moe:  # gate + top-2 of 4 routed experts + 1 shared expert
        mlp = H * 4 + 2 * 3 * H * I + 3 * H * I
    n = L * (attn + mlp) + V * H  # + lm_head (tied with the embedding, which is a lookup, not a matmul)
    assert flops.matmul_params(model) == n
    assert flops.default_flops_per_token(model, 128) == 6 * n + 12 * L * H * 128
    assert flops.forward_flops_per_token(model, 128) == 2 * n + 4 * L * H * 128  # a frozen model's forward


def test_run_flops_add_one_forward_of_each_frozen_model():
    """Trained model: the stage's count (LoRA's here) or 6N + 12LdT; each model registered with add_frozen:
    2N + 4LdT; anything else in run.extras counts nothing."""
    from minimind.lora import apply_lora
    from train import lora
    from train.distributed import Dist

    def cfg(hidden, layers, heads):
        return MiniMindConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              num_key_value_heads=2, vocab_size=500)
    student, teacher, other = (MiniMindForCausalLM(cfg(64, 2, 4)), MiniMindForCausalLM(cfg(96, 3, 8)),
                               MiniMindForCausalLM(cfg(32, 1, 2)))
    run = engine.Run(types.SimpleNamespace(out_dir="out", compile=False), student.config, None,
                     torch.device("cpu"), torch.float32, Dist())
    n_s, n_t, n_o = (flops.matmul_params(m) for m in (student, teacher, other))
    T = 100
    assert flops.run_flops_per_token(pretrain.STAGE, student, run)(T) == 6 * n_s + 12 * 2 * 64 * T
    assert run.add_frozen("teacher", teacher) is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    run.extras["cache"] = {"not": "a model"}
    run.add_frozen("other", other)
    assert run.frozen_models() == [teacher, other]
    # teacher: d_attn = 8 heads x 12 = 96; other: 2 heads x 16 = 32
    want = 6 * n_s + 12 * 2 * 64 * T + (2 * n_t + 4 * 3 * 96 * T) + (2 * n_o + 4 * 1 * 32 * T)
    assert flops.run_flops_per_token(pretrain.STAGE, student, run)(T) == want
    del run.extras["other"]
    apply_lora(student, 4, None, "square", generator=torch.Generator().manual_seed(0))
    assert flops.run_flops_per_token(lora.STAGE, student, run)(T) == \
        lora.flops_per_token(student, T) + 2 * n_t + 4 * 3 * 96 * T


def test_peak_flops_is_unknown_on_cpu_unless_given():
    assert flops.peak_flops(torch.device("cpu")) is None
    assert flops.peak_flops(torch.device("cpu"), 100.0) == 1e14


@pytest.mark.parametrize("name, tflops", [("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
                                          ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA GeForce RTX 3090", 71.0), ("Some Future GPU", None)])
def test_peak_flops_takes_the_most_specific_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got = flops.peak_flops(torch.device("cuda", 0))
    assert got == (None if tflops is None else tflops * 1e12)


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    atomic_save({"x": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # and no temporary left


def test_errors_name_the_flag_or_file_before_training(demo_data, tmp_path):  # noqa: F811
    def fails(match, **kw):
        argv = tiny_flags(tmp_path, kw.pop("data", demo_data["pretrain"]), extra=kw.pop("extra", ()))
        with pytest.raises(ConfigError, match=match):
            kw.pop("stage", pretrain).main(argv)
        assert not (tmp_path / "pretrain_metrics.jsonl").exists()  # nothing trained

    fails(r"--data_path .*nope.jsonl: no such file", data=tmp_path / "nope.jsonl")
    fails(r"--from_weight pretrain: no such file .*pretrain_64.pth", stage=sft, data=demo_data["sft"],
          extra=["--from_weight", "pretrain"])
    fails(r"--from_weight .*missing.pth: no such file", extra=["--from_weight", tmp_path / "missing.pth"])
    fails(r"--dtype fp16 needs a CUDA device", extra=["--dtype", "fp16"])
    if not torch.cuda.is_available():
        fails(r"--kernels liger: kernels='liger' is unavailable", extra=["--kernels", "liger"])
    fails(r"--ref_weight nothere: no such file .*nothere_64.pth", stage=dpo, data=demo_data["dpo"],
          extra=["--ref_weight", "nothere", "--from_weight", "none"])
    fails(r"--teacher_weight nothere: no such file .*nothere_64.pth", stage=distill, data=demo_data["sft"],
          extra=["--teacher_weight", "nothere", "--teacher_hidden_size", "64", "--from_weight", "none"])
    fails(r"--accumulation_steps must be >= 1", extra=["--accumulation_steps", "0"])
    fails(r"--deepspeed .*nope.json: no such file", extra=["--deepspeed", tmp_path / "nope.json"])
    fails(r"--tokenizer .*: ", extra=["--tokenizer", tmp_path])
    fails(r"gives \d+ batches of 4 per process per epoch, fewer than --accumulation_steps 1000", extra=["--accumulation_steps", "1000"])
    fails(r"bad model flags: hidden_size 64 is not divisible by num_attention_heads 5",
          extra=["--num_attention_heads", "5"])
    # a checkpoint of another shape: names the file and the flag to change
    big = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=6400))
    torch.save(big.state_dict(), tmp_path / "pretrain_64.pth")
    fails(r"pretrain_64.pth does not fit the model: it has 3 layers \(model has --num_hidden_layers 2\)",
          stage=sft, data=demo_data["sft"], extra=["--from_weight", "pretrain"])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    fails(r"junk.pth: not a readable checkpoint", extra=["--from_weight", tmp_path / "junk.pth"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case")
def test_triton_kernels_on_the_cpu_need_the_interpreter(demo_data, tmp_path, monkeypatch):  # noqa: F811
    from kernels import backend
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(backend, "_cache", {})  # not the interpreted backend another test may have built
    with pytest.raises(ConfigError, match="--kernels triton: kernels='triton' is unavailable: no CUDA GPU here"):
        pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], extra=["--kernels", "triton"]))


def test_bad_flag_on_the_command_line_is_a_usage_error(tmp_path):
    r = run_module(["-m", "train.pretrain", "--epochs", "two"])
    assert r.returncode == 2 and "--epochs: invalid int value" in r.stderr
    r = run_module(["-m", "train.pretrain", "--data_path", str(tmp_path / "none.jsonl")])
    assert r.returncode == 2 and "none.jsonl: no such file" in r.stderr and "Traceback" not in r.stderr
    # an error in the data: that line alone, not the usage block of every flag before it
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n', encoding="utf-8")
    r = run_module(["-m", "train.pretrain", *tiny_flags(tmp_path, tmp_path / "bad.jsonl")])
    assert r.returncode == 2 and "usage:" not in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"python -m train.pretrain: error: {tmp_path / 'bad.jsonl'}:2: missing field 'text'")


def test_help_shows_minimind2_flags_and_the_gpu_recipe():
    text = flags.build_parser(pretrain.STAGE).format_help()
    for flag in ("--epochs", "--batch_size", "--learning_rate", "--accumulation_steps", "--grad_clip",
                 "--warmup_iters", "--log_interval", "--save_interval", "--hidden_size", "--num_hidden_layers",
                 "--max_seq_len", "--use_moe", "--data_path", "--from_weight", "--from_resume", "--use_wandb",
                 "--wandb_project", "--dtype", "--device", "--out_dir", "--kernels", "--preset", "--compile",
                 "--attn", "--deepspeed", "--seed", "--skip_bad_records", "--no_pack"):
        assert flag in text, flag
    assert "--preset small" in text
    args = flags.build_parser(pretrain.STAGE).parse_args([])
    assert (args.epochs, args.batch_size, args.learning_rate, args.accumulation_steps, args.max_seq_len) == \
        (1, 32, 5e-4, 8, 512)
    args = flags.build_parser(sft.STAGE).parse_args([])
    assert (args.epochs, args.batch_size, args.learning_rate, args.from_weight) == (2, 16, 5e-7, "pretrain")


def test_preset_and_explicit_flags():
    args = flags.build_parser(pretrain.STAGE).parse_args(["--preset", "moe", "--num_hidden_layers", "2"])
    cfg = flags.config_from_args(args, 6400)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.use_moe) == (640, 2, True)
    cfg = flags.config_from_args(flags.build_parser(pretrain.STAGE).parse_args([]), 6400)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.use_moe) == (512, 8, False)  # MiniMind2's defaults
    # minimind-3: another width keeps the preset's rules (pi MLP width, head dim hidden / heads, q/k norm, eps)
    args = flags.build_parser(pretrain.STAGE).parse_args(["--preset", "minimind3", "--hidden_size", "512"])
    cfg = flags.config_from_args(args, 6400)
    assert (cfg.intermediate_size, cfg.head_dim, cfg.qk_norm, cfg.rms_norm_eps) == (1664, 64, True, 1e-6)
    args = flags.build_parser(pretrain.STAGE).parse_args(
        ["--preset", "moe", "--qk_norm", "1", "--head_dim", "32", "--num_experts_per_tok", "1", "--n_shared_experts",
         "0", "--aux_loss_scope", "batch", "--aux_loss_alpha", "1e-3", "--intermediate_size", "256",
         "--rms_norm_eps", "1e-6"])
    cfg = flags.config_from_args(args, 6400)
    assert (cfg.qk_norm, cfg.head_dim, cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.aux_loss_scope,
            cfg.aux_loss_alpha, cfg.intermediate_size, cfg.rms_norm_eps) == (True, 32, 1, 0, "batch", 1e-3, 256, 1e-6)
    with pytest.raises(engine.ConfigError, match="head_dim must be even"):
        flags.config_from_args(flags.build_parser(pretrain.STAGE).parse_args(["--head_dim", "33"]), 6400)


def test_metrics_log_and_wandb_offline(demo_data, tmp_path, monkeypatch):  # noqa: F811
    """Every log step lands in the JSONL file and, with --use_wandb, in wandb (a stand-in module here: the real
    one is an optional extra); offline mode when there is no API key."""
    calls = {}
    run = types.SimpleNamespace(log=lambda d, step: calls.setdefault("log", []).append((step, d)),
                                finish=lambda: calls.setdefault("finish", True))
    fake = types.SimpleNamespace(init=lambda **kw: calls.setdefault("init", kw) and run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=2, extra=["--use_wandb"]))
    records = [json.loads(x) for x in (tmp_path / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["mfu"] is None and r["lr"] > 0
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "MiniMind-Pretrain"
    assert [s for s, _ in calls["log"]] == [1, 2] and calls["finish"]
    assert result["final_loss"] == records[-1]["loss"]


def test_a_run_reports_its_data_its_schedule_and_where_the_weights_went(demo_data, tmp_path, capsys):  # noqa: F811
    """Before training: a line on the data (every entry of Loader.stats(), last the markers pretraining added: one
    pair to each of the demo's plain texts) and one on the lr schedule (the bar's lr starts at 1.1x
    --learning_rate); after: steps, final loss and the weight file."""
    from minimind.data import build_loader
    from minimind.tokenizer import load_tokenizer
    result = pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=2))
    out = capsys.readouterr().out
    stats = build_loader("pretrain", demo_data["pretrain"], load_tokenizer(), max_seq_len=64, batch_size=4).stats()
    assert f"(pretrain): {stats['records']:,} records, {stats['tokens']:,} tokens in {stats['batches']:,} batches " \
           f"per epoch, padding 0.0% of {stats['padded_tokens']:,} token slots, skipped records 0, dropped tokens " \
           f"{stats['dropped_tokens']:,}, markers auto: {stats['records']} <|im_start|> and {stats['records']} " \
           f"<|im_end|> added for {stats['records']} segments (0 of {stats['records']} texts carried their own)\n" in out
    assert "--learning_rate 0.003: from 0.0033 (1.1x) down to 0.0003 over 2 steps" in out
    assert "pretrain done: 2 steps in " in out
    assert f"final loss {result['final_loss']:.4f}; weights -> {result['weights_path']}, metrics log -> " \
           f"{result['metrics_path']}" in out
    # an entry the summary has no words for is still shown (a loader may count more, e.g. document markers)
    line = metrics.data_summary("d.jsonl", dict(stats, kind="pretrain", markers=1234), world_size=2)
    assert line.endswith("markers 1,234") and "per epoch (each of 2 processes)" in line


def test_trainable_subset_and_custom_weights(demo_data, tmp_path):  # noqa: F811
    """A stage that trains only the norms: everything else is bit-identical afterwards, and its weights function
    decides what the weight file holds."""
    def only_norms(model):
        return [p for n, p in model.named_parameters() if "norm" in n]
    stage = engine.Stage(name="normtune", data_kind="pretrain", save_prefix="normtune", loss=pretrain.lm_loss,
                         trainable=only_norms,
                         weights=lambda m, run: {k: v for k, v in m.state_dict().items() if "norm" in k})
    torch.manual_seed(42)
    result = engine.main(stage, tiny_flags(tmp_path, demo_data["pretrain"], steps=2))
    torch.manual_seed(42)
    start = MiniMindForCausalLM(result["model"].config)
    changed = {k for k, v in result["model"].state_dict().items() if not torch.equal(v, start.state_dict()[k])}
    assert changed and all("norm" in k for k in changed)
    saved = torch.load(result["weights_path"], weights_only=True)
    assert saved and all("norm" in k for k in saved)


def test_bf16_autocast_and_moe_train_on_cpu(demo_data, tmp_path):  # noqa: F811
    """--dtype bf16 (CPU autocast, fp32 master weights, no GradScaler) with an MoE model: the MoE file name,
    a finite falling loss, the auxiliary loss in the metrics."""
    result = pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=3,
                                      extra=["--dtype", "bf16", "--use_moe", "1"]))
    assert result["weights_path"].endswith("pretrain_64_moe.pth")
    assert all(p.dtype == torch.float32 for p in result["model"].parameters())
    records = [json.loads(x) for x in (tmp_path / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] and records[0]["aux_loss"] > 0
    saved = torch.load(result["weights_path"], weights_only=True)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in saved  # MiniMind2's per-expert keys
