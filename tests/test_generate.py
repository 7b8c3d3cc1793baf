import pytest
import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.generate import (BatchSampling, SamplingConfig, apply_repetition_penalty, filter_logits, generate,
                               left_pad, sample, stream)


def peaked_model(seed=0, vocab=97):
    """A tiny random model with larger weights than the default init, so next-token distributions are peaked
    and greedy choices are not decided by float noise."""
    torch.manual_seed(seed)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=vocab, max_position_embeddings=64)
    model = MiniMindForCausalLM(cfg).eval()
    for p in model.parameters():
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.15)
    return model


def greedy_by_full_forward(model, ids, steps):
    """The reference: recompute the whole sequence every step and take the argmax."""
    seq = ids
    for _ in range(steps):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1]:]


def test_greedy_with_cache_equals_full_recompute():
    model = peaked_model()
    ids = torch.randint(3, 97, (3, 7))
    want = greedy_by_full_forward(model, ids, 12)
    got = generate(model, ids, max_new_tokens=12, temperature=0.0, eos_token_id=None)
    assert torch.equal(got, want)
    assert torch.equal(generate(model, ids, max_new_tokens=12, temperature=0.0, eos_token_id=None,
                                use_cache=False), want)


def test_top_k_one_and_tiny_temperature_equal_greedy():
    model = peaked_model(1)
    ids = torch.randint(3, 97, (2, 5))
    greedy = generate(model, ids, max_new_tokens=10, temperature=0.0, eos_token_id=None)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, ids, max_new_tokens=10, temperature=1.0, top_k=1, top_p=1.0,
                                eos_token_id=None, generator=g), greedy)
    assert torch.equal(generate(model, ids, max_new_tokens=10, temperature=1e-4, top_p=1.0,
                                eos_token_id=None, generator=g), greedy)


def test_stops_at_eos_and_pads_finished_rows():
    model = peaked_model(2)
    ids = torch.randint(3, 97, (2, 6))
    free = generate(model, ids, max_new_tokens=8, temperature=0.0, eos_token_id=None)
    eos = int(free[0, 2])  # pretend row 0's third token is eos
    assume_first = int((free[0] == eos).nonzero()[0])
    out = generate(model, ids, max_new_tokens=8, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    row1_hits = (free[1] == eos).nonzero()
    stop = max(assume_first, int(row1_hits[0]) if len(row1_hits) else 7) + 1
    assert out.shape == (2, stop)
    assert torch.equal(out[0, :assume_first + 1], free[0, :assume_first + 1])
    assert (out[0, assume_first + 1:] == 0).all()  # pad after eos
    n1 = int(row1_hits[0]) + 1 if len(row1_hits) else stop
    assert torch.equal(out[1, :n1], free[1, :n1])
    # a single row stops right at its eos
    single = list(stream(model, ids[:1], max_new_tokens=8, temperature=0.0, eos_token_id=eos))
    assert len(single) == assume_first + 1 and int(single[-1][0]) == eos


def test_left_padded_batch_equals_each_prompt_alone():
    model = peaked_model(3)
    prompts = [[5, 9, 14, 3, 77, 41, 8], [12, 60], [33, 2, 90, 18]]
    ids, mask = left_pad(prompts)
    assert ids.shape == (3, 7) and mask.sum(1).tolist() == [7, 2, 4] and ids[1, 0] == 0
    batched = generate(model, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=None)
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), max_new_tokens=6, temperature=0.0, eos_token_id=None)
        assert torch.equal(batched[i], alone[0]), i


def test_stops_at_max_position_embeddings():
    model = peaked_model(4)
    ids = torch.randint(3, 97, (1, 60))
    out = generate(model, ids, max_new_tokens=50, temperature=0.0, eos_token_id=None)
    assert out.shape == (1, 4)  # 64 positions in all
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.randint(3, 97, (1, 65)), max_new_tokens=1)


def test_filter_logits_top_p_and_top_k():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda lg: torch.isfinite(lg)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_p=0.7)) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert kept(filter_logits(logits, top_p=0.8)) == [False, True, False, True]  # exactly 0.8 is enough
    assert kept(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.4)) == [False, True, False, False]  # the top token is always kept
    assert kept(filter_logits(logits, top_p=0.0)) == [False, True, False, False]  # as the OpenAI API's top_p 0
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_k=3, top_p=1.0)) == [False, True, True, True]


def draw(logits, cfg, seed=0):
    """sample() on every row of logits with one settings, each row its own generator."""
    n = logits.shape[0]
    gens = [torch.Generator().manual_seed(seed * n + i) for i in range(n)]
    return sample(logits, BatchSampling([cfg] * n, gens, "cpu"))[0]


def test_sampling_follows_the_renormalised_distribution():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().repeat(20000, 1)
    cfg = SamplingConfig(temperature=1.0, top_p=0.81, top_k=0)
    counts = torch.bincount(draw(logits, cfg), minlength=4).float() / 20000
    want = torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95
    # 20000 draws: a share's standard error is <= 0.0036, so 0.015 is four of them
    torch.testing.assert_close(counts, want, rtol=0, atol=0.015)
    hot = draw(logits, SamplingConfig(temperature=0.5, top_p=1.0), seed=1)
    p = torch.tensor([0.05, 0.5, 0.15, 0.3]) ** 2
    torch.testing.assert_close(torch.bincount(hot, minlength=4).float() / 20000, p / p.sum(), rtol=0, atol=0.015)


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[True, True, False, False]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    model = peaked_model(5)
    ids = torch.randint(3, 97, (1, 4))
    out = generate(model, ids, max_new_tokens=20, temperature=0.0, eos_token_id=None, repetition_penalty=1e6)
    seq = torch.cat([ids[0], out[0]]).tolist()
    assert len(set(seq[4:])) == 20 and not set(seq[4:]) & set(seq[:4])  # a huge penalty forbids repeats


def test_repetition_penalty_ignores_left_pads():
    """The pad id is not a token a padded row has seen: with a penalty, a padded row still decodes as alone, even
    when its pads are the very token it picks first."""
    model = peaked_model(5)
    kw = dict(max_new_tokens=4, temperature=0.0, eos_token_id=None, repetition_penalty=1e6)
    alone = generate(model, torch.tensor([[3, 4]]), **kw)
    ids, mask = left_pad([[3, 4, 6, 8, 9], [3, 4]], pad_token_id=int(alone[0, 0]))
    batched = generate(model, ids, mask, **kw)
    assert torch.equal(batched[1], alone[0])


def test_bad_arguments():
    model = peaked_model()
    with pytest.raises(ValueError, match="top_p"):
        generate(model, torch.ones(1, 3, dtype=torch.long), top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.ones(1, 3, dtype=torch.long), temperature=-1)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1, 2], []])


def test_chat_with_the_bundled_tokenizer():
    from minimind.tokenizer import load_tokenizer
    tok = load_tokenizer()
    model = peaked_model(6, vocab=tok.vocab_size)
    from minimind.generate import chat, stream_chat
    messages = [{"role": "user", "content": "你好, who are you?"}]
    reply = chat(model, tok, messages, max_new_tokens=16, temperature=0.0)
    pieces = list(stream_chat(model, tok, messages, max_new_tokens=16, temperature=0.0))
    assert reply == "".join(pieces) and len(reply) > 0
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    ids = generate(model, torch.tensor([prompt]), max_new_tokens=16, temperature=0.0, eos_token_id=tok.eos_id)
    ids = ids[0].tolist()
    ids = ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    assert reply == tok.decode(ids, skip_special_tokens=True)


def test_a_tiny_temperature_is_greedy():
    model = peaked_model()  # max_position_embeddings 64
    ids = torch.randint(3, 97, (2, 7))
    greedy = generate(model, ids, max_new_tokens=5, temperature=0.0, eos_token_id=None)
    assert torch.equal(generate(model, ids, max_new_tokens=5, temperature=1e-40, eos_token_id=None), greedy)
