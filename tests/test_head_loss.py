"""The output layer fused with the losses, a chunk at a time (peer_model/head_loss.py), against full logits and
``F.cross_entropy`` / ``F.kl_div``: the same losses and gradients, and the same training steps."""
import pytest
import torch
import torch.nn.functional as F

from peer_model.continual.distillation import distillation_loss
from peer_model.head_loss import Head, head_loss
from peer_model.train import evaluate_bpb, train

from test_train import DATA, VAL, small_cfg, tiny_model

B, T, D, V = 3, 10, 16, 50


def leaf(*shape):
    return torch.randn(*shape, dtype=torch.float32).requires_grad_()


@pytest.mark.parametrize("chunk", [0, 1, 7, 30, 1000])
def test_cross_entropy_and_its_gradients_equal_the_full_logits(chunk):
    torch.manual_seed(chunk)
    hidden, weight, targets = leaf(B, T, D), leaf(V, D), torch.randint(0, V, (B, T))
    loss = head_loss(Head(hidden, weight, 0.5, chunk), targets, 1.0 / targets.numel())
    grads = torch.autograd.grad(3.0 * loss, (hidden, weight))
    expected = F.cross_entropy((0.5 * hidden @ weight.t()).flatten(0, 1), targets.flatten())
    expected_grads = torch.autograd.grad(3.0 * expected, (hidden, weight))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 4, 13])
def test_distillation_terms_equal_kl_div_on_the_chosen_tokens(chunk):
    torch.manual_seed(chunk)
    hidden, weight, targets = leaf(B, T, D), leaf(V, D), torch.randint(0, V, (B, T))
    teacher_hidden, teacher_weight = torch.randn(B, T, D), torch.randn(V, D)
    ce_weights, kl_weights = torch.rand(B, T), torch.rand(B, T) * (torch.rand(B, T) > 0.4)
    loss = head_loss(Head(hidden, weight, 1.0, chunk), targets, ce_weights, Head(teacher_hidden, teacher_weight),
                     kl_weights)
    grads = torch.autograd.grad(loss, (hidden, weight))
    log_q = F.log_softmax(hidden @ weight.t(), -1)
    log_p = F.log_softmax(teacher_hidden @ teacher_weight.t(), -1)
    ce = F.nll_loss(log_q.flatten(0, 1), targets.flatten(), reduction="none").view(B, T)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    expected = (ce_weights * ce).sum() + (kl_weights * kl).sum()
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def full_logits_loss(head, inputs, targets, extras):
    """The unfused path: every logit at once, ``F.cross_entropy``."""
    return F.cross_entropy(head.logits().float().flatten(0, 1), targets.flatten())


def test_training_steps_equal_the_full_logits_path():
    cfg = small_cfg(steps=3, loss_chunk_tokens=24, eval_every=3)
    chunked, full = tiny_model(), tiny_model()
    train(chunked, DATA, None, cfg)
    train(full, DATA, None, cfg, loss_fn=full_logits_loss)
    for (name, a), (_, b) in zip(chunked.named_parameters(), full.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


class Replayed:
    """DATA's windows, every other one tagged as replay of an earlier corpus (MixedData's ``source``)."""

    def sample_batch(self, batch_size, seq_len, generator=None):
        inputs, targets = DATA.sample_batch(batch_size, seq_len, generator)
        return inputs, targets, torch.arange(batch_size) % 2 - 1


def test_distillation_loss_equals_the_full_logits_kl():
    teacher, student = tiny_model(seed=1).eval(), tiny_model()
    inputs, targets, source = Replayed().sample_batch(4, 16, torch.Generator().manual_seed(0))
    loss = distillation_loss(teacher, 0.7, old_rows_only=True)(student.head(inputs, 5), inputs, targets, (source,))
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    logits, rows = student(inputs), source >= 0
    with torch.no_grad():
        teacher_logits = teacher(inputs[rows])
    kl = F.kl_div(F.log_softmax(logits[rows], -1).flatten(0, 1), F.log_softmax(teacher_logits, -1).flatten(0, 1),
                  reduction="sum", log_target=True)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + 0.7 * kl / (rows.sum() * inputs.shape[1])
    expected_grads = torch.autograd.grad(expected, list(student.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        if want is not None:
            torch.testing.assert_close(got.to_dense() if got.is_sparse else got,
                                       want.to_dense() if want.is_sparse else want, atol=1e-5, rtol=1e-4)


def test_evaluation_in_chunks_equals_full_logits_and_reports_progress():
    model = tiny_model().eval()
    seen = []
    bpb = evaluate_bpb(model, VAL, 32, 4, max_batches=3, chunk_tokens=10, on_batch=lambda *a: seen.append(a))
    total, count = 0.0, 0
    for inputs, targets in VAL.iter_eval_batches(4, 32, 3):
        with torch.no_grad():
            total += F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    assert bpb == pytest.approx(total / count / torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    assert seen == [(1, 3), (2, 3), (3, 3)] and VAL.eval_batch_count(4, 32, 3) == 3
