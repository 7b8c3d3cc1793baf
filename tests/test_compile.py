"""--compile reaches every model a stage runs: engine.compile_blocks compiles each decoder block in place, so the
trained model's forward, token_logprobs (DPO) and model.model (distillation) and the frozen reference / teacher
all run compiled blocks. Most tests compile with a counting backend (dynamo's trace, run eagerly, each call of a
compiled graph recorded with its grad mode): fast, and exact about which blocks ran compiled and how often. One
test compiles for real (inductor, C++ on the CPU)."""
import pytest
import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.demo import write_demo_data
from minimind.tokenizer import load_tokenizer
from tests.train_helpers import one_thread  # noqa: F401  (fixture)
from train import distill, dpo, engine, lora

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")

TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4", "--num_key_value_heads",
        "2", "--device", "cpu", "--dtype", "fp32", "--log_interval", "1", "--max_seq_len", "48", "--batch_size", "2",
        "--max_steps", "2", "--epochs", "1", "--learning_rate", "5e-3"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend(calls):
    """A torch.compile backend that runs dynamo's graph as traced and appends torch.is_grad_enabled() to `calls`
    on every call of a compiled graph."""
    def backend(gm, example_inputs):
        def run(*args):
            calls.append(torch.is_grad_enabled())
            return gm.forward(*args)
        return run
    return backend


@pytest.fixture
def counted_compile(monkeypatch):
    """engine.compile_blocks with the counting backend; returns the list of recorded calls."""
    calls, real = [], engine.compile_blocks
    monkeypatch.setattr(engine, "compile_blocks", lambda model: real(model, backend=counting_backend(calls)))
    return calls


@pytest.fixture
def files(tmp_path):
    tok = load_tokenizer()
    data = write_demo_data(tmp_path / "data", sizes=dict(pretrain=10, sft=32, dpo=32, reason=10))
    torch.manual_seed(1)
    base = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=tok.vocab_size))
    torch.save(base.state_dict(), tmp_path / "base.pth")
    teacher = MiniMindForCausalLM(MiniMindConfig(hidden_size=96, num_hidden_layers=3,  # its size is read off the
                                                 vocab_size=tok.vocab_size))            # file: default 8 heads
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    return dict(data=data, base=tmp_path / "base.pth", teacher=tmp_path / "teacher.pth", out=tmp_path)


def _dpo_argv(files, out, extra=()):
    return TINY + ["--data_path", str(files["data"]["dpo"]), "--from_weight", str(files["base"]),
                   "--out_dir", str(files["out"] / out), *extra]


def _distill_argv(files, out, extra=()):
    return TINY + ["--data_path", str(files["data"]["sft"]), "--from_weight", str(files["base"]),
                   "--teacher_weight", str(files["teacher"]), "--out_dir", str(files["out"] / out), *extra]


def _losses(result):
    return [loss for _, loss in result["losses"]]


def test_compile_blocks_in_place_keeps_keys_and_values():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=97))
    keys = list(model.state_dict())
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        want = model(ids, labels=ids).loss
    calls = []
    assert engine.compile_blocks(model, backend=counting_backend(calls)) is model
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: weight files and resume states unchanged
    assert all(block._compiled_call_impl is not None for block in model.model.layers)
    with torch.no_grad():
        got = model(ids, labels=ids).loss
        model.token_logprobs(ids, ids)
        model.model(ids)
    assert calls == [False] * 6  # three entry points x two blocks, each block one graph (no graph break)
    assert torch.equal(got, want)
    assert torch._dynamo.config.recompile_limit >= engine.RECOMPILE_LIMIT


def test_dpo_compile_runs_policy_and_reference_blocks_compiled(files, counted_compile):
    eager = dpo.main(_dpo_argv(files, "eager"))
    compiled = dpo.main(_dpo_argv(files, "compiled", ["--compile"]))
    # per step: the policy's token_logprobs with gradients (2 blocks), the reference's without (2 blocks)
    assert sorted(counted_compile) == [False] * 4 + [True] * 4
    assert _losses(compiled) == _losses(eager)


def test_compile_mode_reaches_every_compiled_model_and_each_step_marks_a_graph_generation(files, monkeypatch):
    """--compile_mode reduce-overhead implies --compile, gives its mode to the policy's and the reference's blocks
    (the CUDA graphs themselves need a GPU: here the counting backend compiles), and every optimizer step starts a
    new CUDA-graph generation."""
    calls, options, steps, real = [], [], [], engine.compile_blocks

    def compile_blocks(model, **kwargs):
        options.append(kwargs)
        return real(model, backend=counting_backend(calls))
    monkeypatch.setattr(engine, "compile_blocks", compile_blocks)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    result = dpo.main(_dpo_argv(files, "graphs", ["--compile_mode", "reduce-overhead"]))
    assert options == [{"mode": "reduce-overhead"}] * 2 and sorted(calls) == [False] * 4 + [True] * 4
    assert len(steps) == result["steps"] == 2


def test_dpo_precomputed_reference_runs_compiled_once_over_the_data(files, counted_compile):
    from minimind.data import build_loader
    dpo.main(_dpo_argv(files, "compiled", ["--compile", "--precompute_ref"]))
    batches = len(build_loader("dpo", files["data"]["dpo"], load_tokenizer(), max_seq_len=48, batch_size=2,
                               drop_last=False))  # the precompute pass's loader
    assert batches >= 10
    # the reference's 2 blocks once per batch before training, then only the policy's, 2 per step
    assert counted_compile == [False] * 2 * batches + [True] * 4


def test_distill_compile_runs_student_and_teacher_blocks_compiled(files, counted_compile):
    eager = distill.main(_distill_argv(files, "eager"))
    compiled = distill.main(_distill_argv(files, "compiled", ["--compile"]))
    # per step: the student's model.model with gradients (2 blocks), the teacher's without (3 blocks)
    assert sorted(counted_compile) == [False] * 6 + [True] * 4
    assert _losses(compiled) == _losses(eager)


def test_lora_compile_trains_the_adapters_inside_compiled_blocks(files, counted_compile):
    argv = TINY + ["--data_path", str(files["data"]["sft"]), "--from_weight", str(files["base"]),
                   "--lora_targets", "all"]
    eager = lora.main(argv + ["--out_dir", str(files["out"] / "eager")])
    compiled = lora.main(argv + ["--out_dir", str(files["out"] / "compiled"), "--compile"])
    assert counted_compile == [True] * 4
    assert _losses(compiled) == _losses(eager)
    a, b = torch.load(eager["weights_path"]), torch.load(compiled["weights_path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_compile_with_inductor(files):
    """The real compiler (inductor, C++ on the CPU): the same loss as eager, up to float rounding. One layer (so
    not the shared base weights) and one step, to keep the compile short (~20 s cold on this CPU; the steps of
    other lengths, dynamic-shape recompiles, would take ~7 s each; the counted tests above cover them)."""
    small = ["--num_hidden_layers", "1", "--from_weight", "none", "--max_steps", "1"]
    eager = dpo.main(_dpo_argv(files, "eager", small))
    compiled = dpo.main(_dpo_argv(files, "compiled", small + ["--compile"]))
    assert all(block._compiled_call_impl is not None for block in compiled["model"].model.layers)
    torch.testing.assert_close(torch.tensor(_losses(compiled)), torch.tensor(_losses(eager)), rtol=1e-5, atol=1e-6)
