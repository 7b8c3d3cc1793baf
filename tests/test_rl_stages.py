"""train.grpo and train.ppo on the one engine: the reward rises on a tiny CPU run, a stopped-and-resumed run equals
the uninterrupted one bit for bit, 2 gloo processes equal 1 with the same global batch, --compile and the triton
kernels run, and every bad flag or record is an error before training.

The reward of the learning tests is the share of digits among a reply's visible characters (`digit_share`): a
randomly initialised model's nearly uniform 16-token replies hold about 1-2% digits, and every reply scores
something, so the advantages have a signal from the first step (a single word to say is too rare in random replies
for 24 steps of a tiny model to find)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kernels import backend
from minimind.data import DataError
from tests.reference_files import reference_folder
from tests.test_compile import counting_backend, fresh_dynamo  # noqa: F401  (fixture)
from tests.train_helpers import ROOT, demo_data, one_thread, run_module  # noqa: F401  (fixtures)
from train import engine, grpo, ppo

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = "tests.test_rl_stages:digit_share"


def digit_share(prompts, replies):
    shares = []
    for reply in replies:
        visible = [c for c in reply if not c.isspace()]
        shares.append(sum(c.isdigit() for c in visible) / max(1, len(visible)))
    return shares


def rl_flags(out_dir, data_path, *, steps=4, batch_size=2, extra=()):
    """A hidden-64, 2-layer random model (from --seed), fp32 on the CPU, 16-token replies to the demo's SFT
    questions (the rl kind reads SFT files: the prompt is every message but the last)."""
    return ["--data_path", str(data_path), "--out_dir", str(out_dir), "--hidden_size", "64", "--num_hidden_layers",
            "2", "--num_attention_heads", "4", "--num_key_value_heads", "2", "--max_seq_len", "64", "--max_gen_len",
            "16", "--batch_size", str(batch_size), "--max_steps", str(steps), "--log_interval", "1",
            "--save_interval", "1000", "--dtype", "fp32", "--device", "cpu", "--kernels", "torch", "--from_weight",
            "none", "--learning_rate", "1e-2", "--reward", REWARD, *map(str, extra)]


def _rewards(result):
    return [json.loads(line)["reward"] for line in open(result["metrics_path"])]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grpo_reward_rises(demo_data, tmp_path):  # noqa: F811
    result = grpo.main(rl_flags(tmp_path, demo_data["sft"], steps=24, batch_size=4, extra=["--beta", "0"]))
    rewards = _rewards(result)
    # measured (torch 2.13, CPU): about 0.015 over the first steps, 0.15 over the last ones
    assert sum(rewards[-5:]) / 5 > 3 * sum(rewards[:5]) / 5 + 0.05, rewards
    record = json.loads(open(result["metrics_path"]).readline())
    for key in ("reward", "reward_std", "kl", "response_len", "clip_fraction", "rollout_s", "rollout_tokens_per_s",
                "tokens_per_s", f"reward_{REWARD}"):
        assert key in record, key
    assert (tmp_path / "grpo_64.pth").exists() and (tmp_path / "grpo_64.json").exists()


def test_loss_types_take_the_same_first_step_and_beta_the_second(demo_data, tmp_path):  # noqa: F811
    """At the first step the ratio is 1 (the sampling pass's own log-probs) and the policy is the reference: both
    loss types have the gradient -A * grad(pi), so they take the same step, GRPO's loss being 0 there (advantages sum
    to 0 in each group) and CISPO's -A * pi not; the KL term has no gradient there either, and shows at step 2."""
    def run(name, *extra, steps=1):
        result = grpo.main(rl_flags(tmp_path / name, demo_data["sft"], steps=steps, extra=extra))
        return result, [json.loads(line) for line in open(result["metrics_path"])]
    g, (g1,) = run("grpo", "--loss_type", "grpo")
    c, (c1,) = run("cispo", "--loss_type", "cispo")
    assert g1["ratio"] == pytest.approx(1.0, abs=1e-5) and g1["kl"] == pytest.approx(0.0, abs=1e-6)
    assert g["final_loss"] == pytest.approx(0.0, abs=1e-6) and abs(c["final_loss"]) > 1e-3
    # Adam's first step is lr * g / (|g| + 1e-8): where |g| is near 1e-8 the two formulas' fp32 rounding is
    # amplified to a visible part of the step (lr 1.1e-2); such weights are a few in 10^5, the rest agree to 1e-6
    for k, v in g["model"].state_dict().items():
        off = (v - c["model"].state_dict()[k]).abs() > 1e-6
        assert off.float().mean().item() < 1e-3, (k, off.sum().item())
    _, (b1, b2) = run("beta", "--beta", "0.5", steps=2)
    _, (z1, z2) = run("nobeta", "--beta", "0", steps=2)
    assert b1["loss"] == pytest.approx(z1["loss"], abs=1e-7) and b2["kl"] > 0
    assert b2["loss"] == pytest.approx(z2["loss"] + 0.5 * b2["kl"], rel=0.2)  # the KL term, per row then mean


def test_ppo_reward_rises_and_writes_actor_and_critic(demo_data, tmp_path):  # noqa: F811
    result = ppo.main(rl_flags(tmp_path, demo_data["sft"], steps=20, batch_size=16,
                               extra=["--mini_batch_size", "8", "--critic_learning_rate", "1e-2", "--kl_coef", "0",
                                      "--epochs", "10"]))
    rewards = _rewards(result)
    # measured (torch 2.13, CPU): about 0.02 over the first steps, 0.15-0.6 over the last ones (the demo data's
    # size changes how fast); a policy that does not learn stays near its first value
    assert sum(rewards[-5:]) / 5 > 3 * sum(rewards[:5]) / 5 + 0.05, rewards
    actor = torch.load(tmp_path / "ppo_actor_64.pth", weights_only=True)
    critic = torch.load(tmp_path / "ppo_critic_64.pth", weights_only=True)
    assert actor.keys() == result["model"].actor.state_dict().keys() and "lm_head.weight" in actor
    assert "value_head.weight" in critic and all(v.dtype == torch.float16 for v in critic.values())
    record = json.loads(open(result["metrics_path"]).readline())
    for key in ("reward", "value_loss", "policy_loss", "approx_kl", "kl", "clip_fraction", "rollout_tokens_per_s"):
        assert key in record, key


def test_ppo_critic_starts_from_the_policy_and_learns_at_its_own_rate(demo_data, tmp_path):  # noqa: F811
    result = ppo.main(rl_flags(tmp_path, demo_data["sft"], steps=1, batch_size=4,
                               extra=["--ppo_update_iters", "1", "--mini_batch_size", "4", "--learning_rate", "1e-3",
                                      "--critic_learning_rate", "4e-3"]))
    model = result["model"]
    state = torch.load(result["resume_path"], weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 4.0]
    assert groups[1]["lr"] == pytest.approx(4 * groups[0]["lr"])
    assert len(groups[0]["params"]) == len(list(model.actor.parameters()))
    # one AdamW step from the same start: the body moved, by about lr per weight (Adam's first step is lr * sign)
    torch.manual_seed(42)  # what the engine seeds before building the policy
    from minimind.model import MiniMindForCausalLM
    start = MiniMindForCausalLM(model.actor.config)
    moved_actor = (model.actor.model.layers[0].mlp.up_proj.weight - start.model.layers[0].mlp.up_proj.weight).abs()
    moved_critic = (model.critic.model.layers[0].mlp.up_proj.weight - start.model.layers[0].mlp.up_proj.weight).abs()
    assert moved_actor.max().item() == pytest.approx(1.1e-3, rel=0.05)  # 1.1 x lr at step 0
    assert moved_critic.max().item() == pytest.approx(4.4e-3, rel=0.05)


@pytest.mark.parametrize("stage, extra", [(grpo, ["--accumulation_steps", "2"]),
                                          (ppo, ["--mini_batch_size", "1", "--ppo_update_iters", "2"])])
def test_stopped_and_resumed_rl_run_is_bit_identical(demo_data, tmp_path, stage, extra):  # noqa: F811
    """4 steps straight vs 2, stop, resume, 2: same losses, rewards and weights, bit for bit; the rollouts' RNG is
    their place in the data (row seeds from --seed, epoch and record), which the resume state holds."""
    straight = stage.main(rl_flags(tmp_path / "a", demo_data["sft"], steps=4, extra=extra))
    first = stage.main(rl_flags(tmp_path / "b", demo_data["sft"], steps=4, extra=[*extra, "--stop_after", "2"]))
    assert first["interrupted"] and first["steps"] == 2
    second = stage.main(rl_flags(tmp_path / "b", demo_data["sft"], steps=4, extra=[*extra, "--from_resume", "1"]))
    assert second["steps"] == 4
    assert first["losses"] + second["losses"] == straight["losses"]
    assert _rewards(second) == _rewards(straight)
    a, b = _state(straight["model"]), _state(second["model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_sigterm_saves_actor_critic_and_resume_state(demo_data, tmp_path):  # noqa: F811
    argv = rl_flags(tmp_path, demo_data["sft"], steps=10000, extra=["--epochs", "100"])
    proc = subprocess.Popen([sys.executable, "-m", "train.ppo", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "ppo_metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == engine.STOPPED_EXIT_STATUS, err[-2000:]
    state = torch.load(tmp_path / "ppo_actor_64_resume.pt", weights_only=False)
    assert state["step"] >= 1 and not state["finished"]
    assert (tmp_path / "ppo_actor_64.pth").exists() and (tmp_path / "ppo_critic_64.pth").exists()
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("module", ["train.grpo", "train.ppo"])
def test_two_processes_equal_one_with_the_same_global_batch(demo_data, tmp_path, module):  # noqa: F811
    """Each process rolls out its own prompts (global batches r, r + W, ...): 2 gloo processes x 1 micro-batch take
    the steps 1 process takes with 2 micro-batches; PPO's early-stop KL is averaged over the processes."""
    stage = grpo if module == "train.grpo" else ppo
    extra = ["--mini_batch_size", "1", "--early_stop_kl", "1e-4"] if stage is ppo else []  # stops early
    r = run_module(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module,
                    *rl_flags(tmp_path / "two", demo_data["sft"], steps=3, extra=extra)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    name = "grpo_64" if stage is grpo else "ppo_actor_64"
    two = torch.load(tmp_path / "two" / f"{name}_resume.pt", weights_only=False)
    assert two["world_size"] == 2 and two["loader"]["position"] == 6
    one = stage.main(rl_flags(tmp_path / "one", demo_data["sft"], steps=3,
                              extra=[*extra, "--accumulation_steps", "2"]))
    for k, v in one["model"].state_dict().items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
    logged = [json.loads(line) for line in open(tmp_path / "two" / f"{stage.STAGE.name}_metrics.jsonl")]
    assert [x["reward"] for x in logged] == pytest.approx(_rewards(one), abs=1e-6)


@pytest.mark.usefixtures("fresh_dynamo")
def test_grpo_compile_trains_compiled_blocks_and_rolls_out_eager(demo_data, tmp_path, monkeypatch):  # noqa: F811
    calls, real = [], engine.compile_blocks
    monkeypatch.setattr(engine, "compile_blocks", lambda model: real(model, backend=counting_backend(calls)))
    eager = grpo.main(rl_flags(tmp_path / "eager", demo_data["sft"], steps=2))
    compiled = grpo.main(rl_flags(tmp_path / "compiled", demo_data["sft"], steps=2, extra=["--compile"]))
    # per step the policy's 2 blocks with gradients and the reference's 2 without; none for the 16 decode steps
    assert sorted(calls) == [False] * 4 + [True] * 4
    assert compiled["losses"] == eager["losses"]


def test_grpo_on_triton_kernels_matches_torch(demo_data, tmp_path):  # noqa: F811
    """One step on the triton backend (Triton's interpreter on the CPU) against the torch one: same rollouts,
    same loss to fp32 rounding."""
    # the interpreter runs a kernel's programs one by one in Python (RoPE's dominate): 1 prompt, 2 samples, short
    flags = dict(steps=1, batch_size=1, extra=["--max_gen_len", "3", "--num_generations", "2", "--max_seq_len", "24"])
    torch_run = grpo.main(rl_flags(tmp_path / "torch", demo_data["sft"], **flags))
    argv = rl_flags(tmp_path / "triton", demo_data["sft"], **flags)
    argv[argv.index("--kernels") + 1] = "triton"
    triton_run = grpo.main(argv)
    assert _rewards(triton_run) == _rewards(torch_run)
    assert triton_run["final_loss"] == pytest.approx(torch_run["final_loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kernels", ["triton", "liger"])
def test_grpo_on_cuda_kernels_matches_torch(demo_data, tmp_path, kernels):  # noqa: F811
    """Two GRPO steps on a GPU (fp32) on the triton or liger backend against the torch one on the same GPU: same
    rollouts, same losses to fp32 rounding. bench/gpu_suite.sh runs it; skipped without CUDA (liger: without
    liger-kernel too)."""
    reason = (backend.liger_unavailable_reason() if kernels == "liger"
              else None if torch.cuda.is_available() else "needs a CUDA GPU")
    if reason:
        pytest.skip(reason)

    def run(name):
        argv = rl_flags(tmp_path / name, demo_data["sft"], steps=2)
        argv[argv.index("--device") + 1] = "cuda"
        argv[argv.index("--kernels") + 1] = name
        return grpo.main(argv)
    reference, got = run("torch"), run(kernels)
    assert _rewards(got) == _rewards(reference)
    assert [step for step, _ in got["losses"]] == [step for step, _ in reference["losses"]] == [1, 2]
    assert [loss for _, loss in got["losses"]] == pytest.approx([loss for _, loss in reference["losses"]], rel=1e-4,
                                                                abs=1e-6)


# ----------------------------------------------------------------------------------------- errors before training

BAD_FLAGS = [
    (grpo, ["--num_generations", "1"], "--num_generations must be >= 2"),
    (grpo, ["--beta", "-0.1"], "--beta must be >= 0"),
    (grpo, ["--epsilon", "1.5"], "--epsilon must be in"),
    (grpo, ["--epsilon_high", "0"], "--epsilon_high must be > 0"),
    (grpo, ["--loss_type", "ppo"], None),  # argparse's own choices
    (grpo, ["--max_gen_len", "0"], "--max_gen_len must be >= 1"),
    (grpo, ["--temperature", "0"], "--temperature must be > 0"),
    (grpo, ["--thinking_ratio", "1.5"], "--thinking_ratio must be in"),
    (grpo, ["--thinking_ratio", "0.5"], "cannot switch thinking"),  # MiniMind2's template
    (grpo, ["--reward", "nonsense"], "not one of rules, answer, model"),
    (grpo, ["--reward", "no_such_module_q:f"], "cannot import no_such_module_q"),
    (grpo, ["--reward", "model"], "--reward model needs --reward_model_path"),
    (grpo, ["--reward_model_path", "/no/such/rm"], "no such folder"),
    (grpo, ["--reward", "answer"], "sft.jsonl:1: the record has no 'answer' field"),
    (grpo, ["--reward", f"answer,{REWARD}"], "sft.jsonl:1: the record has no 'answer' field.*no record has one"),
    (grpo, ["--max_gen_len", "40000"], "exceed the model's context"),
    (ppo, ["--ppo_update_iters", "0"], "--ppo_update_iters must be >= 1"),
    (ppo, ["--mini_batch_size", "0"], "--mini_batch_size must be >= 1"),
    (ppo, ["--gamma", "1.5"], "--gamma must be in"),
    (ppo, ["--early_stop_kl", "0"], "--early_stop_kl must be > 0"),
    (ppo, ["--critic_learning_rate", "0"], "--critic_learning_rate must be > 0"),
    (ppo, ["--cliprange_value", "-1"], "--cliprange_value must be >= 0"),
    (ppo, ["--thinking_ratio", "0.2"], "cannot switch thinking"),
]


@pytest.mark.parametrize("stage, flags, message", BAD_FLAGS, ids=[f"{s.STAGE.name}{f}" for s, f, _ in BAD_FLAGS])
def test_bad_flags_are_errors_before_training(demo_data, tmp_path, monkeypatch, stage, flags, message):  # noqa: F811
    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran")
    monkeypatch.setattr(engine, "train_step", no_training)
    argv = rl_flags(tmp_path, demo_data["sft"], extra=flags)
    if message is None:
        with pytest.raises(SystemExit):
            stage.main(argv)
        return
    with pytest.raises(engine.ConfigError, match=message.replace("(", r"\(")):
        stage.main(argv)


def test_bad_record_is_a_file_line_error(tmp_path):
    path = tmp_path / "rl.jsonl"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant",
                                                                                     "content": ""}]}) + "\n"
                    + json.dumps({"conversations": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(DataError, match="rl.jsonl:2: field 'conversations' has no assistant turn"):
        grpo.main(rl_flags(tmp_path, path))


def test_records_without_an_answer_beside_other_rewards(tmp_path, capsys):
    """Prompts with and without an `answer` mix when another reward scores the others (the demo's GRPO data); with
    --reward answer alone the first record without one is an error."""
    path = tmp_path / "rl.jsonl"
    rows = [{"conversations": [{"role": "user", "content": f"What is {i} plus 1?"},
                               {"role": "assistant", "content": ""}], **({"answer": i + 1} if i % 2 else {})}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(engine.ConfigError, match="rl.jsonl:1: the record has no 'answer' field.*4 of 8 records"):
        grpo.main(rl_flags(tmp_path / "alone", path, steps=1, extra=["--reward", "answer"]))
    result = grpo.main(rl_flags(tmp_path / "mixed", path, steps=1, extra=["--reward", f"answer,{REWARD}"]))
    assert result["steps"] == 1
    assert "4 of 8 records have no 'answer' field (the first: " in capsys.readouterr().out


def test_thinking_ratio_with_a_minimind3_tokenizer(demo_data, tmp_path):  # noqa: F811
    argv = rl_flags(tmp_path, demo_data["sft"], steps=1, extra=[
        "--tokenizer", reference_folder("minimind3-tokenizer"), "--preset", "minimind3", "--head_dim", "24",
        "--thinking_ratio", "1"])
    result = grpo.main(argv)
    assert result["steps"] == 1
    state = torch.load(result["resume_path"], weights_only=False)
    assert state["loader"]["thinking_ratio"] == 1.0 and state["args"]["thinking_ratio"] == 1.0
