"""Losses against hand-computed values (math.log/exp, arithmetic written out), gradient signs, reductions.

Shared fixture (B=2, T=4): masks have padding, values outside the masks are junk (9.0, NaN) that must never
leak in, row 1 of the chosen side has a real token with log-prob exactly 0, and rejected row 1 is one token.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import selpo_core.losses as losses_module
from selpo_core.losses import (
    dpo_loss,
    ipo_loss,
    selective_dpo_loss,
    selective_dpo_masks,
    selective_ref_dpo_loss,
    sepo_loss,
    simpo_loss,
    tdpo_loss,
    tso_dual_clip_loss,
)

NAN = math.nan
T, F = True, False
MASK_W = [[F, T, T, F], [F, T, T, T]]
MASK_L = [[F, T, T, T], [F, F, T, F]]
PW = [[0.0, -1.0, -2.0, 9.0], [0.0, -0.5, -0.25, 0.0]]  # 9.0 is padding junk; row 1's final 0.0 is real
PL = [[0.0, -1.5, -0.5, -3.0], [0.0, NAN, -4.0, NAN]]  # NaN junk outside the mask
RW = [[0.0, -1.5, -1.0, -7.0], [0.0, -0.25, -0.75, -0.5]]
RL = [[0.0, -1.0, -1.0, -2.0], [0.0, 5.0, -3.0, 5.0]]
KW = [[0.0, 0.1, 0.2, 99.0], [0.0, 0.3, 0.0, 0.5]]
KLL = [[0.0, 0.05, 0.05, 0.1], [NAN, 7.0, 0.4, 7.0]]

# (S_w - S_w^ref, S_l - S_l^ref) per row, summed by hand over the masked tokens only.
RATIO_W = [(-1.0 - 2.0) - (-1.5 - 1.0), (-0.5 - 0.25 + 0.0) - (-0.25 - 0.75 - 0.5)]  # [-0.5, 0.75]
RATIO_L = [(-1.5 - 0.5 - 3.0) - (-1.0 - 1.0 - 2.0), (-4.0) - (-3.0)]  # [-1.0, -1.0]
D_W = [0.1 + 0.2, 0.3 + 0.0 + 0.5]
D_L = [0.05 + 0.05 + 0.1, 0.4]


def t(x: list[list[float]] | list[list[bool]], *, grad: bool = False) -> Tensor:
    if isinstance(x[0][0], bool):
        return torch.tensor(x, dtype=torch.bool)
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def neg_logsig(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log(1.0 + math.exp(-x))


def dpo_args(*, grad: bool = False) -> tuple[Tensor, ...]:
    return t(PW, grad=grad), t(PL, grad=grad), t(RW), t(RL), t(MASK_W), t(MASK_L)


def check(actual: Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32 and actual.shape == (len(expected),)
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- hand values


def test_dpo_hand_values_and_rewards() -> None:
    beta = 0.1
    losses, chosen_r, rejected_r = dpo_loss(*dpo_args(grad=True), beta=beta, label_smoothing=0.0)
    check(losses, [neg_logsig(beta * (w - lo)) for w, lo in zip(RATIO_W, RATIO_L, strict=True)])
    check(chosen_r, [beta * -0.5, beta * 0.75])
    check(rejected_r, [beta * -1.0, beta * -1.0])
    assert losses.requires_grad and not chosen_r.requires_grad and not rejected_r.requires_grad


def test_cdpo_label_smoothing_hand_values() -> None:
    beta, eps = 0.5, 0.2
    losses, _, _ = dpo_loss(*dpo_args(), beta=beta, label_smoothing=eps)
    z = [beta * (0.5), beta * (1.75)]  # ratio_w - ratio_l per row
    check(losses, [(1 - eps) * neg_logsig(zi) + eps * neg_logsig(-zi) for zi in z])


def test_cdpo_with_zero_smoothing_is_dpo() -> None:
    smoothed, _, _ = dpo_loss(*dpo_args(), beta=0.3, label_smoothing=0.0)
    check(smoothed, [neg_logsig(0.3 * 0.5), neg_logsig(0.3 * 1.75)])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*dpo_args(), beta=0.3, label_smoothing=0.5)


def test_ipo_uses_summed_log_ratios() -> None:
    beta = 0.1
    losses, chosen_r, _ = ipo_loss(*dpo_args(), beta=beta)
    # h = 0.5 and 1.75; target margin 1 / (2 * 0.1) = 5.
    check(losses, [(0.5 - 5.0) ** 2, (1.75 - 5.0) ** 2])
    check(chosen_r, [beta * -0.5, beta * 0.75])


def test_simpo_hand_values_count_real_zero_logp() -> None:
    beta, ratio = 2.0, 0.5
    losses, chosen_r, rejected_r = simpo_loss(
        t(PW), t(PL), t(MASK_W), t(MASK_L), beta=beta, gamma_beta_ratio=ratio
    )
    mean_w = [(-1.0 - 2.0) / 2, (-0.5 - 0.25 + 0.0) / 3]  # the real 0.0 token counts: divide by 3, not 2
    mean_l = [(-1.5 - 0.5 - 3.0) / 3, -4.0 / 1]
    check(losses, [neg_logsig(beta * (w - lo) - beta * ratio) for w, lo in zip(mean_w, mean_l, strict=True)])
    check(chosen_r, [beta * m for m in mean_w])
    check(rejected_r, [beta * m for m in mean_l])


def test_sepo_one_token_selections() -> None:
    gamma, margin = 2.0, 0.5
    sel_w = t([[F, F, T, F], [F, T, F, T]])  # one token in row 0; row 1 includes the real logp-0 token
    sel_l = t([[F, T, F, T], [F, F, T, F]])
    losses, u_w, u_l = sepo_loss(t(PW), t(PL), sel_w, sel_l, gamma=gamma, margin=margin)
    exp_u_w = [gamma * -2.0, gamma * (-0.5 + 0.0) / 2]
    exp_u_l = [gamma * (-1.5 - 3.0) / 2, gamma * -4.0]
    check(u_w, exp_u_w)
    check(u_l, exp_u_l)
    check(losses, [neg_logsig(w - lo - margin) for w, lo in zip(exp_u_w, exp_u_l, strict=True)])


def test_sepo_with_the_official_code_values() -> None:
    losses, _, _ = sepo_loss(t(PW), t(PL), t(MASK_W), t(MASK_L), gamma=1.0, margin=0.0)
    check(losses, [neg_logsig(-1.5 - (-5.0 / 3)), neg_logsig(-0.25 - (-4.0))])


def test_tdpo_hand_values() -> None:
    beta, alpha = 0.1, 0.5
    h = [w - lo for w, lo in zip(RATIO_W, RATIO_L, strict=True)]
    one, r_w, _ = tdpo_loss(*dpo_args(), t(KW), t(KLL), variant="tdpo1", beta=beta, alpha=alpha)
    check(one, [neg_logsig(beta * (h[i] - (D_L[i] - D_W[i]))) for i in range(2)])
    check(r_w, [beta * r for r in RATIO_W])
    two, _, _ = tdpo_loss(*dpo_args(), t(KW), t(KLL), variant="tdpo2", beta=beta, alpha=alpha)
    check(two, [neg_logsig(beta * (h[i] - alpha * (D_L[i] - D_W[i]))) for i in range(2)])


def test_tdpo_reduces_to_dpo() -> None:
    dpo, _, _ = dpo_loss(*dpo_args(), beta=0.2, label_smoothing=0.0)
    zeros = torch.zeros(2, 4)
    tdpo1, _, _ = tdpo_loss(*dpo_args(), zeros, zeros, variant="tdpo1", beta=0.2, alpha=0.5)
    tdpo2, _, _ = tdpo_loss(*dpo_args(), t(KW), t(KLL), variant="tdpo2", beta=0.2, alpha=0.0)
    torch.testing.assert_close(tdpo1, dpo)
    torch.testing.assert_close(tdpo2, dpo)


def test_tdpo_variant_must_be_explicit_and_valid() -> None:
    with pytest.raises(ValueError, match=r"tdpo1.*tdpo2"):
        tdpo_loss(*dpo_args(), t(KW), t(KLL), variant="tdpo3", beta=0.1, alpha=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tdpo_loss(*dpo_args(), t(KW), t(KLL), beta=0.1, alpha=0.5)  # type: ignore[call-arg]


def test_tdpo_kl_gradients() -> None:
    for variant, chosen_kl_has_grad in (("tdpo1", True), ("tdpo2", False)):
        kw, kl = t(KW, grad=True), t(KLL, grad=True)
        losses, _, _ = tdpo_loss(*dpo_args(), kw, kl, variant=variant, beta=0.1, alpha=0.5)  # type: ignore[arg-type]
        losses.sum().backward()
        assert kl.grad is not None and (kl.grad[t(MASK_L)] > 0).all()  # more rejected KL -> higher loss
        assert torch.isfinite(kl.grad).all() and (kl.grad[~t(MASK_L)] == 0).all()
        if chosen_kl_has_grad:
            assert kw.grad is not None and (kw.grad[t(MASK_W)] < 0).all()
        else:  # TDPO2 stops the gradient through D(y_w)
            assert kw.grad is None or (kw.grad == 0).all()


def test_tso_dual_clip_equals_dpo_inside_bounds() -> None:
    dpo, dpo_w, dpo_l = dpo_loss(*dpo_args(), beta=0.1, label_smoothing=0.0)
    bounds = {"chosen_reward_max": 5.0, "rejected_reward_min": -5.0}  # |r| <= 0.1 * 1.0 here
    tso, tso_w, tso_l = tso_dual_clip_loss(*dpo_args(), beta=0.1, **bounds)
    torch.testing.assert_close(tso, dpo)
    torch.testing.assert_close(tso_w, dpo_w)
    torch.testing.assert_close(tso_l, dpo_l)


def test_tso_dual_clip_beyond_both_bounds_stops_pulling() -> None:
    # Row 0: r_w = 1.0 * (0 - (-2)) = 2 > cap 1 and r_l = 1.0 * (-3 - 0) = -3 < floor -1: fully clipped.
    # Row 1: r_w = 0.5 (inside) and r_l = -3 (clipped): only the chosen side still pulls.
    pw = torch.tensor([[0.0, 0.0], [0.0, 0.5]], requires_grad=True)
    pl = torch.tensor([[0.0, -3.0], [0.0, -3.0]], requires_grad=True)
    rw = torch.tensor([[0.0, -2.0], [0.0, 0.0]])
    rl = torch.zeros(2, 2)
    mask = torch.tensor([[F, T], [F, T]])
    losses, r_w, r_l = tso_dual_clip_loss(
        pw, pl, rw, rl, mask, mask, beta=1.0, chosen_reward_max=1.0, rejected_reward_min=-1.0
    )
    check(losses, [neg_logsig(1.0 - (-1.0)), neg_logsig(0.5 - (-1.0))])
    check(r_w, [2.0, 0.5])  # rewards are reported unclipped
    check(r_l, [-3.0, -3.0])
    losses.sum().backward()
    assert pw.grad is not None and pl.grad is not None
    assert pw.grad[0, 1] == 0 and pl.grad[0, 1] == 0
    assert pw.grad[1, 1] < 0 and pl.grad[1, 1] == 0


# ---------------------------------------------------------------------------------------- gradient signs

LossFn = Callable[[Tensor, Tensor], Tensor]


def with_ref(pw: Tensor, pl: Tensor) -> tuple[Tensor, ...]:
    return pw, pl, t(RW), t(RL), t(MASK_W), t(MASK_L)


ZEROS = torch.zeros(2, 4)
GRAD_CASES: dict[str, LossFn] = {
    "dpo": lambda pw, pl: dpo_loss(*with_ref(pw, pl), beta=0.1, label_smoothing=0.0)[0],
    "cdpo": lambda pw, pl: dpo_loss(*with_ref(pw, pl), beta=0.1, label_smoothing=0.1)[0],
    "ipo": lambda pw, pl: ipo_loss(*with_ref(pw, pl), beta=0.1)[0],
    "simpo": lambda pw, pl: simpo_loss(pw, pl, t(MASK_W), t(MASK_L), beta=2.0, gamma_beta_ratio=0.5)[0],
    "sepo": lambda pw, pl: sepo_loss(pw, pl, t(MASK_W), t(MASK_L), gamma=1.0, margin=0.0)[0],
    "tdpo1": lambda pw, pl: tdpo_loss(*with_ref(pw, pl), ZEROS, ZEROS, variant="tdpo1", beta=0.1, alpha=0.5)[0],
    "tdpo2": lambda pw, pl: tdpo_loss(*with_ref(pw, pl), t(KW), t(KLL), variant="tdpo2", beta=0.1, alpha=0.5)[0],
    "tso": lambda pw, pl: tso_dual_clip_loss(*with_ref(pw, pl), beta=0.1, chosen_reward_max=5.0,
                                             rejected_reward_min=-5.0)[0],
    "selective_ref_dpo": lambda pw, pl: selective_ref_dpo_loss(*with_ref(pw, pl), beta=0.1)[0],
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradient_direction_and_padding(name: str) -> None:
    pw, pl = t(PW, grad=True), t(PL, grad=True)
    GRAD_CASES[name](pw, pl).sum().backward()
    assert pw.grad is not None and pl.grad is not None
    assert (pw.grad[t(MASK_W)] < 0).all(), "raising a chosen log-prob must lower the loss"
    assert (pl.grad[t(MASK_L)] > 0).all(), "raising a rejected log-prob must raise the loss"
    # Padding junk (9.0, NaN) gets exactly zero gradient and never produces NaN.
    assert (pw.grad[~t(MASK_W)] == 0).all() and (pl.grad[~t(MASK_L)] == 0).all()


def test_losses_are_float32_for_bf16_inputs() -> None:
    pw, pl = t(PW).bfloat16(), t(PL).bfloat16()
    losses, chosen_r, _ = simpo_loss(pw, pl, t(MASK_W), t(MASK_L), beta=2.0, gamma_beta_ratio=0.5)
    assert losses.dtype == torch.float32 and chosen_r.dtype == torch.float32


# ------------------------------------------------------------------------------------------ Selective-DPO


def test_selective_dpo_masks_pick_the_right_tokens() -> None:
    nan = NAN
    # chosen score = ref - policy. Row 0: masked scores [1, 5, 3, 9, 2] (position 6: padding, score 100).
    # sorted [1, 2, 3, 5, 9]; q=0.6 sits at 0.6 * (5 - 1) = 2.4 -> 3 + 0.4 * (5 - 3) = 3.8 -> keep 5 and 9.
    # Row 1: ties [1, 4, 4, 0]: sorted [0, 1, 4, 4], 0.6 * 3 = 1.8 -> 1 + 0.8 * (4 - 1) = 3.4 -> keep both 4s.
    policy_w = torch.zeros(2, 7)
    ref_w = torch.tensor([[0.0, 1.0, 5.0, 3.0, 9.0, 2.0, 100.0], [0.0, 1.0, 4.0, 4.0, 0.0, nan, nan]])
    mask_w = torch.tensor([[F, T, T, T, T, T, F], [F, T, T, T, T, F, F]])
    # rejected score = policy - ref. Row 0: ties [2, 2, 2] -> threshold 2, all kept. Row 1: one token, kept.
    policy_l = torch.tensor([[0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0], [0.0, -7.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    ref_l = torch.zeros(2, 7)
    mask_l = torch.tensor([[F, T, T, T, F, F, F], [F, T, F, F, F, F, F]])
    sel_w, sel_l = selective_dpo_masks(policy_w, policy_l, ref_w, ref_l, mask_w, mask_l, quantile=0.6)
    assert sel_w.dtype == torch.bool and not sel_w.requires_grad
    assert sel_w.tolist() == [[F, F, T, F, T, F, F], [F, F, T, T, F, F, F]]
    assert sel_l.tolist() == mask_l.tolist()


def test_selective_dpo_masks_edge_cases() -> None:
    policy = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, 0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf, -1.0]])
    ref = torch.zeros(3, 4)
    mask = torch.tensor([[F, T, T, T], [F, F, F, F], [F, T, T, T]])
    # q=0 keeps everything; q=1 keeps only the maximum; an empty row selects nothing; infinite scores
    # (policy logp -inf -> chosen score +inf) still leave at least one token.
    all_kept, _ = selective_dpo_masks(policy, policy, ref, ref, mask, mask, quantile=0.0)
    assert all_kept.tolist() == mask.tolist()
    top, _ = selective_dpo_masks(policy, policy, ref, ref, mask, mask, quantile=1.0)
    assert top[0].tolist() == [F, F, F, T] and not top[1].any() and top[2].sum() >= 1
    with pytest.raises(ValueError, match="quantile"):
        selective_dpo_masks(policy, policy, ref, ref, mask, mask, quantile=1.5)


def test_selective_dpo_masks_hand_case_ties_single_and_empty_rows() -> None:
    # Ported from the deleted selection.quantile_select tests: one rule, now only in selective_dpo_masks.
    # chosen score = ref - policy (policy 0 here), rejected score = policy - ref (ref 0 here).
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 1.0, 9.0, 9.0, 9.0], [7.0, 9.0, 9.0, 9.0, 9.0],
                           [9.0, 9.0, 9.0, 9.0, 9.0], [2.0, 2.0, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[T, T, T, T, T], [T, T, F, F, F], [T, F, F, F, F], [F, F, F, F, F], [T, T, T, F, F]])
    zeros = torch.zeros(5, 5)
    sel_w, sel_r = selective_dpo_masks(zeros, scores, scores, zeros, mask, mask, quantile=0.6)
    # Row 0: position 0.6 * 4 = 2.4 -> 3 + 0.4 = 3.4: keeps 4, 5. Row 1: sorted 1, 3 -> 1 + 0.6 * 2 = 2.2:
    # keeps 3. Row 2: the single token. Row 3: empty. Row 4: ties, all kept. Both sides score the same here.
    expected = [[F, F, F, T, T], [T, F, F, F, F], [T, F, F, F, F], [F, F, F, F, F], [T, T, T, F, F]]
    assert sel_w.tolist() == expected and sel_r.tolist() == expected


def test_selective_dpo_loss_is_dpo_on_selected_sums_without_mask_gradient() -> None:
    beta = 0.5
    pw = torch.tensor([[0.0, -1.0, -4.0, -2.0]], requires_grad=True)
    rw = torch.tensor([[0.0, -1.0, -1.0, -1.0]])  # chosen scores ref - policy: [0, 3, 1]
    pl = torch.tensor([[0.0, -0.5, -3.0, -1.0]], requires_grad=True)
    rl = torch.tensor([[0.0, -2.0, -1.0, -1.0]])  # rejected scores policy - ref: [1.5, -2, 0]
    mask = torch.tensor([[F, T, T, T]])
    # q=0.6 over 3 tokens: position 1.2. Chosen sorted [0, 1, 3] -> 1 + 0.2 * 2 = 1.4 -> keep t=2 only.
    # Rejected sorted [-2, 0, 1.5] -> 0 + 0.2 * 1.5 = 0.3 -> keep t=1 only.
    sel_w, sel_l = selective_dpo_masks(pw, pl, rw, rl, mask, mask, quantile=0.6)
    assert sel_w.tolist() == [[F, F, T, F]] and sel_l.tolist() == [[F, T, F, F]]
    losses, r_w, r_l = selective_dpo_loss(pw, pl, rw, rl, sel_w, sel_l, beta=beta)
    ratio_w, ratio_l = -4.0 - (-1.0), -0.5 - (-2.0)
    check(losses, [neg_logsig(beta * (ratio_w - ratio_l))])
    check(r_w, [beta * ratio_w])
    check(r_l, [beta * ratio_l])
    losses.sum().backward()
    assert pw.grad is not None and pl.grad is not None
    assert pw.grad[0, 2] < 0 and pw.grad[0, 1] == 0 and pw.grad[0, 3] == 0
    assert pl.grad[0, 1] > 0 and pl.grad[0, 2] == 0 and pl.grad[0, 3] == 0


def test_selective_dpo_scorer_can_differ_from_anchor() -> None:
    pw = torch.tensor([[0.0, -1.0, -4.0, -2.0]])
    rw = torch.tensor([[0.0, -1.0, -1.0, -1.0]])
    pl = torch.tensor([[0.0, -0.5, -3.0, -1.0]])
    rl = torch.tensor([[0.0, -2.0, -1.0, -2.0]])
    mask = torch.tensor([[F, T, T, T]])
    # Scorer makes chosen t=1 (score 5) and rejected t=3 (score 4) the picks; the anchor stays rw/rl.
    sw = torch.tensor([[0.0, 4.0, -4.0, -2.0]])
    sl = torch.tensor([[0.0, -0.5, -3.0, -5.0]])
    sel_w, sel_l = selective_dpo_masks(pw, pl, sw, sl, mask, mask, quantile=0.6)
    assert sel_w.tolist() == [[F, T, F, F]] and sel_l.tolist() == [[F, F, F, T]]
    losses, _, _ = selective_dpo_loss(pw, pl, rw, rl, sel_w, sel_l, beta=1.0)
    ratio_w, ratio_l = -1.0 - (-1.0), -1.0 - (-2.0)
    check(losses, [neg_logsig(ratio_w - ratio_l)])


# ----------------------------------------------------------------------------- no hidden hyper-parameters


def test_no_loss_hyper_parameter_has_a_default() -> None:
    # The config is the one source of defaults; a keyword default here would be a second, drifting copy.
    functions = [getattr(losses_module, name) for name in dir(losses_module)
                 if name.endswith(("_loss", "_masks", "_mask")) and not name.startswith("_")]
    assert len(functions) >= 12
    for function in functions:
        for param in inspect.signature(function).parameters.values():
            assert param.default is inspect.Parameter.empty, f"{function.__name__}({param.name}=...) has a default"


# ------------------------------------------------------------------------------- reference-anchored selective


def test_selective_ref_dpo_sums_log_ratios_over_oracle_selected_tokens() -> None:
    beta = 0.2
    sel_w = t([[F, F, T, F], [F, T, F, T]])  # row 1 keeps the real logp-0 token
    sel_l = t([[F, T, F, T], [F, F, T, F]])
    losses, r_w, r_l = selective_ref_dpo_loss(t(PW), t(PL), t(RW), t(RL), sel_w, sel_l, beta=beta)
    ratio_w = [-2.0 - (-1.0), (-0.5 - (-0.25)) + (0.0 - (-0.5))]  # [-1.0, 0.25]
    ratio_l = [(-1.5 - (-1.0)) + (-3.0 - (-2.0)), -4.0 - (-3.0)]  # [-1.5, -1.0]
    check(losses, [neg_logsig(beta * (w - lo)) for w, lo in zip(ratio_w, ratio_l, strict=True)])
    check(r_w, [beta * r for r in ratio_w])
    check(r_l, [beta * r for r in ratio_l])
    # With the full masks it is DPO.
    full, _, _ = selective_ref_dpo_loss(*dpo_args(), beta=beta)
    check(full, [neg_logsig(beta * (w - lo)) for w, lo in zip(RATIO_W, RATIO_L, strict=True)])
