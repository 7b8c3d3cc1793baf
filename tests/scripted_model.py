"""A model that says what a test scripts, for the tests of what is done with a reply (thinking shown apart, tool
calls run, the eval's scores): a tiny model whose lm_head puts all the probability on the next token of the
script, so generation, greedy or sampled, yields the scripted replies in order, one per request, each ended by
<|im_end|>. It records the prompt of every request (what the chat template rendered), so a test checks that too.
And the real minimind-3 tokenizer (../shared; a failure under CI when missing)."""
import torch

from minimind.tokenizer import load_tokenizer
from tests.reference_files import reference_folder
from tests.test_chat import tiny


def minimind3_tokenizer():
    return load_tokenizer(reference_folder("minimind3-tokenizer"))


class ScriptedHead(torch.nn.Module):
    """An lm_head that answers every call with the script's next token (logit 50, every other 0)."""

    def __init__(self, vocab_size: int, ids):
        super().__init__()
        self.vocab_size, self.ids, self.position = vocab_size, list(ids), 0

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size, device=hidden.device)
        logits[..., self.ids[self.position % len(self.ids)]] = 50.0
        self.position += 1
        return logits


def scripted_model(tokenizer, *replies, **config):
    """tiny(**config) that answers request k with replies[k] (cycling), requests one at a time. model.say(*replies)
    starts a new script; model.prompts: the token ids of each request's prompt since."""
    model = tiny(**config)
    model.lm_head = ScriptedHead(model.config.vocab_size, [tokenizer.eos_id])
    body = model.model.forward

    def say(*replies):
        model.lm_head.ids = [t for reply in replies for t in tokenizer.encode(reply) + [tokenizer.eos_id]]
        model.lm_head.position = 0
        model.prompts = []

    def recording(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1:  # a prefill (a decode step feeds one token)
            model.prompts.append(input_ids[0].tolist())
        return body(input_ids, *args, **kwargs)
    model.say, model.model.forward = say, recording
    say(*replies)
    return model
