"""The study's statistics, as pure functions: a method's reward-vs-KL curve read at a matched KL, the compute to reach
a reward, the paired t-test, Holm's step-down correction and the pre-stated decision rule (experiments/claims.py).

A curve is one seed's run evaluated along training: points (kl, reward), the start (SFT, KL 0) included.
"""

import math
import statistics

# The pre-stated grids. A comparison is read at the largest grid KL that every compared curve reaches on every seed,
# and the compute claim at the largest grid reward that both methods reach on every seed.
KL_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
REWARD_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
ALPHA = 0.05


def at_kl(points: list[tuple[float, float]], kl: float) -> float:
    """The best reward a curve's checkpoints reach within the KL budget `kl`: a point at KL <= kl, or a mixture of
    two points whose KLs bracket kl, read on the line between them (a mixture's reward is the mixture of the rewards
    and, KL being convex, its KL at most the mixture of the KLs). That is the upper concave envelope of the points,
    made non-decreasing: a frontier, which the order of training (PPO's first update overshoots in KL, then comes
    back) does not bend. Never extrapolated beyond the points' KLs."""
    kls = [x for x, _ in points]
    if not min(kls) <= kl <= max(kls):
        raise ValueError(f"KL {kl} is outside the curve's range [{min(kls)}, {max(kls)}]")
    best = max(y for x, y in points if x <= kl)
    for kl_a, reward_a in points:
        for kl_b, reward_b in points:
            if kl_a < kl < kl_b:
                best = max(best, reward_a + (reward_b - reward_a) * (kl - kl_a) / (kl_b - kl_a))
    return best


def linear_at_kl(points: list[tuple[float, float]], kl: float) -> float:
    """The plain reading, for the sensitivity check: linear interpolation between the points ordered by KL."""
    ordered = sorted(points)
    if not ordered[0][0] <= kl <= ordered[-1][0]:
        raise ValueError(f"KL {kl} is outside the curve's range [{ordered[0][0]}, {ordered[-1][0]}]")
    for (kl_a, reward_a), (kl_b, reward_b) in zip(ordered, ordered[1:]):
        if kl_a <= kl <= kl_b and kl_b > kl_a:
            return reward_a + (reward_b - reward_a) * (kl - kl_a) / (kl_b - kl_a)
    return next(reward for x, reward in ordered if x == kl)


def deciding_value(curves: list[list[tuple[float, float]]], grid=KL_GRID) -> float | None:
    """The largest grid value inside every curve's range (each curve starts at 0), or None."""
    reach = min(max(x for x, _ in curve) for curve in curves)
    inside = [value for value in grid if value <= reach]
    return inside[-1] if inside else None


def cost_to_reach(points: list[tuple[float, float]], reward: float) -> float | None:
    """Compute at which a curve first reaches `reward`: points (compute, reward) in training order, interpolated
    linearly between the last point below and the first at or above; None if it never does."""
    for (cost_a, reward_a), (cost_b, reward_b) in zip(points, points[1:]):
        if reward_a < reward <= reward_b:
            return cost_a + (cost_b - cost_a) * (reward - reward_a) / (reward_b - reward_a)
    return points[0][0] if points and points[0][1] >= reward else None


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (Lentz's method; scipy is not a dependency)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1 - regularized_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * fraction


def t_two_sided_p(t: float, degrees_of_freedom: int) -> float:
    """P(|T| >= |t|) for Student's t with the given degrees of freedom."""
    return regularized_beta(degrees_of_freedom / (degrees_of_freedom + t * t), degrees_of_freedom / 2, 0.5)


def paired_test(differences: list[float]) -> dict:
    """Mean of per-seed differences, the half-width of its 95% t-interval and the two-sided p-value of mean 0."""
    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return {"mean": mean, "half_width": math.nan, "p": math.nan, "seeds": n}
    se = statistics.stdev(differences) / math.sqrt(n)
    if se == 0:
        return {"mean": mean, "half_width": 0.0, "p": 0.0 if mean else 1.0, "seeds": n}
    # the 97.5% quantile: bisection on the p-value
    low, high = 0.0, 100.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided_p(middle, n - 1) > 0.05 else (low, middle)
    return {"mean": mean, "half_width": high * se, "p": t_two_sided_p(mean / se, n - 1), "seeds": n}


def holm(p_values: dict) -> dict:
    """Holm's step-down adjusted p-values: the i-th smallest of m is multiplied by m - i (i from 0), made
    non-decreasing and capped at 1. A nan p-value (no test) stays nan and does not count in m."""
    tested = sorted((p, name) for name, p in p_values.items() if not math.isnan(p))
    adjusted, running = {name: math.nan for name in p_values}, 0.0
    for i, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - i) * p))
        adjusted[name] = running
    return adjusted


def verdict(mean: float, adjusted_p: float, predicted_sign: int, alpha: float = ALPHA) -> str:
    """The pre-stated rule: significant after Holm in the predicted direction -> supported; in the other direction ->
    contradicted; otherwise (or no comparison possible) -> not shown."""
    if math.isnan(adjusted_p) or adjusted_p > alpha:
        return "not shown"
    return "supported" if mean * predicted_sign > 0 else "contradicted"
