"""pretrain, sft and reason each train a tiny model a few steps on the bundled demo data, with the torch and the
triton (interpreter on a CPU) kernels, and the loss goes down."""
import pytest
import torch

from tests.train_helpers import demo_data, one_thread, tiny_flags  # noqa: F401  (fixtures)
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import load_tokenizer
from train import pretrain, reason, sft

# Under the Triton interpreter a step takes ~10 s on this 2-core CPU, so the triton runs take 2 smaller steps at a
# higher learning rate.
KERNEL_RUNS = {"torch": dict(steps=6, batch_size=4, seq=64, lr="3e-3"),
               "triton": dict(steps=2, batch_size=2, seq=64, lr="1e-2")}

pytestmark = pytest.mark.usefixtures("one_thread")


def _first_batch_loss(model, kind, path, shape):
    """Loss (torch reference kernels) on the first batch of the epoch: the batch of step 1, fixed, so before and
    after differ only by training, not by which batch was drawn (batches of chat data differ by ~0.3 in loss)."""
    from minimind.data import build_loader
    from minimind.tokenizer import load_tokenizer
    batch = next(iter(build_loader(kind, path, load_tokenizer(), max_seq_len=shape["seq"],
                                   batch_size=shape["batch_size"])))
    kernels = model.ops.name
    model.set_kernels("torch")
    try:
        with torch.no_grad():
            return model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"]).loss.item()
    finally:
        model.set_kernels(kernels)


def _model_from(weights, like):
    model = MiniMindForCausalLM(like.config)
    if weights is not None:
        model.load_state_dict({k: v.float() for k, v in torch.load(weights, weights_only=True).items()})
    return model  # else a random initialisation


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_pretrain_sft_reason_chain(kernels, demo_data, tmp_path):  # noqa: F811
    """pretrain from scratch -> sft from pretrain_* -> reason from full_sft_*: each writes its MiniMind2 file, and
    each lowers the loss on the batch it started with."""
    run = dict(KERNEL_RUNS[kernels])
    lr = ["--learning_rate", run.pop("lr")]
    shape = dict(seq=run["seq"], batch_size=run["batch_size"])
    start = None
    for stage, kind, prev in ((pretrain, "pretrain", None), (sft, "sft", "pretrain"), (reason, "reason", "full_sft")):
        argv = tiny_flags(tmp_path, demo_data[kind], kernels=kernels, extra=[*lr, "--from_weight", prev or "none"],
                          **run)
        result = stage.main(argv)
        model = result["model"]
        before = _first_batch_loss(_model_from(start, model), kind, demo_data[kind], shape)
        after = _first_batch_loss(model, kind, demo_data[kind], shape)
        assert after < before - 0.2, f"{kind} with {kernels}: loss {before:.4f} -> {after:.4f}"
        assert len(result["losses"]) == run["steps"]
        start = result["weights_path"]
        assert start.endswith(f"{stage.STAGE.save_prefix}_64.pth")
        sd = torch.load(start, weights_only=True)
        assert sd["model.embed_tokens.weight"].dtype == torch.float16 and "lm_head.weight" in sd
    assert len((tmp_path / "reason_metrics.jsonl").read_text().splitlines()) == run["steps"]


def test_sft_starts_from_pretrain_weights(demo_data, tmp_path):  # noqa: F811
    """--from_weight pretrain loads out/pretrain_64.pth: the first SFT loss is that of the pretrained model."""
    pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=6))
    from_pretrained = sft.main(tiny_flags(tmp_path / "a", demo_data["sft"], steps=1,
                                          extra=["--from_weight", str(tmp_path / "pretrain_64.pth")]))
    from_scratch = sft.main(tiny_flags(tmp_path / "b", demo_data["sft"], steps=1, extra=["--from_weight", "none"]))
    assert from_pretrained["losses"][0][1] < from_scratch["losses"][0][1] - 0.3


def test_template_weights_mark_whole_tags_inside_the_assistant_span():
    tags = [[30, 450, 1573, 32], [5540, 450, 1573, 32]]  # "<think>" and "</think>" in MiniMind's tokenizer
    labels = torch.tensor([[-100, 30, 450, 1573, 32, 7, 450, 9, 5540, 450, 1573, 32, 2]])
    w, is_tag = reason.template_weights(labels, tags, 10.0)
    expected = torch.tensor([[1, 10, 10, 10, 10, 1, 1, 1, 10, 10, 10, 10, 1]], dtype=torch.float32)
    assert torch.equal(w, expected)  # a lone 450 ("th") outside a tag keeps weight 1
    assert int(is_tag.sum()) == 8
    prompt_tag = torch.tensor([[30, 450, 1573, 32, -100, 5]])  # a tag in the prompt (-100 in labels) also has -100
    w, _ = reason.template_weights(prompt_tag.masked_fill(torch.arange(6) < 5, -100), tags, 10.0)
    assert torch.equal(w, torch.ones(1, 6))


def test_reason_demo_data_has_template_tags(demo_data):  # noqa: F811
    """The tags are found in real tokenized reason data: 4 per reply."""
    from minimind.data import build_loader
    from minimind.tokenizer import load_tokenizer
    tok = load_tokenizer()
    batch = next(iter(build_loader("reason", demo_data["reason"], tok, max_seq_len=512, batch_size=4)))
    _, is_tag = reason.template_weights(batch["labels"], reason.tag_token_ids(tok), 10.0)
    tag_tokens = sum(len(ids) for ids in reason.tag_token_ids(tok))
    assert int(is_tag.sum()) == 4 * tag_tokens


def test_a_trained_weight_file_opens_by_itself(demo_data, tmp_path):  # noqa: F811
    """Every stage writes a model card beside the weights, so minimind.weights.load_model (chat, serve, export)
    opens the file without being told the shape: here 4 heads, which the tensors alone cannot show."""
    from minimind.weights import config_path, load_model, load_tokenizer_for, read_card
    result = sft.main(tiny_flags(tmp_path, demo_data["sft"], steps=1, extra=["--from_weight", "none"]))
    path = result["weights_path"]
    assert config_path(path).is_file()
    loaded = load_model(path)
    assert loaded.config == result["model"].config and loaded.config.num_attention_heads == 4
    assert read_card(path)["tokenizer"] is None  # the bundled tokenizer
    assert load_tokenizer_for(path).fingerprint == load_tokenizer().fingerprint
    trained = _model_from(path, result["model"]).eval()
    ids = torch.randint(0, loaded.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=0, atol=0)
