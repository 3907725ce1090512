"""How the objectives of one step are weighted: static weights, MGDA, DTO-KD, teacher dropping.

Every way is a ``Balancer``: ``weigh(losses, static, step) -> (weights, logged)`` from the step's
objective losses (name -> scalar tensor, in the order the objectives were computed) and their
static weights; an objective left out of ``weights`` weighs 0 (its parameters stay in the graph
with zero gradients: DDP needs every parameter used). ``varies``: the weights change per step
(the trainer logs them as ``weight/<objective>``); ``columns``: what ``logged`` adds to
metrics.csv. ``create_balancer`` builds the run's from ``--balance`` and ``--teacher-drop``
(teacher dropping wraps any of the others).

**MGDA** (``--balance mgda``; Sener & Koltun's MGDA-UB, as DTO-KD uses it for distillation):
each objective's gradient is taken with respect to the student's shared representation (its
summary and patch tokens: one backward through the heads each, none through the encoder), and
the weights are the min-norm point of their convex hull, found by Frank-Wolfe on the Gram
matrix. At that point the combined direction has a non-negative inner product with every
objective's gradient, so no teacher's gradient is opposed. The encoder then takes one backward
of ``n * sum_t alpha_t L_t`` (uniform alphas give back the static sum).

**DTO-KD** (``--balance dto``; "Dynamic Trade-off Optimization for Effective Knowledge
Distillation", ICLR 2026): the trade-off between the task loss and the distillation loss (every
teacher objective, with its static weight) from their two gradients with respect to the same
representation, in closed form. The paper names two failures of a fixed sum: *conflict* (the
gradients point against each other) and *dominance* (one gradient's magnitude drowns the
other). kdcache resolves both in the way that has a closed form for two objectives: the min-norm
point of the hull of the two *unit* gradients, which is their bisector, i.e. weights
``alpha_task = |g_d| / (|g_t| + |g_d|)`` and ``alpha_distill = |g_t| / (|g_t| + |g_d|)``. Then both
objectives move the representation with equal force (no dominance) and the combined direction
``(u_t + u_d) |g_t||g_d| / (|g_t| + |g_d|)`` has a non-negative inner product with each (no
conflict: ``u . (u + v) = 1 + cos >= 0``). The paper's own formula could not be consulted here;
this is the reading its two stated properties determine. Weights are ``2 alpha`` (equal norms
give back the plain sum); the cosine of the two gradients is logged beside them.

**Teacher dropping** (``--teacher-drop P``, UNIC): each step the teacher with the largest loss
is kept and every other one is dropped with probability P, from a generator seeded by (seed,
step): the same on every rank and after a resume.
"""
from __future__ import annotations

from typing import Callable

import torch

EXACT_UP_TO = 10  # objectives: beyond this, Frank-Wolfe instead of the exact active-set search


def min_norm_weights(gram: torch.Tensor, *, iterations: int = 2000, tol: float = 1e-12) -> torch.Tensor:
    """argmin_{a in simplex} a^T G a for a Gram matrix G (n x n): the min-norm point of the convex
    hull of the gradients. Closed form for n = 2; for n <= ``EXACT_UP_TO`` an exact search over
    supports (each support's equality-constrained optimum, feasible ones compared; ties go to the
    larger support, so identical gradients get equal weights); Frank-Wolfe beyond."""
    g = gram.double()
    n = g.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    if n == 2:
        return _two(g[0, 0], g[0, 1], g[1, 1])
    if n <= EXACT_UP_TO:
        return _exact(g)
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for _ in range(iterations):
        ga = g @ a
        t = int(torch.argmin(ga))  # the vertex the gradient of a^T G a points away from least
        va, vt, tt = a @ ga, ga[t], g[t, t]
        if float(va - vt) <= tol * max(1.0, float(va)):  # Frank-Wolfe gap closed: a is optimal (ties keep a)
            break
        # line search between a and e_t: min over gamma of |(1 - gamma) v + gamma g_t|^2
        gamma = _two(va, vt, tt)[1]
        a = (1 - gamma) * a
        a[t] += gamma
    return a


def _exact(g: torch.Tensor) -> torch.Tensor:
    n = g.shape[0]
    best, best_value = torch.full((n,), 1.0 / n, dtype=torch.float64), None
    scale = max(1.0, float(g.diagonal().max()))
    for mask in sorted(range(1, 2 ** n), key=lambda m: -bin(m).count("1")):  # larger supports first
        support = [i for i in range(n) if mask >> i & 1]
        x = torch.linalg.pinv(g[support][:, support]) @ torch.ones(len(support), dtype=torch.float64)
        if float(x.sum()) <= 1e-12 * scale:
            continue
        x = x / x.sum()
        if float(x.min()) < -1e-9:
            continue
        a = torch.zeros(n, dtype=torch.float64)
        a[support] = x.clamp(min=0) / x.clamp(min=0).sum()
        value = float(a @ g @ a)
        if best_value is None or value < best_value - 1e-12 * scale:
            best, best_value = a, value
    return best


def _two(v11: torch.Tensor, v12: torch.Tensor, v22: torch.Tensor) -> torch.Tensor:
    """Closed form for two vectors: (gamma, 1 - gamma) minimising |gamma x1 + (1 - gamma) x2|^2."""
    denom = v11 - 2 * v12 + v22
    if float(denom) <= 1e-30:  # identical (or both zero) gradients: any point; take the middle
        gamma = torch.tensor(0.5, dtype=torch.float64)
    else:
        gamma = torch.clamp((v22 - v12) / denom, 0.0, 1.0)
    return torch.stack([gamma, 1 - gamma]).double()


def representation_gram(losses: list[torch.Tensor], representation: tuple[torch.Tensor, ...], *, world: int = 1) -> torch.Tensor:
    """Gram matrix of the objectives' gradients w.r.t. the representation (summed over ranks)."""
    grads = []
    for loss in losses:
        gs = torch.autograd.grad(loss, representation, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(g if g is not None else torch.zeros_like(r)).float().flatten()
                                for g, r in zip(gs, representation)]))
    g = torch.stack(grads)
    gram = (g @ g.T).double()
    if world > 1:
        torch.distributed.all_reduce(gram)
    return gram


def dto_weights(gram: torch.Tensor) -> tuple[float, float, float]:
    """(alpha_task, alpha_distill, cosine) from the 2x2 Gram matrix of the task (0) and distillation
    (1) gradients. An objective with a zero gradient (a batch without labels) says nothing: the
    other takes all the weight."""
    g = gram.double()
    nt, nd = float(g[0, 0].clamp(min=0).sqrt()), float(g[1, 1].clamp(min=0).sqrt())
    if nt == 0 and nd == 0:
        return 0.5, 0.5, 0.0
    if nt == 0 or nd == 0:
        return (0.0, 1.0, 0.0) if nt == 0 else (1.0, 0.0, 0.0)
    return nd / (nt + nd), nt / (nt + nd), float(g[0, 1]) / (nt * nd)


def teachers_kept(losses: dict[str, float], drop: float, *, seed: int, step: int) -> dict[str, bool]:
    """UNIC's teacher dropping: the max-loss teacher always stays; each other leaves with P=drop."""
    if drop <= 0 or len(losses) < 2:
        return {t: True for t in losses}
    top = max(losses, key=lambda t: (losses[t], t))
    gen = torch.Generator().manual_seed(hash_seed(seed, step))
    draws = torch.rand(len(losses), generator=gen).tolist()
    return {t: t == top or u >= drop for t, u in zip(sorted(losses), draws)}


def hash_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


# -- balancers: one small interface ------------------------------------------------------------

class Balancer:
    """Static weights: each objective at its ``--teacher-weight`` / ``--*-weight``."""
    varies = False
    columns: tuple[str, ...] = ()

    def weigh(self, losses: dict[str, torch.Tensor], static: dict[str, float], step: int):
        return {o: static[o] for o in losses}, {}


class MinNormBalancer(Balancer):
    """MGDA: the min-norm point of the objectives' gradients w.r.t. the representation, times n
    (uniform weights give back the plain sum); one objective keeps its static weight."""
    varies = True

    def __init__(self, representation: Callable[[], tuple], *, world: int = 1):
        self.representation, self.world = representation, world

    def weigh(self, losses, static, step):
        if len(losses) < 2:
            return super().weigh(losses, static, step)
        names = list(losses)
        alpha = min_norm_weights(representation_gram([losses[o] for o in names], self.representation(),
                                                     world=self.world)).tolist()
        return {o: len(names) * a for o, a in zip(names, alpha)}, {}


class TaskTradeoffBalancer(Balancer):
    """DTO-KD: the task loss against the distillation loss (the other objectives at their static
    weights), weighed in closed form from their gradients w.r.t. the representation."""
    varies = True
    columns = ("dto/cos",)

    def __init__(self, representation: Callable[[], tuple], *, world: int = 1):
        self.representation, self.world = representation, world

    def weigh(self, losses, static, step):
        distill = [o for o in losses if o != "task"]
        kd = sum(static[o] * losses[o] for o in distill)
        gram = representation_gram([losses["task"], kd], self.representation(), world=self.world)
        a_task, a_kd, cos = dto_weights(gram)
        return {"task": 2 * a_task, **{o: 2 * a_kd * static[o] for o in distill}}, {"dto/cos": cos}


class TeacherDropBalancer(Balancer):
    """UNIC's teacher dropping around another balancer: the max-loss teacher stays, each other one
    leaves with probability ``drop`` (seeded by seed and step: the same on every rank); the inner
    balancer weighs what is left."""
    varies = True

    def __init__(self, inner: Balancer, teachers: list[str], drop: float, *, seed: int, world: int = 1):
        self.inner, self.teachers, self.drop, self.seed, self.world = inner, list(teachers), drop, seed, world
        self.columns = inner.columns

    def weigh(self, losses, static, step):
        mean = torch.stack([losses[t].detach() for t in self.teachers])
        if self.world > 1:
            mean = mean.clone()
            torch.distributed.all_reduce(mean)
            mean /= self.world
        kept = teachers_kept(dict(zip(self.teachers, mean.tolist())), self.drop, seed=self.seed, step=step)
        return self.inner.weigh({o: v for o, v in losses.items() if kept.get(o, True)}, static, step)


def create_balancer(method: str, *, teacher_drop: float, teachers: list[str], representation: Callable[[], tuple],
                    seed: int, world: int) -> Balancer:
    """``--balance`` static | mgda | dto, wrapped by teacher dropping when ``--teacher-drop`` > 0."""
    inner = {"static": Balancer, "mgda": MinNormBalancer, "dto": TaskTradeoffBalancer}[method]
    balancer = inner() if inner is Balancer else inner(representation, world=world)
    if teacher_drop > 0:
        balancer = TeacherDropBalancer(balancer, teachers, teacher_drop, seed=seed, world=world)
    return balancer
