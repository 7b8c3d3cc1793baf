"""The RL stages' math against hand computations on fixed numbers (train/rl.py), the rewards (train/rewards.py) and
the rl data kind (minimind.data)."""
import json
import math

import pytest
import torch

from minimind.config import MiniMindConfig
from minimind.data import DataError, build_loader
from minimind.generate import SamplingConfig, rollout
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import BUNDLED_TOKENIZER, load_tokenizer
from tests.reference_files import reference_folder
from train import rl
from train.engine import ConfigError
from train.rewards import Rewards, answer_matches, final_answer, parse_spec, rep_penalty, rules_reward


# ------------------------------------------------------------------------------------------------ advantages, KL

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    want = [-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0, 0.0]  # a group of equal rewards teaches nothing
    assert rl.group_advantages(rewards, 3).tolist() == pytest.approx(want, rel=1e-6)


def test_k3_kl_by_hand_and_its_expectation_is_the_kl():
    assert rl.k3_kl(torch.tensor(-1.0), torch.tensor(-2.0)).item() == pytest.approx(math.e - 2, rel=1e-6)
    assert rl.k3_kl(torch.tensor(-0.5), torch.tensor(-0.5)).item() == 0.0
    # summed over every token x weighted by pi(x), k3 is KL(pi || ref) exactly: sum pi (ref/pi - log(ref/pi) - 1)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    k3 = rl.k3_kl(ref.log(), pi.log())
    assert (k3 >= 0).all()
    assert (pi * k3).sum().item() == pytest.approx((pi * (pi / ref).log()).sum().item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------------- losses

# two rows of three completion tokens; the second row has two (its third is padding)
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -4.0, -9.0]]
OLD = [[-1.2, -1.0, -0.5], [-0.3, -3.0, 0.0]]
REF = [[-1.1, -2.5, -0.4], [-0.2, -4.5, 0.0]]
ADV = [1.5, -0.7]
MASK = [[1, 1, 1], [1, 1, 0]]


def _tensors():
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    return logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(REF, dtype=torch.float64), \
        torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)


def _by_hand(token_loss, token_grad):
    """Mean over rows of each row's mean over its tokens, written out in Python floats; and d loss / d logp."""
    loss, grad = 0.0, [[0.0] * 3 for _ in LOGP]
    for i, row in enumerate(LOGP):
        n = sum(MASK[i])
        for t in range(3):
            if MASK[i][t]:
                loss += token_loss(row[t], OLD[i][t], REF[i][t], ADV[i]) / n / len(LOGP)
                grad[i][t] = token_grad(row[t], OLD[i][t], REF[i][t], ADV[i]) / n / len(LOGP)
    return loss, grad


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_cispo_loss_and_gradient_by_hand(beta):
    eps_high = 1.5  # the first token of row 0 (ratio e^0.2) is under it, its second (ratio e^-1) too, row 1's
    # second (e^-1) too; lower it to 1.1 below to see the cap

    def loss_hand(p, o, r, a, cap=eps_high):
        return -(min(math.exp(p - o), cap) * a * p - beta * (math.exp(r - p) - (r - p) - 1))

    def grad_hand(p, o, r, a, cap=eps_high):  # the ratio weight is a constant (stop gradient)
        return -(min(math.exp(p - o), cap) * a - beta * (-math.exp(r - p) + 1))

    for cap in (eps_high, 1.1):
        logp, old, ref, adv, mask = _tensors()
        loss, stats = rl.grpo_loss(logp, old, ref, adv, mask, "cispo", beta, 0.2, cap)
        loss.backward()
        want_loss, want_grad = _by_hand(lambda *x: loss_hand(*x, cap=cap), lambda *x: grad_hand(*x, cap=cap))
        assert loss.item() == pytest.approx(want_loss, rel=1e-12)
        torch.testing.assert_close(logp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
        capped = sum(math.exp(LOGP[i][t] - OLD[i][t]) > cap for i in range(2) for t in range(3) if MASK[i][t])
        assert stats["clip_fraction"].item() == pytest.approx(capped / 5)
    assert capped == 1  # at 1.1 only row 0's first token (ratio 1.22) is capped


def test_grpo_clipped_loss_and_gradient_by_hand():
    beta, eps = 0.1, 0.2

    def clipped(p, o, a):
        ratio = math.exp(p - o)
        return min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)

    def loss_hand(p, o, r, a):
        return -(clipped(p, o, a) - beta * (math.exp(r - p) - (r - p) - 1))

    def grad_hand(p, o, r, a):
        ratio = math.exp(p - o)
        # the unclipped term is the smaller one (gradient ratio * a) unless the clip holds the ratio: then 0
        held = (a > 0 and ratio > 1 + eps) or (a < 0 and ratio < 1 - eps)
        return -((0.0 if held else ratio * a) - beta * (-math.exp(r - p) + 1))

    logp, old, ref, adv, mask = _tensors()
    loss, stats = rl.grpo_loss(logp, old, ref, adv, mask, "grpo", beta, eps, 5.0)
    loss.backward()
    want_loss, want_grad = _by_hand(loss_hand, grad_hand)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(logp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # held by the clip: row 0 token 0 (ratio 1.22 > 1.2, A > 0) and row 1 token 1 (ratio 0.37 < 0.8, A < 0)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    assert stats["kl"].item() == pytest.approx(sum(math.exp(REF[i][t] - LOGP[i][t]) - (REF[i][t] - LOGP[i][t]) - 1
                                                   for i in range(2) for t in range(3) if MASK[i][t]) / 5)


def test_at_the_start_both_losses_are_minus_the_advantage_weighted_logprob():
    """ratio 1 and pi == ref: the gradient of either loss is the plain policy gradient -A / n / N per token."""
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    same = logp.detach()
    for loss_type in ("cispo", "grpo"):
        logp.grad = None
        loss, stats = rl.grpo_loss(logp, same, same, torch.tensor(ADV, dtype=torch.float64),
                                   torch.tensor(MASK, dtype=torch.float64), loss_type, 0.1)
        loss.backward()
        want = torch.tensor([[-ADV[0] / 3 / 2] * 3, [-ADV[1] / 2 / 2] * 2 + [0.0]], dtype=torch.float64)
        torch.testing.assert_close(logp.grad, want)
        assert stats["kl"].item() == 0 and stats["clip_fraction"].item() == 0 and stats["ratio"].item() == 1


def test_gae_by_hand():
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.7, 9.0]])  # row 1: two tokens (its third value is ignored)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -2.0, 0.0]])  # each row's reward at its last token
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    a2 = 1 - 0.1  # delta_2 = r + 0 - V_2
    a1 = (0 + 0.1 - 0.2) + 0.95 * a2
    a0 = (0 + 0.2 - 0.5) + 0.95 * a1
    b1 = -2 - 0.7
    b0 = (0 + 0.7 - 0.3) + 0.95 * b1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.1], [b0 + 0.3, b1 + 0.7, 0.0]]))
    adv, _ = rl.gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    c2 = 1 - 0.1
    c1 = (0.9 * 0.1 - 0.2) + 0.9 * 0.5 * c2
    c0 = (0.9 * 0.2 - 0.5) + 0.9 * 0.5 * c1
    torch.testing.assert_close(adv, torch.tensor([[c0, c1, c2]]))


def test_whiten_over_the_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = rl.whiten(x, mask)
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    var = sum((v - 3) ** 2 for v in vals) / 5
    torch.testing.assert_close(w, torch.tensor([[(v - 3) / math.sqrt(var + 1e-8) for v in vals[:3]],
                                                [(4 - 3) / math.sqrt(var + 1e-8), (5 - 3) / math.sqrt(var + 1e-8),
                                                 0.0]]))


def test_ppo_losses_by_hand():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -1.9]], dtype=torch.float64)  # ratios e^0.5 = 1.65 (clipped to 1.2), e^-0.1
    ref = torch.tensor([[-1.0, -2.2]], dtype=torch.float64)
    adv = torch.tensor([[0.8, -0.4]], dtype=torch.float64)
    values = torch.tensor([[0.9, -0.1]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[0.5, 0.0]], dtype=torch.float64)  # the first value moved 0.4 > 0.2: clipped to 0.7
    returns = torch.tensor([[1.0, 0.3]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    policy, value, stats = rl.ppo_losses(logp, old, ref, adv, values, old_values, returns, mask, 0.2, 0.2, 0.02)
    r0, r1 = math.exp(0.5), math.exp(-0.1)
    pg = (max(-0.8 * r0, -0.8 * 1.2) + max(0.4 * r1, 0.4 * min(max(r1, 0.8), 1.2))) / 2
    kl = ((math.exp(0.0) - 0.0 - 1) + (math.exp(-0.2) + 0.2 - 1)) / 2
    assert policy.item() == pytest.approx(pg + 0.02 * kl, rel=1e-12)
    v0 = max((0.9 - 1.0) ** 2, (0.7 - 1.0) ** 2)  # the clipped value is further from the return: it counts
    v1 = max((-0.1 - 0.3) ** 2, (-0.1 - 0.3) ** 2)
    assert value.item() == pytest.approx(0.5 * (v0 + v1) / 2, rel=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (0.25 + 0.01) / 2, rel=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    value.backward()
    assert values.grad[0, 0].item() == 0.0  # the clipped branch holds no gradient for the value


# --------------------------------------------------------------------------------------- rollout log-probs

def test_completion_logprobs_equal_the_sampling_pass_and_a_full_log_softmax():
    """The training path (one forward, linear_logprobs at the completion positions) gives the rollout's own
    log-probs (fp32, CPU) and what a full log_softmax over every position's logits gives."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=300))
    prompts = [[1, 5, 9, 12, 40], [1, 7, 8]]
    out = rollout(model, prompts, 3, SamplingConfig(max_new_tokens=7, temperature=1.0, top_p=1.0), seeds=range(6))
    ids, _ = out.sequences()
    N, L = out.completion_mask.shape
    prompt_len = torch.tensor([len(p) for p in out.prompts])
    batch = dict(input_ids=ids, sources=(prompt_len[:, None] - 1 + torch.arange(L)).clamp(max=ids.shape[1] - 1),
                 targets=out.completions.masked_fill(~out.completion_mask, -100))
    with torch.no_grad():
        lp, _ = rl.completion_logprobs(model, batch)
        full = model(ids).logits.float().log_softmax(-1)
    mask = out.completion_mask
    torch.testing.assert_close(lp[mask], out.logprobs[mask], rtol=1e-5, atol=1e-5)
    assert (lp[~mask] == 0).all()
    want = full.gather(1, batch["sources"][..., None].expand(N, L, full.shape[-1]))
    want = want.gather(2, out.completions[..., None]).squeeze(-1)
    torch.testing.assert_close(lp[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_row_seeds_depend_on_the_record_not_the_batch():
    a = rl.row_seeds(42, 0, [5, 9], 3)
    b = rl.row_seeds(42, 0, [9], 3)
    assert a[3:] == b and len(set(a)) == 6
    assert rl.row_seeds(42, 1, [9], 3) != b and rl.row_seeds(7, 0, [9], 3) != b


# ------------------------------------------------------------------------------------------------------- rewards

def test_rules_reward_is_minimind_s():
    short, ok = "Too short.", "A reply of a fair length, no repeats."
    assert rules_reward(short) == 0.5 * -1 and rules_reward(ok) == 0.5
    thinking = "I think about it for a while here.\n</think>\n\nThe answer is four."
    assert rules_reward(thinking) == 0.5 + 1.0 + 0.25  # 20-300 characters of thinking, one </think>
    assert rules_reward("hm</think>" + "x" * 30) == 0.5 - 0.5 + 0.25
    assert rules_reward("a" * 25 + "</think>ok</think>") == 0.5 + 1.0 - 0.25
    loop = "la la la la la la la la la la"  # 10 words, 8 3-grams, one distinct: penalty min(0.5, 7 / 8)
    assert rep_penalty(loop) == 0.5 and rules_reward(loop) == 0.5 - 0.5
    assert rep_penalty("one two three one two three") == pytest.approx(min(0.5, 1 * 0.5 * 2 / 4))


@pytest.mark.parametrize("reply, answer, right", [
    ("Liyan likes red.", "red", True),  # the demo world's answers: the fact restated, its value last
    ("3 plus 4 equals 7.", "7", True),
    ("3 plus 4 equals 17.", "7", False),
    ("叶嘉住在瓦伦堡。", "瓦伦堡", True),
    ("Liyan likes bored.", "red", False),
    ("<answer>\n42\n</answer>", "42", True),
    ("<answer>41</answer> then 42", "42", False),  # the tag wins over the last number
    ("Work: 6 * 7\nso 42", "42", True),
    ("It is 42.0", "42", True),
    ("Paris", " paris. ", True),
    ("", "x", False),
])
def test_answer_reward_matching(reply, answer, right):
    assert answer_matches(reply, answer) is right


def test_final_answer():
    assert final_answer("a\nb\n\n") == "b"
    assert final_answer("x <answer> y </answer> z") == "y"
    assert final_answer("x <answer> y </answer> z <answer>w</answer>") == ""  # answered twice: no answer


def test_answer_reward_pays_one_answer_only():
    """The replies a GRPO run from the demo's reasoning model drifted into when the last <answer> block was read:
    `<answer>` in place of `<think>`, then the paid block. Each answers twice and earns nothing."""
    records = [{"messages": [{"role": "user", "content": "q"}], "answer": "Liyan likes red."}] * 3
    replies = ["<think>\nQ: Liyan?\nA: Liyan likes red.\n</think>\n<answer>\nLiyan likes red.\n</answer>",
               "<answer>\nQ: Liyan?\nA: Liyan likes red.\n</think>\n<answer>\nLiyan likes red.\n</answer>",
               "<answer>\nLiyan likes blue.\n</answer>\n<answer>\nLiyan likes red.\n</answer>"]
    _, parts = Rewards("answer")(records, replies, [False] * 3)
    assert parts["answer"].tolist() == [1.0, 0.0, 0.0]


def test_rewards_sum_their_terms_and_user_functions_are_checked():
    records = [{"messages": [{"role": "user", "content": "q"}], "answer": "red"}] * 2
    rewards = Rewards("rules,answer,tests.test_rl_math:says_red")
    total, parts = rewards(records, ["Liyan likes red.", "<think>x</think>blue"], [False, False])
    assert parts["answer"].tolist() == [1.0, 0.0] and parts["tests.test_rl_math:says_red"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(total, parts["rules"] + parts["answer"] + parts["tests.test_rl_math:says_red"])
    with pytest.raises(ValueError, match="must return 2 finite numbers"):
        Rewards("tests.test_rl_math:one_number")(records, ["a", "b"], [False, False])
    for spec, match in [("nope", "not one of rules, answer, model"), ("no_such_module_x:f", "cannot import"),
                        ("math:nope", "has no 'nope'"), ("math:pi", "not callable"), ("rules,rules", "twice"),
                        ("model", "needs --reward_model_path"), (",", "names no reward")]:
        with pytest.raises(ConfigError, match=match):
            parse_spec(spec)
    assert [n for n, _ in parse_spec(None)] == ["rules"]
    assert [n for n, _ in parse_spec(None, "some/dir")] == ["rules", "model"]


def says_red(prompts, replies):
    return [float("red" in r) for r in replies]


def one_number(prompts, replies):
    return [1.0]


def test_reward_model_scores_the_conversation_and_clips(tmp_path):
    """A tiny random transformers sequence-classification model, saved and loaded like a real reward model."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER / "tokenizer.json"),
                                               pad_token="<|endoftext|>")
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config)
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rewards = Rewards("model", tmp_path / "rm")
    conv = [{"role": "user", "content": "What is 2 + 2?"}]
    records = [{"messages": conv, "answer": None}] * 2
    replies = ["<think>\nadd them\n</think>\n\nIt is 4.", "Five."]
    total, parts = rewards(records, replies, [True, False])
    # what it scores: the conversation and the reply's answer (the thinking left out), as role: content lines
    text = "user: What is 2 + 2?\nassistant: It is 4."
    with torch.no_grad():
        want = model(**tok(text, return_tensors="pt")).logits[0, 0].item()
    assert parts["model"][0].item() == pytest.approx(max(-3, min(3, want)), rel=1e-5, abs=1e-6)
    with torch.no_grad():
        rewards.model.model.score.weight.mul_(1e4)  # scores far beyond +-3
    _, parts = rewards(records, replies, [True, False])
    assert parts["model"].abs().tolist() == [3.0, 3.0]
    with pytest.raises(ConfigError, match="not a Hugging Face sequence-classification model"):
        Rewards("model", tmp_path)


# ----------------------------------------------------------------------------------------------------- rl data

def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records))
    return path


def _conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_rl_data_prompts_answers_and_thinking(tmp_path):
    records = [{"conversations": _conv(("user", "2 + 2?"), ("assistant", "")), "answer": 4},
               {"conversations": _conv(("user", "hi"), ("assistant", "a"), ("user", "red?"), ("assistant", "")),
                "answer": "red"}]
    path = _write(tmp_path / "rl.jsonl", records)
    tok = load_tokenizer()
    loader = build_loader("rl", path, tok, max_seq_len=1000, batch_size=2)
    batch = next(iter(loader))
    order = batch["prompt_index"].tolist()
    for i, prompt, record in zip(order, batch["prompts"], batch["records"]):
        messages = records[i]["conversations"][:-1]
        assert prompt == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        assert record == {"messages": messages, "tools": None, "answer": str(records[i]["answer"])}
    assert batch["thinking"] == [False, False]
    short = next(iter(build_loader("rl", path, tok, max_seq_len=5, batch_size=2)))
    assert [p for p in short["prompts"]] == [p[-5:] for p in batch["prompts"]]  # the end is kept
    with pytest.raises(ValueError, match="cannot switch thinking"):
        build_loader("rl", path, tok, max_seq_len=100, batch_size=2, thinking_ratio=0.5)

    tok3 = load_tokenizer(reference_folder("minimind3-tokenizer"))
    seen = set()
    for epoch in range(6):
        loader = build_loader("rl", path, tok3, max_seq_len=1000, batch_size=2, thinking_ratio=0.5)
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        for i, prompt, thinking in zip(batch["prompt_index"].tolist(), batch["prompts"], batch["thinking"]):
            text = tok3.apply_chat_template(records[i]["conversations"][:-1], add_generation_prompt=True,
                                            enable_thinking=thinking)
            assert prompt == tok3.encode(text)
            seen.add(thinking)
    assert seen == {True, False}  # drawn per (seed, epoch, record)


@pytest.mark.parametrize("record, message", [
    ({"conversations": _conv(("user", "q"))}, "has no assistant turn"),
    ({"conversations": _conv(("user", "q"), ("assistant", "a"), ("user", "q2"))}, "ends with the assistant's turn"),
    ({"conversations": _conv(("user", "q"), ("assistant", "a")), "answer": ["4"]}, "'answer' must be a string or"),
    ({"prompt": "q"}, "missing field 'conversations'"),
    ('{"conversations": [', "malformed JSON"),
])
def test_bad_rl_records_name_file_and_line(tmp_path, record, message):
    good = {"conversations": _conv(("user", "q"), ("assistant", "a"))}
    path = _write(tmp_path / "rl.jsonl", [good, record])
    with pytest.raises(DataError, match=f"rl.jsonl:2: .*{message}"):
        build_loader("rl", path, load_tokenizer(), max_seq_len=64, batch_size=1)


def test_rl_loader_resumes_its_position_and_refuses_another_thinking_ratio(tmp_path):
    path = _write(tmp_path / "rl.jsonl", [{"conversations": _conv(("user", f"q{i}"), ("assistant", ""))}
                                          for i in range(10)])
    tok3 = load_tokenizer(reference_folder("minimind3-tokenizer"))
    a = build_loader("rl", path, tok3, max_seq_len=64, batch_size=2, thinking_ratio=0.5)
    it = iter(a)
    next(it)
    state = a.state_dict()
    rest = [b["prompt_index"].tolist() for b in it]
    b = build_loader("rl", path, tok3, max_seq_len=64, batch_size=2, thinking_ratio=0.5)
    b.load_state_dict(state)
    assert [x["prompt_index"].tolist() for x in b] == rest
    c = build_loader("rl", path, tok3, max_seq_len=64, batch_size=2, thinking_ratio=0.9)
    with pytest.raises(ValueError, match="thinking_ratio"):
        c.load_state_dict(state)
