"""The generation engine (minimind/generate.py on minimind/kv_cache.py): batched rows of different lengths, rows
that join and leave between steps, per-row sampling and seeds, eos and the completion mask, and the log-probs it
returns for RL, each checked against a reference computed another way."""
import pytest
import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.generate import (BatchSampling, Engine, SamplingConfig, filter_logits, generate, left_pad, rollout,
                               sample)
from tests.test_generate import greedy_by_full_forward, peaked_model
from tests.train_helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingConfig(max_new_tokens=10, temperature=0.0, eos_token_id=None)
HOT = SamplingConfig(max_new_tokens=10, temperature=0.9, top_p=0.95, eos_token_id=None)
PROMPTS = [[5, 9, 14, 3, 77, 41, 8], [12, 60], [33, 2, 90, 18], [7]]


def peaked(seed, use_moe):
    """peaked_model, dense or MoE (its router and experts too get the larger weights)."""
    if not use_moe:
        return peaked_model(seed)
    torch.manual_seed(seed)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=97, max_position_embeddings=64, use_moe=True)
    model = MiniMindForCausalLM(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    return model


def run(engine, requests):
    """Step the engine until idle; requests {handle: name}. Returns {name: (tokens, logprobs, finish_reason)}."""
    out = {name: ([], [], None) for name in requests.values()}
    while engine.busy:
        for ev in engine.step():
            tokens, logprobs, _ = out[requests[ev.request]]
            out[requests[ev.request]] = (tokens + [ev.token], logprobs + [ev.logprob], ev.finish_reason)
    return out


def alone(model, prompt, cfg, seed):
    engine = Engine(model, 1, 64)
    return run(engine, {engine.add(prompt, cfg, seed): 0})[0]


def assert_same_run(got, want):
    assert got[0] == want[0] and got[2] == want[2]
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_moe", [False, True])
def test_logprobs_equal_a_recomputation_on_the_full_sequences(use_moe):
    """The log-prob of each sampled token, from the sampling pass, equals model.token_logprobs (ops.linear_logprobs)
    on prompt + completion: temperature 1, raw logits, whatever the sampling settings."""
    model = peaked(7, use_moe)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3,
                         eos_token_id=None)
    r = rollout(model, PROMPTS, num_generations=3, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert r.completions.shape == (12, 12) and r.completion_mask.all()
    ids, labels = r.sequences()
    with torch.no_grad():
        want, _ = model.token_logprobs(ids, labels)
    assert torch.equal(labels[labels != -100], r.completions[r.completion_mask])
    torch.testing.assert_close(r.logprobs[r.completion_mask], want[labels != -100], rtol=1e-5, atol=1e-5)
    assert (r.logprobs < 0).all()
    # the G samples of one prompt differ (their seeds do), and the same generator state gives the same rollout
    assert len({tuple(row) for row in r.completions[:3].tolist()}) > 1
    again = rollout(model, PROMPTS, num_generations=3, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.completions, r.completions)


def test_greedy_rollout_equals_the_reference_path_and_generate():
    model = peaked_model(3)
    r = rollout(model, PROMPTS, cfg=GREEDY)
    reference = Engine(model, 4, 64, use_cache=False)
    ref = run(reference, {reference.add(p, GREEDY): i for i, p in enumerate(PROMPTS)})
    ids, mask = left_pad(PROMPTS)
    old_style = generate(model, ids, mask, GREEDY)
    for i, p in enumerate(PROMPTS):
        full = greedy_by_full_forward(model, torch.tensor([p]), 10)[0].tolist()
        assert r.completions[i].tolist() == ref[i][0] == old_style[i].tolist() == full, i
        torch.testing.assert_close(r.logprobs[i], torch.tensor(ref[i][1]), rtol=1e-5, atol=1e-5)


def test_rows_of_different_lengths_give_what_each_gives_alone():
    model = peaked_model(4)
    seeds = [11, 12, 13, 14]
    batch = rollout(model, PROMPTS, cfg=HOT, seeds=seeds)
    for i, (p, s) in enumerate(zip(PROMPTS, seeds)):
        one = alone(model, p, HOT, s)
        assert batch.completions[i].tolist() == one[0], i
        torch.testing.assert_close(batch.logprobs[i], torch.tensor(one[1]), rtol=1e-5, atol=1e-5)


def test_a_row_joining_mid_decode_gives_what_it_gives_alone():
    """Rows join between steps (into a free row, or after waiting for one) and leave when they finish; a running
    row moved into a finished one's place (its keys, values and seen tokens) goes on as if alone."""
    model = peaked_model(5)
    short = SamplingConfig(max_new_tokens=5, temperature=0.0, eos_token_id=None)
    no_repeats = SamplingConfig(max_new_tokens=10, temperature=0.0, repetition_penalty=1e6, eos_token_id=None)
    plan = {"a": (0, HOT, 1), "b": (1, short, 2), "c": (2, no_repeats, 3), "d": (3, HOT, 4)}
    engine = Engine(model, max_batch=3, max_len=64)
    requests, out = {}, {name: ([], [], None) for name in plan}
    for step in range(8):
        for name in ("ab" if step == 0 else "cd" if step == 3 else ""):
            p, cfg, seed = plan[name]  # c takes the free third row; d waits until b finishes (at step 4)
            requests[engine.add(PROMPTS[p], cfg, seed)] = name
        for ev in engine.step():
            t, lp, _ = out[requests[ev.request]]
            out[requests[ev.request]] = (t + [ev.token], lp + [ev.logprob], ev.finish_reason)
    # one token per step; b left at step 4, c moved into its row and d took c's
    assert [len(out[name][0]) for name in "abcd"] == [8, 5, 5, 4] and out["b"][2] == "length"
    assert [engine.rows[b].handle for b in range(3)] == [1, 3, 4] and not engine.waiting
    rest = run(engine, requests)
    for name in "acd":
        out[name] = tuple(x + y for x, y in zip(out[name][:2], rest[name][:2])) + (rest[name][2],)
    for name, (p, cfg, seed) in plan.items():
        assert_same_run(out[name], alone(model, PROMPTS[p], cfg, seed))
    assert not engine.busy and engine.step() == []


def test_per_row_seeds_do_not_depend_on_the_batch():
    """The same request (prompt, settings, seed) gives the same tokens beside any neighbours, in any row, with any
    max_batch (queued or not)."""
    model = peaked_model(6)
    want = alone(model, PROMPTS[2], HOT, 99)
    for neighbours, max_batch in (([0, 1, 3], 4), ([3], 2), ([1, 0], 1), ([0, 0, 1, 1, 3], 6)):
        engine = Engine(model, max_batch, 64)
        requests = {engine.add(PROMPTS[n], HOT, 1000 + k): f"n{k}" for k, n in enumerate(neighbours[:1])}
        requests[engine.add(PROMPTS[2], HOT, 99)] = "me"
        requests.update({engine.add(PROMPTS[n], HOT, 2000 + k): f"m{k}" for k, n in enumerate(neighbours[1:])})
        assert_same_run(run(engine, requests)["me"], want)
    other = alone(model, PROMPTS[2], HOT, 100)
    assert other[0] != want[0]  # a different seed samples differently


def test_per_row_sampling_settings():
    """A batch whose rows each have their own temperature, top_k, top_p and repetition penalty: each row as alone."""
    model = peaked_model(8)
    cfgs = [SamplingConfig(max_new_tokens=10, temperature=1.3, top_k=3, eos_token_id=None),
            SamplingConfig(max_new_tokens=10, temperature=0.0, repetition_penalty=1e6, eos_token_id=None),
            SamplingConfig(max_new_tokens=10, temperature=0.5, top_p=0.5, eos_token_id=None),
            SamplingConfig(max_new_tokens=10, temperature=2.0, top_p=1.0, eos_token_id=None)]
    r = rollout(model, PROMPTS, cfg=cfgs, seeds=[1, 2, 3, 4])
    for i, (p, c) in enumerate(zip(PROMPTS, cfgs)):
        assert r.completions[i].tolist() == alone(model, p, c, i + 1)[0], i
    penalised = r.completions[1].tolist()
    assert len(set(penalised)) == 10 and not set(penalised) & set(PROMPTS[1])


def test_filter_and_sample_per_row():
    """filter_logits with per-row settings equals the rows filtered one by one; a row's draws stay inside its own
    top_k / top_p set, and a greedy row takes the argmax beside sampled ones."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    top_k, top_p = torch.tensor([0, 5, 1, 10]), torch.tensor([1.0, 1.0, 0.3, 0.5])
    rows = filter_logits(logits, top_k, top_p)
    for b in range(4):
        assert torch.equal(rows[b], filter_logits(logits[b:b + 1], int(top_k[b]), float(top_p[b]))[0])
    cfgs = [SamplingConfig(temperature=1.0, top_k=5, top_p=1.0), SamplingConfig(temperature=0.0),
            SamplingConfig(temperature=0.7, top_p=0.3), SamplingConfig(temperature=3.0, top_p=1.0)]
    many = logits.repeat(500, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(len(many))]
    tokens, logprobs = sample(many, BatchSampling(cfgs * 500, [None if c.temperature == 0 else g for c, g in
                                                              zip(cfgs * 500, gens)], "cpu"))
    tokens = tokens.view(500, 4)
    assert set(tokens[:, 0].tolist()) <= set(logits[0].topk(5).indices.tolist())
    assert len(set(tokens[:, 0].tolist())) > 1
    assert (tokens[:, 1] == logits[1].argmax()).all()
    nucleus = filter_logits(logits[2:3] / 0.7, 0, 0.3)[0].isfinite().nonzero().flatten().tolist()
    assert set(tokens[:, 2].tolist()) <= set(nucleus)
    assert len(set(tokens[:, 3].tolist())) > 10  # hot and unfiltered
    want = torch.log_softmax(many, dim=-1).gather(1, tokens.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(logprobs, want)


def test_filter_among_candidates_equals_the_full_sort():
    """filter_logits looks for each row's set among its top candidates, falling back to the whole vocabulary: the
    same result as sorting it all, for peaked and flat rows, and with ties at the k-th logit (bf16-rounded logits)."""
    g = torch.Generator().manual_seed(0)
    for scale, dtype in ((8.0, torch.float32), (0.5, torch.float32), (3.0, torch.bfloat16)):
        logits = (torch.randn(64, 500, generator=g) * scale).to(dtype).float()
        top_k = torch.randint(0, 12, (64,), generator=g) * (torch.rand(64, generator=g) < 0.6)
        top_p = torch.where(torch.rand(64, generator=g) < 0.7, torch.rand(64, generator=g), torch.ones(64))
        assert torch.equal(filter_logits(logits, top_k, top_p, candidates=4),
                           filter_logits(logits, top_k, top_p, candidates=500))
        for b in range(64):  # each row as alone
            assert torch.equal(filter_logits(logits, top_k, top_p)[b],
                               filter_logits(logits[b:b + 1], int(top_k[b]), float(top_p[b]))[0])


def test_eos_and_the_completion_mask():
    model = peaked_model(2)
    free = rollout(model, PROMPTS, cfg=GREEDY)
    eos = int(free.completions[0, 2])
    first = free.completions[0].tolist().index(eos)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    r = rollout(model, PROMPTS, cfg=cfg)
    assert r.completions[0, :first + 1].tolist() == free.completions[0, :first + 1].tolist()
    assert r.completion_mask[0].tolist() == [j <= first for j in range(r.completions.shape[1])]
    assert r.finish_reasons[0] == "stop" and (r.completions[0, first + 1:] == 0).all()
    assert (r.logprobs[0, first + 1:] == 0).all() and (r.logprobs[0, :first + 1] < 0).all()
    for i in range(1, len(PROMPTS)):
        row = free.completions[i].tolist()
        n = row.index(eos) + 1 if eos in row else 10
        assert r.completion_mask[i].sum() == n and r.completions[i, :n].tolist() == row[:n]
        assert r.finish_reasons[i] == ("stop" if eos in row else "length")
    ids, labels = r.sequences()
    assert ids.shape[1] == max(len(p) + int(m.sum()) for p, m in zip(PROMPTS, r.completion_mask))
    assert (labels != -100).sum() == r.completion_mask.sum()


def test_an_all_finished_batch():
    """Every row finishes at its first token (its eos, or max_new_tokens 1): one step, then the engine is idle and
    the batch's rows are free for the next requests."""
    model = peaked_model(9)
    firsts = [int(rollout(model, [p], cfg=GREEDY).completions[0, 0]) for p in PROMPTS]
    engine = Engine(model, 4, 64)
    cfgs = [SamplingConfig(max_new_tokens=5, temperature=0.0, eos_token_id=t) for t in firsts[:2]]
    cfgs += [SamplingConfig(max_new_tokens=1, temperature=0.0, eos_token_id=None)] * 2
    handles = [engine.add(p, c) for p, c in zip(PROMPTS, cfgs)]
    events = engine.step()
    assert [(e.request, e.token, e.finish_reason) for e in events] == list(zip(handles, firsts, ["stop", "stop",
                                                                                                 "length", "length"]))
    assert not engine.busy and engine.rows == [] and engine.step() == []
    again = engine.add(PROMPTS[1], GREEDY)
    assert run(engine, {again: 0})[0][0] == greedy_by_full_forward(model, torch.tensor([PROMPTS[1]]), 10)[0].tolist()
    stopped = generate(model, left_pad(PROMPTS)[0], left_pad(PROMPTS)[1], max_new_tokens=1, temperature=0.0)
    assert stopped.shape == (4, 1) and stopped[:, 0].tolist() == firsts


def test_cancel_frees_the_row():
    model = peaked_model(10)
    engine = Engine(model, 1, 64)
    first, second = engine.add(PROMPTS[0], GREEDY), engine.add(PROMPTS[1], GREEDY)
    assert {e.request for e in engine.step()} == {first}
    engine.cancel(first)
    out = run(engine, {second: "second"})  # takes the row at once, and nothing more comes from the first
    assert out["second"][0] == alone(model, PROMPTS[1], GREEDY, None)[0]


def test_context_and_max_len():
    model = peaked_model(11)  # max_position_embeddings 64
    with pytest.raises(ValueError, match="max_position_embeddings = 64"):
        Engine(model, 2, 65)
    engine = Engine(model, 2, 16)
    with pytest.raises(ValueError, match="no room for a reply: the engine's max_len is 16"):
        engine.add(list(range(16)))
    with pytest.raises(ValueError, match="vocab_size"):
        engine.add([3, 97])
    with pytest.raises(ValueError, match="at least one token"):
        engine.add([])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add([3], SamplingConfig(max_new_tokens=0))
    cfg = SamplingConfig(max_new_tokens=50, temperature=0.0, eos_token_id=None)
    out = run(engine, {engine.add(list(range(3, 15)), cfg): "near", engine.add([5, 6], cfg): "short"})
    assert len(out["near"][0]) == 4 and out["near"][2] == "length"  # 16 tokens in all
    assert len(out["short"][0]) == 14 and out["short"][2] == "length"
    with pytest.raises(ValueError, match="no room"):
        rollout(model, [list(range(3, 67))], cfg=cfg)
    with pytest.raises(ValueError, match="2 seeds for 3 rows"):
        rollout(model, [[3], [4], [5]], cfg=cfg, seeds=[1, 2])


@pytest.mark.parametrize("use_moe", [False, True])
def test_triton_kernels_give_the_same_rollout(use_moe):
    """kernels='triton' (RoPE on per-token cos/sin rows, under the interpreter on a CPU) against torch."""
    pytest.importorskip("triton")
    model = peaked(12, use_moe)
    tri = MiniMindForCausalLM(model.config, kernels="triton").eval()
    tri.load_state_dict(model.state_dict())
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.8, eos_token_id=None)
    want = rollout(model, PROMPTS[:3], cfg=cfg, seeds=[1, 2, 3])
    got = rollout(tri, PROMPTS[:3], cfg=cfg, seeds=[1, 2, 3])
    assert torch.equal(got.completions, want.completions)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-4, atol=1e-4)
