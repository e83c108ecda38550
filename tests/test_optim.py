"""Skipping non-finite steps: the flag, the fused optimizer's device-side skip, the counter."""
import pytest
import torch

from curriculum.optim import (NonFiniteCounter, before_step, match_restored_groups, nonfinite_flag, release,
                             skip_if_nonfinite, skips_on_device)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


@pytest.mark.parametrize("where", ["loss", "grad", None])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_flag_marks_any_nonfinite_loss_or_gradient(where, value):
    grads = [torch.ones(3, 2), torch.zeros(7)]
    loss = torch.tensor(2.0)
    if where == "loss":
        loss = loss * value
    elif where == "grad":
        grads[1][4] = value
    flag = nonfinite_flag(grads, loss)
    assert flag.dtype == torch.float32 and flag.item() == (1.0 if where else 0.0)
    assert nonfinite_flag([], None if where != "loss" else loss).item() == (1.0 if where == "loss" else 0.0)


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_step_changes_nothing_and_a_finite_one_is_a_plain_step(fused):
    """Fused AdamW skips on the device (found_inf); the others drop the gradients on the host.
    Either way a bad step leaves weights and optimizer state as they were, and a good step
    equals an unguarded AdamW step."""
    guarded, plain = _params(), _params()
    opt = torch.optim.AdamW(guarded, lr=0.1, weight_decay=0.1, fused=fused or None)
    ref = torch.optim.AdamW(plain, lr=0.1, weight_decay=0.1)
    assert skips_on_device(opt) == fused and not skips_on_device(ref)
    counter = NonFiniteCounter()
    for step, bad in enumerate([False, True, True, False, True]):
        for p, q in zip(guarded, plain):
            grad = torch.full_like(p, 0.5 + step)
            p.grad = grad.clone()
            q.grad = grad.clone()
            if bad:
                p.grad.view(-1)[0] = float("nan")
        before = [p.detach().clone() for p in guarded]
        loss = torch.tensor(1.0)
        skip_if_nonfinite(opt, guarded, loss, counter)
        opt.step()
        release(opt)
        assert not hasattr(opt, "found_inf")
        if bad:
            assert all(torch.equal(p, b) for p, b in zip(guarded, before))
        else:
            ref.step()
            assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(guarded, plain))
        for p in guarded:
            p.grad = None
    assert counter.skipped == 3 and counter.streak == 1
    steps = {int(opt.state[p]["step"]) for p in guarded}
    assert steps == {2}  # bias correction counts only the steps taken


@pytest.mark.parametrize("saved_fused,now_fused", [(False, True), (True, False)])
def test_a_restored_optimizer_takes_this_runs_kernel(saved_fused, now_fused):
    """load_state_dict brings the saved param groups' kernel choice along (a CPU run resumed on a
    GPU: non-fused groups in a fused optimizer, which then handed found_inf to a kernel without
    it); matched back, the optimizer skips and steps as one built fresh."""
    params = _params()
    saved = torch.optim.AdamW(params, lr=0.1, fused=saved_fused or None)
    for p in params:
        p.grad = torch.ones_like(p)
    saved.step()
    restored_params = _params()
    restored = torch.optim.AdamW(restored_params, lr=0.1, fused=now_fused or None)
    restored.load_state_dict(saved.state_dict())
    assert [bool(g.get("fused")) for g in restored.param_groups] == [saved_fused]  # the file's choice
    match_restored_groups(restored)
    assert [bool(g.get("fused")) for g in restored.param_groups] == [now_fused]
    assert skips_on_device(restored) == now_fused
    counter = NonFiniteCounter()
    for bad in (True, False):
        for p in restored_params:
            p.grad = torch.full_like(p, float("nan") if bad else 1.0)
        before = [p.detach().clone() for p in restored_params]
        skip_if_nonfinite(restored, restored_params, torch.tensor(1.0), counter)
        restored.step()
        release(restored)
        unchanged = all(torch.equal(p, b) for p, b in zip(restored_params, before))
        assert unchanged == bad
    assert {int(restored.state[p]["step"]) for p in restored_params} == {2}


@pytest.mark.parametrize("fused", [True, False])
def test_before_step_clips_finite_steps_and_still_skips_bad_ones(fused):
    """The check, then the clip: a finite step's gradients come out with total 2-norm ``grad_clip``
    (direction kept), a small one untouched; a non-finite step is still skipped."""
    params = _params()
    opt = torch.optim.AdamW(params, lr=0.1, fused=fused or None)
    counter = NonFiniteCounter()
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    grads = [p.grad.clone() for p in params]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    before_step(opt, params, torch.tensor(1.0), counter, grad_clip=1.5)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert torch.isclose(clipped, torch.tensor(1.5), rtol=1e-5)
    assert all(torch.allclose(p.grad, g * 1.5 / norm, rtol=1e-5) for p, g in zip(params, grads))
    release(opt)
    before_step(opt, params, torch.tensor(1.0), counter, grad_clip=100.0)  # under the bound: as it was
    assert torch.isclose(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])), clipped)
    release(opt)
    params[0].grad[0, 0] = float("nan")
    weights = [p.detach().clone() for p in params]
    before_step(opt, params, torch.tensor(1.0), counter, grad_clip=1.5)
    opt.step()
    release(opt)
    assert counter.skipped == 1 and all(torch.equal(p, w) for p, w in zip(params, weights))


def test_counter_streak_resets_and_resumes_from_a_checkpoint_count():
    c = NonFiniteCounter(skipped=7)
    for bad, streak in [(1, 1), (1, 2), (0, 0), (1, 1)]:
        c.add(torch.tensor(float(bad)))
        assert c.streak == streak
    assert c.skipped == 10
    c.sync()  # a no-op on the host
    assert c.skipped == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-step-late read is for CUDA devices")
def test_counter_on_cuda_reads_one_step_late_and_sync_catches_up():
    c = NonFiniteCounter(skipped=1)
    seen = []
    for bad in (1, 1, 0):
        c.add(torch.tensor(float(bad), device="cuda"))
        seen.append((c.skipped, c.streak))
    assert seen == [(1, 0), (2, 1), (3, 2)]
    c.sync()
    assert (c.skipped, c.streak) == (3, 0)


def test_flag_ignores_huge_but_finite_gradients():
    # a 2-norm of these overflows to inf in fp32; they are finite and must not skip the step
    assert nonfinite_flag([torch.full((4,), 1e30), torch.ones(3)], torch.tensor(1.0)).item() == 0.0


def test_mixed_fused_groups_do_not_skip_on_device():
    a, b = _params()
    opt = torch.optim.AdamW([{"params": [a], "fused": True}, {"params": [b], "fused": False}], lr=0.1)
    assert not skips_on_device(opt)


@pytest.mark.parametrize("fused", [True, False])
def test_all_reduced_flag_decides_the_skip(fused):
    """Another rank's non-finite step makes this rank skip its finite one."""
    params = _params()
    opt = torch.optim.AdamW(params, lr=0.1, fused=fused or None)
    for p in params:
        p.grad = torch.ones_like(p)
    seen = []

    def all_reduce(flag):
        seen.append(flag.item())
        flag.fill_(1.0)

    counter = NonFiniteCounter()
    before = [p.detach().clone() for p in params]
    skip_if_nonfinite(opt, params, torch.tensor(1.0), counter, all_reduce=all_reduce)
    opt.step()
    release(opt)
    assert seen == [0.0] and counter.skipped == 1
    assert all(torch.equal(p, w) for p, w in zip(params, before))
