"""TGDPO, TIS-DPO and ConfPO: hand-computed values, gradients, and cross-checks against the official formulas.

The `official_*` functions below are small reference computations written for these tests from reading the
official repositories (not copied): dvlab-research/TGDPO `src/llamafactory/train/tgdpo/trainer.py` (dpo_loss,
loss_type "sigmoid"), exlaw/TIS-DPO `trainers.py` (`_get_batch_logps_tisdpo` + `tisdpo_loss`, token_level off)
and hee-suk-yoon/ConfPO `trl/trainer/cpo_trainer.py` (`cpo_loss_confpo`, loss_type "simpo"). Like the official
code they take per-token tensors already multiplied by the 0/1 loss mask, so padding is 0 there, whereas selpo's
losses are given junk (NaN, large values) off the masks and must ignore it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from selpo_core.losses import confpo_loss, confpo_mask, dpo_loss, tgdpo_loss, tis_dpo_loss

NAN = math.nan
T, F = True, False
MASK_W = [[F, T, T, F], [F, T, T, T]]
MASK_L = [[F, T, T, T], [F, F, T, F]]
PW = [[0.0, -1.0, -2.0, 9.0], [0.0, -0.5, -0.25, 0.0]]
PL = [[0.0, -1.5, -0.5, -3.0], [0.0, NAN, -4.0, NAN]]
RW = [[0.0, -1.5, -1.0, -7.0], [0.0, -0.25, -0.75, -0.5]]
RL = [[0.0, -1.0, -1.0, -2.0], [0.0, 5.0, -3.0, 5.0]]
# Per-token log-ratios on the masks: chosen [0.5, -1] and [-0.25, 0.5, 0.5]; rejected [-0.5, 0.5, -1] and [-1].
TOKEN_R_W = [[NAN, 2.0, -4.0, NAN], [7.0, 1.0, 0.0, -2.0]]  # oracle log-ratios; junk off the mask
TOKEN_R_L = [[NAN, -6.0, 3.0, 1.0], [NAN, NAN, 4.0, NAN]]
WEIGHT_W = [[NAN, 1.3, 0.7, NAN], [5.0, 0.7, 1.0, 1.3]]
WEIGHT_L = [[9.0, 1.0, 0.7, 1.3], [NAN, NAN, 0.5, NAN]]


def t(x: list[list[float]] | list[list[bool]], *, grad: bool = False) -> Tensor:
    if isinstance(x[0][0], bool):
        return torch.tensor(x, dtype=torch.bool)
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def neg_logsig(x: float) -> float:
    return math.log(1.0 + math.exp(-x))


def check(actual: Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32 and actual.shape == (len(expected),)
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------- TGDPO


def test_tgdpo_hand_values() -> None:
    beta, alpha = 0.1, 0.5  # the paper's defaults: alpha * beta = 0.05
    losses, r_w, r_l = tgdpo_loss(t(PW), t(PL), t(RW), t(RL), t(TOKEN_R_W), t(TOKEN_R_L), t(MASK_W), t(MASK_L),
                                  beta=beta, alpha=alpha)
    # chosen weight 0.1 * (1 + 0.05 r), rejected weight 0.1 * (1 - 0.05 r), times the token log-ratios.
    chosen = [0.1 * 1.1 * 0.5 + 0.1 * 0.8 * -1.0, 0.1 * 1.05 * -0.25 + 0.1 * 1.0 * 0.5 + 0.1 * 0.9 * 0.5]
    rejected = [0.1 * 1.3 * -0.5 + 0.1 * 0.85 * 0.5 + 0.1 * 0.95 * -1.0, 0.1 * 0.8 * -1.0]
    check(r_w, chosen)
    check(r_l, rejected)
    check(losses, [neg_logsig(w - lo) for w, lo in zip(chosen, rejected, strict=True)])


def test_tgdpo_with_alpha_zero_is_dpo() -> None:
    args = (t(PW), t(PL), t(RW), t(RL))
    tgdpo, r_w, _ = tgdpo_loss(*args, t(TOKEN_R_W), t(TOKEN_R_L), t(MASK_W), t(MASK_L), beta=0.3, alpha=0.0)
    dpo, dpo_w, _ = dpo_loss(*args, t(MASK_W), t(MASK_L), beta=0.3, label_smoothing=0.0)
    torch.testing.assert_close(tgdpo, dpo)
    torch.testing.assert_close(r_w, dpo_w)


def test_tgdpo_negative_weights_are_used_unclipped() -> None:
    # alpha * beta * r = -3 on the chosen token: weight 1 * (1 - 3) = -2, so raising that token's log-prob
    # RAISES the loss, exactly as in the official trainer (which does not clip).
    pw = torch.tensor([[0.0, -1.0]], requires_grad=True)
    pl = torch.tensor([[0.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -2.0]])
    mask = torch.tensor([[F, T]])
    losses, r_w, r_l = tgdpo_loss(pw, pl, ref, ref, torch.tensor([[0.0, -3.0]]), torch.tensor([[0.0, 0.0]]),
                                  mask, mask, beta=1.0, alpha=1.0)
    check(r_w, [-2.0 * 1.0])
    check(r_l, [1.0 * 1.0])
    check(losses, [neg_logsig(-2.0 - 1.0)])
    losses.sum().backward()
    assert pw.grad is not None and pw.grad[0, 1] > 0 and pw.grad[0, 0] == 0


def official_tgdpo(pw: Tensor, pl: Tensor, rw: Tensor, rl: Tensor, oracle_w: Tensor, oracle_l: Tensor,
                   mask_w: Tensor, mask_l: Tensor, beta: float, alpha: float) -> Tensor:
    """The official loss from masked per-token log-probs of the policy, reference and reward (oracle) model."""
    pw, rw, ow = pw * mask_w, rw * mask_w, oracle_w * mask_w
    pl, rl, ol = pl * mask_l, rl * mask_l, oracle_l * mask_l
    chosen = (beta * (1 + alpha * beta * (ow - rw)) * (pw - rw)).sum(-1)
    rejected = (beta * (1 - alpha * beta * (ol - rl)) * (pl - rl)).sum(-1)
    return -torch.nn.functional.logsigmoid(chosen - rejected)


def random_batch(seed: int, batch: int = 5, length: int = 9) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {name: -3.0 * torch.rand(batch, length, generator=g) for name in ("pw", "pl", "rw", "rl", "ow", "ol")}
    for side in ("w", "l"):
        lengths = torch.randint(1, length, (batch,), generator=g)
        start = torch.randint(0, 2, (batch,), generator=g)
        pos = torch.arange(length)
        out[f"mask_{side}"] = (pos >= start[:, None]) & (pos < (start + lengths)[:, None])
    return out


def with_junk(x: Tensor, mask: Tensor) -> Tensor:
    """Off-mask entries replaced by junk selpo must ignore (the official code sees zeros there)."""
    return torch.where(mask, x, torch.tensor(NAN)).requires_grad_(True)


@pytest.mark.parametrize(("seed", "beta", "alpha"), [(0, 0.1, 0.5), (1, 1.0, 2.0), (2, 0.5, 1.0)])
def test_tgdpo_matches_official_formula_values_and_gradients(seed: int, beta: float, alpha: float) -> None:
    b = random_batch(seed)
    mw, ml = b["mask_w"], b["mask_l"]
    pw_ref, pl_ref = b["pw"].clone().requires_grad_(True), b["pl"].clone().requires_grad_(True)
    expected = official_tgdpo(pw_ref, pl_ref, b["rw"], b["rl"], b["ow"], b["ol"], mw, ml, beta, alpha)
    expected.sum().backward()
    pw, pl = with_junk(b["pw"], mw), with_junk(b["pl"], ml)
    losses, _, _ = tgdpo_loss(pw, pl, b["rw"], b["rl"], b["ow"] - b["rw"], b["ol"] - b["rl"], mw, ml,
                              beta=beta, alpha=alpha)
    losses.sum().backward()
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-6, atol=1e-6)
    assert pw.grad is not None and pl.grad is not None
    torch.testing.assert_close(pw.grad, pw_ref.grad, rtol=1e-6, atol=1e-6)  # zero off the mask, not NaN
    torch.testing.assert_close(pl.grad, pl_ref.grad, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- TIS-DPO


def test_tis_dpo_hand_values_and_all_ones_is_dpo() -> None:
    beta = 0.5
    losses, r_w, r_l = tis_dpo_loss(t(PW), t(PL), t(RW), t(RL), t(WEIGHT_W), t(WEIGHT_L), t(MASK_W), t(MASK_L),
                                    beta=beta)
    chosen = [1.3 * 0.5 + 0.7 * -1.0, 0.7 * -0.25 + 1.0 * 0.5 + 1.3 * 0.5]
    rejected = [1.0 * -0.5 + 0.7 * 0.5 + 1.3 * -1.0, 0.5 * -1.0]
    check(r_w, [beta * c for c in chosen])
    check(r_l, [beta * r for r in rejected])
    check(losses, [neg_logsig(beta * (w - lo)) for w, lo in zip(chosen, rejected, strict=True)])
    ones = torch.ones(2, 4)
    tis, _, _ = tis_dpo_loss(t(PW), t(PL), t(RW), t(RL), ones, ones, t(MASK_W), t(MASK_L), beta=beta)
    dpo, _, _ = dpo_loss(t(PW), t(PL), t(RW), t(RL), t(MASK_W), t(MASK_L), beta=beta, label_smoothing=0.0)
    torch.testing.assert_close(tis, dpo)


def test_weighted_losses_gradients_follow_weights_and_ignore_padding() -> None:
    for name in ("tgdpo", "tis_dpo"):
        pw, pl = t(PW, grad=True), t(PL, grad=True)
        if name == "tgdpo":  # |alpha * beta * r| < 1 here: every weight positive
            losses, _, _ = tgdpo_loss(pw, pl, t(RW), t(RL), t(TOKEN_R_W), t(TOKEN_R_L), t(MASK_W), t(MASK_L),
                                      beta=0.1, alpha=0.5)
        else:
            losses, _, _ = tis_dpo_loss(pw, pl, t(RW), t(RL), t(WEIGHT_W), t(WEIGHT_L), t(MASK_W), t(MASK_L),
                                        beta=0.1)
        losses.sum().backward()
        assert pw.grad is not None and pl.grad is not None
        assert (pw.grad[t(MASK_W)] < 0).all() and (pl.grad[t(MASK_L)] > 0).all(), name
        assert (pw.grad[~t(MASK_W)] == 0).all() and (pl.grad[~t(MASK_L)] == 0).all(), name


def official_tis_dpo(pw: Tensor, pl: Tensor, rw: Tensor, rl: Tensor, weight_w: Tensor, weight_l: Tensor,
                     mask_w: Tensor, mask_l: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    chosen_margin = ((pw - rw) * weight_w * mask_w).sum(-1)
    rejected_margin = ((pl - rl) * weight_l * mask_l).sum(-1)
    losses = -torch.nn.functional.logsigmoid(beta * (chosen_margin - rejected_margin))
    return losses, beta * chosen_margin.detach(), beta * rejected_margin.detach()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tis_dpo_matches_official_formula_values_and_gradients(seed: int) -> None:
    b = random_batch(seed)
    mw, ml = b["mask_w"], b["mask_l"]
    g = torch.Generator().manual_seed(100 + seed)
    weight_w, weight_l = 0.7 + 0.6 * torch.rand(5, 9, generator=g), 0.7 + 0.6 * torch.rand(5, 9, generator=g)
    pw_ref, pl_ref = b["pw"].clone().requires_grad_(True), b["pl"].clone().requires_grad_(True)
    expected = official_tis_dpo(pw_ref, pl_ref, b["rw"], b["rl"], weight_w, weight_l, mw, ml, beta=0.1)
    expected[0].sum().backward()
    pw, pl = with_junk(b["pw"], mw), with_junk(b["pl"], ml)
    out = tis_dpo_loss(pw, pl, b["rw"], b["rl"], torch.where(mw, weight_w, NAN), torch.where(ml, weight_l, NAN),
                       mw, ml, beta=0.1)
    out[0].sum().backward()
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    assert pw.grad is not None and pl.grad is not None
    torch.testing.assert_close(pw.grad, pw_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pl.grad, pl_ref.grad, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ ConfPO


def logs(probabilities: list[list[float]]) -> Tensor:
    return torch.tensor([[math.log(p) if p > 0 else NAN for p in row] for row in probabilities])


def test_confpo_mask_uses_the_mean_probability_not_the_mean_log_prob() -> None:
    # p = 0.9, 0.9, 0.6, 0.01: mean probability 0.6025 keeps 0.6 and 0.01; the geometric mean (mean log-prob)
    # 0.264 would keep only 0.01. Row 1: one token equals its own mean and is not kept (strictly below).
    logps = logs([[0.9, 0.9, 0.6, 0.01], [0.3, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[T, T, T, T], [T, F, F, F]])
    assert confpo_mask(logps, mask).tolist() == [[F, F, T, T], [F, F, F, F]]
    # Equal probabilities keep nothing; a padded row's junk is never read.
    flat = torch.tensor([[-0.5, -0.5, -0.5, 99.0]])
    assert confpo_mask(flat, torch.tensor([[T, T, T, F]])).tolist() == [[F, F, F, F]]
    grad_logps = logps.clone().nan_to_num(0.0).requires_grad_(True)
    assert not confpo_mask(grad_logps, mask).requires_grad


def test_confpo_hand_values_and_dropped_pair() -> None:
    beta, gamma = 1.5, 1.6  # the official run's values (gamma is the absolute margin)
    # Chosen row 0: p 0.6, 0.1, 0.8 (mean 0.5) keeps 0.1. Row 1: p 0.2, 0.3, 0.9, 0.95 (mean 0.5875) keeps
    # 0.2 and 0.3. Rejected row 0: p 0.4, 0.9 (mean 0.65) keeps 0.4. Row 1: one token keeps nothing -> the
    # pair is dropped: loss 0, no gradient, and it still counts in the batch mean (as the official code).
    pw = logs([[0.6, 0.1, 0.8, 0.0], [0.2, 0.3, 0.9, 0.95]]).nan_to_num(7.0).requires_grad_(True)
    pl = logs([[0.4, 0.9, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]]).nan_to_num(-7.0).requires_grad_(True)
    mask_w = torch.tensor([[T, T, T, F], [T, T, T, T]])
    mask_l = torch.tensor([[T, T, F, F], [T, F, F, F]])
    kept_w, kept_l = confpo_mask(pw, mask_w), confpo_mask(pl, mask_l)
    assert kept_w.tolist() == [[F, T, F, F], [T, T, F, F]] and kept_l.tolist() == [[T, F, F, F], [F, F, F, F]]
    losses, r_w, r_l = confpo_loss(pw, pl, kept_w, kept_l, beta=beta, gamma=gamma)
    u_w = [math.log(0.1), (math.log(0.2) + math.log(0.3)) / 2]
    u_l = [math.log(0.4), 0.0]
    check(r_w, [beta * u for u in u_w])
    check(r_l, [beta * u for u in u_l])
    check(losses, [neg_logsig(beta * (u_w[0] - u_l[0]) - gamma), 0.0])
    losses.sum().backward()
    assert pw.grad is not None and pl.grad is not None
    assert pw.grad[0, 1] < 0 and pl.grad[0, 0] > 0  # the kept tokens of the kept pair
    assert int((pw.grad != 0).sum()) == 1 and int((pl.grad != 0).sum()) == 1


def official_confpo(pw: Tensor, pl: Tensor, mask_w: Tensor, mask_l: Tensor, beta: float,
                    gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """cpo_loss_confpo with loss_type simpo and no label smoothing, on masked per-token log-probs."""
    pw, pl = pw * mask_w, pl * mask_l
    out = []
    for logps, mask in ((pw, mask_w), (pl, mask_l)):
        threshold = ((logps.exp() * mask).sum(-1) / mask.sum(-1)).log()
        kept = (logps < threshold.unsqueeze(1)).detach() * mask
        length = kept.sum(-1)
        empty = length == 0
        out.append(((logps * kept).sum(-1) / torch.where(empty, 1, length), empty))
    (chosen, chosen_empty), (rejected, rejected_empty) = out
    losses = -torch.nn.functional.logsigmoid(beta * (chosen - rejected - gamma / beta))
    losses = losses * ~(chosen_empty | rejected_empty)
    return losses, beta * chosen.detach(), beta * rejected.detach()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confpo_matches_official_formula_values_and_gradients(seed: int) -> None:
    b = random_batch(seed, batch=6)
    mw, ml = b["mask_w"], b["mask_l"]
    # Row 5 of the rejected side: all-equal log-probs (exact in float32: log 1 = 0) keep nothing -> dropped.
    b["pl"][5] = 0.0
    pw_ref, pl_ref = b["pw"].clone().requires_grad_(True), b["pl"].clone().requires_grad_(True)
    expected = official_confpo(pw_ref, pl_ref, mw, ml, beta=1.5, gamma=1.6)
    expected[0].sum().backward()
    pw, pl = with_junk(b["pw"], mw), with_junk(b["pl"], ml)
    out = confpo_loss(pw, pl, confpo_mask(pw, mw), confpo_mask(pl, ml), beta=1.5, gamma=1.6)
    out[0].sum().backward()
    assert float(out[0].detach()[5]) == 0.0 and float(expected[0].detach()[5]) == 0.0
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    assert pw.grad is not None and pl.grad is not None
    torch.testing.assert_close(pw.grad, pw_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pl.grad, pl_ref.grad, rtol=1e-6, atol=1e-6)
