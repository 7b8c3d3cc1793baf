"""--deepspeed with the shipped ZeRO-1 and ZeRO-2 configs trains on the CPU (DeepSpeed's CPU accelerator, gloo)
and takes the same steps as the plain engine: pretraining, GRPO and PPO. Skipped where DeepSpeed is not installed
(it is in the dev extra)."""
import importlib.util
import json

import pytest
import torch

from tests.train_helpers import ROOT, demo_data, one_thread, run_module, tiny_flags  # noqa: F401  (fixtures)
from train import pretrain

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
              pytest.mark.usefixtures("one_thread")]
STEPS = 3


def assert_weight_file_matches(path, model):
    """The weight file DeepSpeed's run wrote against the plain run's model: the files are fp16, so compare at fp16
    resolution (2^-11 relative) on both sides."""
    weights = torch.load(path, weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(weights[k], v.half(), rtol=2e-3, atol=2e-4, msg=lambda m: f"{path.name} {k}: {m}")


@pytest.mark.parametrize("zero,nproc", [(1, 1), (2, 2)])
def test_deepspeed_zero_matches_the_plain_engine(zero, nproc, demo_data, tmp_path):  # noqa: F811
    """ZeRO-1 on one process and ZeRO-2 on two (sharded optimizer state and gradients) vs one plain process with
    the same global batch (2 micro-batches of 2 per step)."""
    accum = 2 // nproc
    argv = tiny_flags(tmp_path / "ds", demo_data["pretrain"], steps=STEPS, batch_size=2,
                      extra=["--accumulation_steps", accum, "--deepspeed", ROOT / f"train/configs/ds_zero{zero}.json"])
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    r = run_module([*launcher, "-m", "train.pretrain", *argv], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "ds" / "pretrain_64_resume_ds"
    assert json.loads((folder / "latest.json").read_text()) == {"tag": f"step{STEPS}", "world_size": nproc}

    plain = pretrain.main(tiny_flags(tmp_path / "plain", demo_data["pretrain"], steps=STEPS, batch_size=2,
                                     extra=["--accumulation_steps", "2"]))
    assert_weight_file_matches(tmp_path / "ds" / "pretrain_64.pth", plain["model"])
    ds_losses = [json.loads(x)["loss"] for x in (tmp_path / "ds" / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert ds_losses == pytest.approx([loss for _, loss in plain["losses"]], abs=1e-4)


def test_zero2_stopped_on_two_processes_resumes_on_one(demo_data, tmp_path):  # noqa: F811
    """ZeRO-2, 2 processes x 1 micro-step, stopped after 2 of 4 steps; resumed with 1 process x 2 micro-steps (the
    tag converted to DeepSpeed's universal format first): the same weights as one plain process all along."""
    ds = ["--deepspeed", ROOT / "train/configs/ds_zero2.json"]
    argv = tiny_flags(tmp_path / "ds", demo_data["pretrain"], steps=4, batch_size=2, extra=[*ds, "--stop_after", 2])
    r = run_module(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain",
                    *argv], timeout=400)
    assert r.returncode == 1, r.stderr[-3000:]  # stopped (exit 130 on each process): torchrun reports a failure
    argv = tiny_flags(tmp_path / "ds", demo_data["pretrain"], steps=4, batch_size=2,
                      extra=[*ds, "--accumulation_steps", 2, "--from_resume", 1])
    r = run_module(["-m", "train.pretrain", *argv], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 2" in r.stdout and "saved by 2 process(es)" in r.stdout
    folder = tmp_path / "ds" / "pretrain_64_resume_ds"
    assert json.loads((folder / "latest.json").read_text())["world_size"] == 1
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["step4"]  # the conversion is cleaned up

    plain = pretrain.main(tiny_flags(tmp_path / "plain", demo_data["pretrain"], steps=4, batch_size=2,
                                     extra=["--accumulation_steps", "2"]))
    assert_weight_file_matches(tmp_path / "ds" / "pretrain_64.pth", plain["model"])


def test_a_resave_never_writes_into_the_tag_latest_names(demo_data, tmp_path):  # noqa: F811
    """Resuming a finished run saves the same step again: it goes to a new tag, then `latest` flips to it."""
    argv = tiny_flags(tmp_path, demo_data["pretrain"], steps=2, batch_size=2,
                      extra=["--deepspeed", ROOT / "train/configs/ds_zero1.json"])
    folder = tmp_path / "pretrain_64_resume_ds"
    for attempt in range(2):
        r = run_module(["-m", "train.pretrain", *argv, *(["--from_resume", "1"] if attempt else [])], timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        tag = json.loads((folder / "latest.json").read_text())["tag"]
        assert (tag == "step2") if attempt == 0 else tag.startswith("step2_")
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [tag]


def test_filled_config_rejects_a_contradicting_value(tmp_path):
    from argparse import Namespace

    from train.deepspeed_setup import filled_config
    from train.engine import ConfigError
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    args = Namespace(batch_size=4, accumulation_steps=1, grad_clip=1.0, dtype="fp32", deepspeed=str(cfg))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 8 but --batch_size gives 4"):
        filled_config(cfg, args, 1)
    filled = filled_config(ROOT / "train/configs/ds_zero2.json", args, 2)
    assert filled["train_batch_size"] == 8 and filled["bf16"]["enabled"] is False


@pytest.mark.parametrize("module, extra", [
    ("train.grpo", []),
    # DeepSpeed clips one norm over the actor and the critic (the engine clips each): a clip that never acts here
    ("train.ppo", ["--mini_batch_size", 1, "--ppo_update_iters", 2, "--early_stop_kl", 1e-4, "--grad_clip", 100])])
def test_rl_stages_under_zero2_match_the_plain_engine(module, extra, demo_data, tmp_path):  # noqa: F811
    """GRPO and PPO (actor and critic, several mini-batch steps per rollout, the early stop on KL) under ZeRO-2 on
    two processes, each rolling out its own prompts, take the steps one plain process takes with 2 micro-batches."""
    from tests.test_rl_stages import rl_flags
    from train import grpo, ppo
    stage = grpo if module == "train.grpo" else ppo
    ds = ["--deepspeed", ROOT / "train/configs/ds_zero2.json"]
    r = run_module(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module,
                    *rl_flags(tmp_path / "ds", demo_data["sft"], steps=3, extra=[*extra, *ds])], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("clips the norm of all 2 parameter groups together" in r.stdout) == (stage is ppo)
    plain = stage.main(rl_flags(tmp_path / "plain", demo_data["sft"], steps=3,
                                extra=[*extra, "--accumulation_steps", "2"]))
    model = plain["model"]
    files = {"grpo_64.pth": model} if stage is grpo else {"ppo_actor_64.pth": model.actor,
                                                          "ppo_critic_64.pth": model.critic}
    for name, part in files.items():
        assert_weight_file_matches(tmp_path / "ds" / name, part)
    logged = [json.loads(x) for x in (tmp_path / "ds" / f"{stage.STAGE.name}_metrics.jsonl").read_text().splitlines()]
    plain_logged = [json.loads(x) for x in open(plain["metrics_path"])]
    assert [x["reward"] for x in logged] == pytest.approx([x["reward"] for x in plain_logged], abs=1e-6)


def test_grpo_under_zero1_stopped_and_resumed_equals_the_plain_engine(demo_data, tmp_path):  # noqa: F811
    """GRPO under ZeRO-1, stopped after 2 of 4 steps and resumed from DeepSpeed's folder (the rollouts' place in the
    data travels in the engine state): the weights of 4 plain steps."""
    from tests.test_rl_stages import rl_flags
    from train import engine, grpo
    ds = ["--deepspeed", ROOT / "train/configs/ds_zero1.json"]
    r = run_module(["-m", "train.grpo", *rl_flags(tmp_path / "ds", demo_data["sft"], extra=[*ds, "--stop_after", 2])],
                   timeout=400)
    assert r.returncode == engine.STOPPED_EXIT_STATUS, r.stderr[-3000:]
    r = run_module(["-m", "train.grpo", *rl_flags(tmp_path / "ds", demo_data["sft"], extra=[*ds, "--from_resume", 1])],
                   timeout=400)
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr[-3000:]
    plain = grpo.main(rl_flags(tmp_path / "plain", demo_data["sft"]))
    assert_weight_file_matches(tmp_path / "ds" / "grpo_64.pth", plain["model"])
