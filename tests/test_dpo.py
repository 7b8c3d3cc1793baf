import math

import pytest
import torch
import torch.nn.functional as F

from minimind import MiniMindConfig, MiniMindForCausalLM
from train import engine
from train.losses import dpo_batch_logprobs, dpo_loss, sequence_logprobs


def tiny():
    return MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=97, max_position_embeddings=128)


def test_sequence_logprob_is_the_mean_over_assistant_tokens():
    lp = torch.tensor([[0.0, -1.0, -2.0, -3.0, -4.0], [0.0, -0.5, -0.5, 0.0, 0.0]])
    labels = torch.tensor([[7, -100, 3, 4, -100], [-100, 5, 6, -100, -100]])
    # position 0 never counts (token_logprobs has nothing there), nor do ignored labels
    torch.testing.assert_close(sequence_logprobs(lp, labels), torch.tensor([-2.5, -0.5]))
    assert sequence_logprobs(lp, torch.full_like(labels, -100)).tolist() == [0.0, 0.0]


def test_dpo_loss_formula_and_stats():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    rc, rr = torch.tensor([-1.2, -2.0]), torch.tensor([-1.2, -1.2])
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = 0.5 * ((pc - pr) - (rc - rr))  # [0.25, -0.8]
    torch.testing.assert_close(loss, -F.logsigmoid(z).mean())
    torch.testing.assert_close(stats["accuracy"], torch.tensor(0.5))
    torch.testing.assert_close(stats["margin"], z.mean())
    same, _ = dpo_loss(pc, pr, pc, pr, beta=0.1)
    assert abs(same.item() - math.log(2)) < 1e-7


def test_batch_logprobs_match_full_logits():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny())
    B, T = 2, 12
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(3, 97, (B, T))
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, 9:] = 0  # right padding
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[:, :4] = -100  # the prompt
        batch.update({f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_attention_mask": mask})
    c, r, _ = dpo_batch_logprobs(model, batch)
    for side, got in (("chosen", c), ("rejected", r)):
        ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        logits = model(ids, attention_mask=batch[f"{side}_attention_mask"]).logits
        tok = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = (labels[:, 1:] != -100).float()
        torch.testing.assert_close(got, (tok * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)  # fp32 both ways


# ------------------------------------------------------------------------------------------- the train.dpo stage
TINY_FLAGS = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
              "--num_key_value_heads", "2", "--device", "cpu", "--dtype", "fp32", "--log_interval", "1"]


def _run_dpo(tmp_path, kernels, extra=(), out="out"):
    from minimind.data import build_loader
    from minimind.demo import write_demo_data
    from minimind.tokenizer import load_tokenizer
    from train import dpo

    tok = load_tokenizer()
    data = write_demo_data(tmp_path / "data", sizes=dict(pretrain=10, sft=10, dpo=64, reason=10))
    torch.manual_seed(1)
    base = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=tok.vocab_size))
    base_path = tmp_path / "full_sft.pth"
    torch.save(base.state_dict(), base_path)
    steps, seq, bs = (6, 48, 8) if kernels == "torch" else (2, 40, 1)
    argv = TINY_FLAGS + ["--kernels", kernels, "--data_path", str(data["dpo"]), "--from_weight", str(base_path),
                         "--out_dir", str(tmp_path / out), "--max_seq_len", str(seq), "--batch_size", str(bs),
                         "--epochs", "1", "--max_steps", str(steps), "--learning_rate", "5e-3", "--beta", "0.1",
                         *extra]
    result = dpo.main(argv)
    batch = next(iter(build_loader("dpo", data["dpo"], tok, max_seq_len=seq, batch_size=bs)))
    return result, base.eval(), batch


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    return _run_dpo(tmp_path_factory.mktemp("dpo_torch"), "torch")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_dpo_stage_starts_at_log2_and_learns_the_preference(kernels, request, tmp_path):
    result, ref, batch = request.getfixturevalue("torch_run") if kernels == "torch" else _run_dpo(tmp_path, kernels)
    policy = result["model"].eval()
    policy.set_kernels("torch")  # evaluate on the reference ops (faster than the interpreter)
    losses = [loss for _, loss in result["losses"]]
    assert abs(losses[0] - math.log(2)) < 1e-6  # step 1: the policy is the reference
    assert result["weights_path"].endswith("rlhf_64.pth")
    with torch.no_grad():
        pc, pr, _ = dpo_batch_logprobs(policy, batch)
        rc, rr, _ = dpo_batch_logprobs(ref, batch)
        loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    print(f"dpo[{kernels}] step losses {losses}; fixed batch: loss {loss.item():.5f}, margin "
          f"{((pc - pr) - (rc - rr)).mean().item():.4f}, accuracy {stats['accuracy'].item():.2f}")
    assert loss < math.log(2)
    assert ((pc - pr) - (rc - rr)).mean() > 0  # the policy prefers chosen over rejected more than the reference
    if kernels == "torch":
        assert losses[-1] < losses[0]


def test_dpo_precomputed_reference_gives_the_same_run(torch_run, tmp_path):
    plain = torch_run[0]
    cached, _, _ = _run_dpo(tmp_path, "torch", ["--precompute_ref"])
    a, b = [x for _, x in plain["losses"]], [x for _, x in cached["losses"]]
    assert len(a) == len(b) == 6
    # MFU counts the live reference's forward (2N + 4LdT per token), not the precomputed one's
    n, T = engine.matmul_params(plain["model"]), 48
    assert cached["flops_per_token"] == 6 * n + 12 * 2 * 64 * T
    assert plain["flops_per_token"] == 6 * n + 12 * 2 * 64 * T + 2 * n + 4 * 2 * 64 * T
    assert plain["flops_per_token"] > cached["flops_per_token"]
    # the same reference values, from batches of another shape: fp32 rounding only
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    for (k, v), w in zip(plain["model"].state_dict().items(), cached["model"].state_dict().values()):
        torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-6, msg=k)


def test_dpo_resume_keeps_the_original_reference(tmp_path):
    """A resumed run must compare against the starting policy, not the checkpointed one: same weights as an
    uninterrupted run, bit for bit (CPU, fp32)."""
    from minimind.demo import write_demo_data
    from minimind.tokenizer import load_tokenizer
    from train import dpo

    tok = load_tokenizer()
    data = write_demo_data(tmp_path / "data", sizes=dict(pretrain=10, sft=10, dpo=32, reason=10))
    torch.manual_seed(1)
    base = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=tok.vocab_size))
    torch.save(base.state_dict(), tmp_path / "full_sft.pth")
    argv = TINY_FLAGS + ["--data_path", str(data["dpo"]), "--from_weight", str(tmp_path / "full_sft.pth"),
                         "--max_seq_len", "48", "--batch_size", "4", "--epochs", "1", "--max_steps", "4",
                         "--learning_rate", "5e-3"]
    whole = dpo.main(argv + ["--out_dir", str(tmp_path / "a")])
    spelled = dpo.main(argv + ["--out_dir", str(tmp_path / "c"), "--ref_weight", "none"])
    assert spelled["losses"] == whole["losses"]  # 'none' is the default reference (the policy), not a random model
    assert dpo.main(argv + ["--out_dir", str(tmp_path / "b"), "--stop_after", "2"])["interrupted"]
    resumed = dpo.main(argv + ["--out_dir", str(tmp_path / "b"), "--from_resume", "1"])
    assert [x for _, x in resumed["losses"]] == [x for _, x in whole["losses"]][2:]
    for (k, v), w in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(v, w), k


def test_precomputed_reference_covers_every_pair_under_any_world_size(tmp_path, monkeypatch):
    """Two processes' shares of the precomputed table add up to the one-process table: the tail batch that
    lockstep training leaves out of an epoch (11 batches, 2 processes) is computed too, so no pair's
    reference is left at 0 for a later epoch to train against."""
    import contextlib
    import types

    import torch.distributed
    from minimind.demo import write_demo_data
    from minimind.tokenizer import load_tokenizer
    from train import dpo

    tok = load_tokenizer()
    data = write_demo_data(tmp_path / "data", sizes=dict(pretrain=10, sft=10, dpo=41, reason=10))
    torch.manual_seed(0)
    ref = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=tok.vocab_size)).eval()
    args = types.SimpleNamespace(data_path=data["dpo"], max_seq_len=48, batch_size=4, seed=42,
                                 skip_bad_records=False)

    def table(rank, world_size):
        run = types.SimpleNamespace(args=args, tokenizer=tok, rank=rank, world_size=world_size,
                                    device=torch.device("cpu"), autocast=contextlib.nullcontext)
        return dpo.precompute_reference(ref, run)

    whole = table(0, 1)
    assert (whole != 0).all()  # every one of the 41 pairs has its reference values
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: None)  # each rank's own share
    torch.testing.assert_close(table(0, 2) + table(1, 2), whole, rtol=1e-5, atol=1e-6)
