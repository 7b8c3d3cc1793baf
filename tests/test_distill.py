import pytest
import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from train import engine
from train.losses import chunked_distill_loss, full_logits_distill_loss


def tiny(hidden=64, layers=2, use_moe=False):
    return MiniMindConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=97, max_position_embeddings=128, use_moe=use_moe)


def student_teacher_batch(seed=0):
    torch.manual_seed(seed)
    student, teacher = MiniMindForCausalLM(tiny()), MiniMindForCausalLM(tiny(96, 3))
    for p in list(student.parameters()) + list(teacher.parameters()):  # sharper distributions than the init
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 97, (3, 21))
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt
    labels[1, 14:] = -100  # a padded row
    return student, teacher, ids, labels


@pytest.mark.parametrize("temperature,alpha,chunk", [(1.0, 0.5, 7), (2.0, 0.0, 4096), (1.5, 1.0, 1), (0.7, 0.3, 16)])
def test_chunked_equals_full_logits_value_and_grads(temperature, alpha, chunk):
    student, teacher, ids, labels = student_teacher_batch()
    with torch.no_grad():
        h_t = teacher.model(ids)[0]
    params = [student.lm_head.weight, student.model.layers[0].self_attn.q_proj.weight, student.model.norm.weight]
    h_s = student.model(ids)[0]
    loss, ce, kl = chunked_distill_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels,
                                        temperature, alpha, chunk_size=chunk)
    got = torch.autograd.grad(loss, params)
    ref, ref_ce, ref_kl = full_logits_distill_loss(student.lm_head(student.model(ids)[0]), teacher.lm_head(h_t),
                                                   labels, temperature, alpha)
    want = torch.autograd.grad(ref, params)
    # fp32 throughout; the two paths sum the vocabulary and the tokens in different orders
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    if alpha < 1:  # with alpha == 1 the KL is not needed and not computed
        torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_kl_is_zero_for_identical_models_and_formula_by_hand():
    student, _, ids, labels = student_teacher_batch(1)
    with torch.no_grad():
        h = student.model(ids)[0]
    _, _, kl = chunked_distill_loss(h, student.lm_head.weight, h, student.lm_head.weight, labels, 2.0, 0.0, 5)
    assert abs(kl.item()) < 1e-6
    # by hand, one token: T^2 * sum p_t (log p_t - log q) with p_t = softmax(u / T), q = softmax(z / T)
    z, u = torch.randn(1, 1, 97), torch.randn(1, 1, 97)
    lab = torch.tensor([[-100, 5]])
    W = torch.eye(97)  # hidden == logits
    zz, uu = torch.cat([z, z], 1), torch.cat([u, u], 1)
    _, ce, kl = chunked_distill_loss(zz, W, uu, W, lab, 3.0, 0.5)
    p_t, q = (u[0, 0] / 3).softmax(-1), (z[0, 0] / 3).softmax(-1)
    torch.testing.assert_close(kl, 9 * (p_t * (p_t.log() - q.log())).sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, -z[0, 0].log_softmax(-1)[5], rtol=1e-5, atol=1e-6)


def test_no_assistant_tokens_and_bad_inputs():
    student, teacher, ids, _ = student_teacher_batch()
    h_s = student.model(ids)[0]
    h_t = teacher.model(ids)[0].detach()
    loss, ce, kl = chunked_distill_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight,
                                        torch.full_like(ids, -100))
    assert loss.item() == 0 and ce.item() == 0
    loss.backward()  # still a graph: a batch without assistant tokens must not crash the step
    with pytest.raises(ValueError, match="same tokenizer"):
        chunked_distill_loss(h_s, student.lm_head.weight, h_t, torch.zeros(50, 96), ids)
    with pytest.raises(ValueError, match="alpha"):
        chunked_distill_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, ids, alpha=1.5)


def test_bf16_hidden_states_close_to_fp32_reference():
    student, teacher, ids, labels = student_teacher_batch(2)
    with torch.no_grad():
        h_t = teacher.model(ids)[0]
    h_s = student.model(ids)[0]
    ref, _, _ = full_logits_distill_loss(student.lm_head(h_s), teacher.lm_head(h_t), labels, 1.0, 0.5)
    loss, _, _ = chunked_distill_loss(h_s.bfloat16(), student.lm_head.weight.bfloat16(), h_t.bfloat16(),
                                      teacher.lm_head.weight.bfloat16(), labels, 1.0, 0.5, chunk_size=8)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-2)  # bf16 inputs (8 mantissa bits), fp32 math


# --------------------------------------------------------------------------------------- the train.distill stage
TINY_FLAGS = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
              "--num_key_value_heads", "2", "--device", "cpu", "--dtype", "fp32", "--log_interval", "1"]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_distill_stage_moves_the_student_towards_the_teacher(tmp_path, kernels):
    from minimind.data import build_loader
    from minimind.demo import write_demo_data
    from minimind.tokenizer import load_tokenizer
    from train import distill

    tok = load_tokenizer()
    data = write_demo_data(tmp_path / "data", sizes=dict(pretrain=10, sft=64, dpo=10, reason=10))
    torch.manual_seed(1)
    student = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, vocab_size=tok.vocab_size)).eval()
    teacher = MiniMindForCausalLM(MiniMindConfig(hidden_size=96, num_hidden_layers=3,
                                                 vocab_size=tok.vocab_size)).eval()  # 8 heads, 2 kv: the defaults
    for p in teacher.parameters():  # a confident teacher: peaked distributions the student does not have yet
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.1)
    torch.save(student.state_dict(), tmp_path / "student.pth")
    torch.save({k: v.half() for k, v in teacher.state_dict().items()}, tmp_path / "teacher.pth")
    teacher.load_state_dict(torch.load(tmp_path / "teacher.pth"))
    steps, seq, bs = (8, 48, 8) if kernels == "torch" else (2, 40, 2)
    argv = TINY_FLAGS + ["--kernels", kernels, "--data_path", str(data["sft"]),
                         "--from_weight", str(tmp_path / "student.pth"),
                         "--teacher_weight", str(tmp_path / "teacher.pth"),  # its size is read off the file
                         "--out_dir", str(tmp_path / "out"), "--max_seq_len", str(seq), "--batch_size", str(bs),
                         "--epochs", "1", "--max_steps", str(steps), "--learning_rate", "1e-2",
                         "--temperature", "2.0", "--alpha", "0.5", "--distill_chunk", "37"]
    result = distill.main(argv)
    assert result["weights_path"].endswith("full_dist_64.pth")
    # MFU: the student's forward + backward and the teacher's forward (d_attn = 8 heads x 12 = 96), per token
    n_s, n_t = engine.matmul_params(result["model"]), engine.matmul_params(teacher)
    assert result["flops_per_token"] == (6 * n_s + 12 * 2 * 64 * seq) + (2 * n_t + 4 * 3 * 96 * seq)
    trained = result["model"].eval()
    trained.set_kernels("torch")  # evaluate on the reference ops (faster than the interpreter)
    batch = next(iter(build_loader("sft", data["sft"], tok, max_seq_len=seq, batch_size=bs)))

    def loss_of(model):
        with torch.no_grad():
            h = model.model(batch["input_ids"], batch["attention_mask"])[0]
            t = teacher.model(batch["input_ids"], batch["attention_mask"])[0]
            return chunked_distill_loss(h, model.lm_head.weight, t, teacher.lm_head.weight, batch["labels"], 2.0, 0.5)

    (before, _, kl_before), (after, _, kl_after) = loss_of(student), loss_of(trained)
    losses = [loss for _, loss in result["losses"]]
    print(f"distill[{kernels}] step losses {losses}; fixed batch loss {before.item():.4f} -> {after.item():.4f}, "
          f"KL {kl_before.item():.4f} -> {kl_after.item():.4f}")
    assert after < before and kl_after < kl_before
    if kernels == "torch":
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("overrides", [dict(use_moe=True, n_routed_experts=3), dict(num_key_value_heads=4)])
def test_teacher_shape_is_read_off_its_weight_file(tmp_path, overrides):
    """A teacher given by path alone: its shape (MoE experts, kv heads) comes from the file, and it loads."""
    import argparse
    from train import distill

    parser = argparse.ArgumentParser()
    distill.add_args(parser)
    args = parser.parse_args(["--teacher_weight", str(tmp_path / "teacher.pth")])
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, vocab_size=97, **overrides)  # 8 heads (the default)
    torch.save({k: v.half() for k, v in MiniMindForCausalLM(cfg).state_dict().items()}, tmp_path / "teacher.pth")
    got = distill.teacher_config(args, tiny())
    for k in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "use_moe", "n_routed_experts", "vocab_size"):
        assert getattr(got, k) == getattr(cfg, k), k
    engine.load_weights(MiniMindForCausalLM(got), tmp_path / "teacher.pth")  # strict: every tensor fits
    args.teacher_weight = str(tmp_path / "missing.pth")
    with pytest.raises(engine.ConfigError, match="missing.pth"):
        distill.teacher_config(args, tiny())
