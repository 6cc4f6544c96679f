import pytest
import torch
import transformers

from grailcore.token_logprobs import token_logprobs
from grailcore.loss import grpo_loss

PROMPT_LENGTHS = [4, 6, 2]  # left padded to 6
COMPLETION_LENGTHS = [5, 2, 3]  # right padded to 5
PAD = 0
TEMPERATURE = 0.7


def tiny_llama(tied: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).float().eval()


def make_inputs():
    """input_ids/attention_mask [B, 11] (prompt left padded, completion right padded)
    and completion_mask [B, 5]."""
    gen = torch.Generator().manual_seed(1)
    prompt_width, completion_width = max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    ids, attention, completion_mask = [], [], []
    for p, c in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS):
        tokens = torch.randint(1, 1000, (p + c,), generator=gen)
        ids.append(torch.cat([torch.full((prompt_width - p,), PAD), tokens, torch.full((completion_width - c,), PAD)]))
        row_mask = torch.cat([torch.zeros(prompt_width - p), torch.ones(p + c), torch.zeros(completion_width - c)])
        attention.append(row_mask.long())
        completion_mask.append(row_mask[prompt_width:].bool())
    return torch.stack(ids), torch.stack(attention), torch.stack(completion_mask)


def test_naive_matches_the_models_own_logits():
    model = tiny_llama(tied=False)
    input_ids, attention_mask, completion_mask = make_inputs()
    keep = completion_mask.shape[1]
    with torch.no_grad():
        out = token_logprobs(model, input_ids, attention_mask, keep, temperature=TEMPERATURE, impl="naive",
                             completion_mask=completion_mask, return_entropy=True)
        # Ground truth from the full forward, per row without padding: the padded batch
        # must give each sequence the log-probs it has alone.
        for row, (p, c) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS)):
            start = max(PROMPT_LENGTHS) - p
            tokens = input_ids[row, start : start + p + c][None]  # [1, p + c]
            logits = model(tokens).logits[0, p - 1 : p + c - 1].double() / TEMPERATURE  # [c, V]
            log_probs = torch.log_softmax(logits, -1)
            expected = log_probs.gather(-1, tokens[0, p:, None]).squeeze(-1)  # [c]
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            torch.testing.assert_close(out.logprobs[row, :c].double(), expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.entropy[row, :c].double(), entropy, rtol=0, atol=1e-5)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == completion_mask.shape
    assert (out.logprobs[~completion_mask] == 0).all() and (out.entropy[~completion_mask] == 0).all()


def loss_and_grads(model, impl, chunk_size=None):
    """A GRPO step's loss (with an entropy bonus, so its backward is exercised too)
    and the gradients of every parameter."""
    model.zero_grad()
    input_ids, attention_mask, completion_mask = make_inputs()
    out = token_logprobs(model, input_ids, attention_mask, completion_mask.shape[1], temperature=TEMPERATURE,
                         impl=impl, chunk_size=chunk_size, completion_mask=completion_mask, return_entropy=True)
    ref = out.logprobs.detach() + 0.1
    loss = grpo_loss(out.logprobs, out.logprobs.detach() - 0.05, ref, torch.tensor([1.0, -0.5, 0.8]),
                     completion_mask, epsilon_low=0.2, epsilon_high=0.28, beta=0.04, loss_type="grpo").loss
    masked_entropy = (out.entropy * completion_mask).sum() / completion_mask.sum()
    (loss - 0.01 * masked_entropy).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


@pytest.mark.parametrize("tied", [False, True])
def test_fused_and_naive_give_the_same_loss_and_gradients(tied):
    model = tiny_llama(tied)
    naive, naive_loss, naive_grads = loss_and_grads(model, "naive")
    fused, fused_loss, fused_grads = loss_and_grads(model, "fused", chunk_size=4)  # several chunks
    torch.testing.assert_close(fused.logprobs, naive.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.entropy, naive.entropy, rtol=0, atol=1e-5)
    assert abs(fused_loss.item() - naive_loss.item()) < 1e-5
    assert fused_grads.keys() == naive_grads.keys()
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert head in fused_grads and naive_grads[head].abs().sum() > 0
    for name, grad in naive_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_positions_are_numbered_from_each_rows_first_real_token():
    model = tiny_llama(tied=False)
    input_ids, attention_mask, _ = make_inputs()
    seen = {}
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        token_logprobs(model, input_ids, attention_mask, 5, impl="naive")
    expected = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0],
                             [0, 0, 0, 0, 0, 1, 2, 3, 4, 0, 0]])
    padded = attention_mask == 0
    assert torch.equal(seen["position_ids"][~padded], expected[~padded])


def test_without_completion_mask_every_completion_column_is_scored():
    model = tiny_llama(tied=False)
    input_ids, attention_mask, completion_mask = make_inputs()
    with torch.no_grad():
        masked = token_logprobs(model, input_ids, attention_mask, 5, impl="fused", completion_mask=completion_mask)
        full = token_logprobs(model, input_ids, attention_mask, 5, impl="fused")
    assert full.entropy is None
    assert (full.logprobs < 0).all()
    torch.testing.assert_close(full.logprobs[completion_mask], masked.logprobs[completion_mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [(dict(impl="triton"), "impl must be"), (dict(logits_to_keep=11), "logits_to_keep")])
def test_bad_arguments_are_rejected(kwargs, match):
    model = tiny_llama(tied=False)
    input_ids, attention_mask, _ = make_inputs()
    with pytest.raises(ValueError, match=match):
        token_logprobs(model, input_ids, attention_mask, **({"logits_to_keep": 5} | kwargs))


def test_models_with_transformed_logits_are_refused():
    model = tiny_llama(tied=False)
    model.config.final_logit_softcapping = 30.0
    input_ids, attention_mask, _ = make_inputs()
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        token_logprobs(model, input_ids, attention_mask, 5, impl="naive")
