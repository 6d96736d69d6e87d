"""Weight mirror: feedback kernels that learn from noise (Akrout et al. 2019, DESIGN.md §2).

In mirror mode each `wm` layer is driven by its own zero-mean noise `x` (a batch of `n` samples
of the layer's real input shape, variance `σ²`) and produces its linear output `y = f_W(x)` (no
bias, no activation). The mirror update is

    ΔB = η · ∇_W(½‖f_W(x)‖²) ⊘ (n·C) − η·λ·B

the weight-gradient of the layer's own linear op, so one rule serves Dense and every
convolution: for Dense it is `η·xᵀ(xW)/n ≈ η·σ²·W`.

**Exact fixed point with any padding.** `C` (`link_counts`, W's shape) counts, for each kernel
entry, the (input element, output element) pairs it links on one sample where the input is real
rather than padding: 1 for Dense on vectors, the output's spatial size for a "valid"
convolution, fewer for the border taps of a "same", strided or dilated one. Since the noise is
white, `E[∇_W(½‖f_W(x)‖²)] = n·σ²·C ⊙ W` for any op in which each (input element, output element)
pair is linked by at most one kernel entry with coefficient 1 — matmuls, einsums and every
convolution (padding, stride, dilation, groups, depthwise, transposed) — so dividing by `C`
makes `E[ΔB] = η·(σ²·W − λ·B)` and `B → (σ²/λ)·W` exactly, with one mirror rate for every layer
type. `C = ∇_W Σ f_W(1)` (a sample of ones) is computed once per layer from `layer.linear`, with
no code per layer type; an entry that never meets real input (`C = 0`, only when a dilated
kernel is wider than twice its input) has no gradient, its `B` decays to 0, and it carries no
error either.

**Finite noise batches.** With `W` frozen the fixed point is a stationary distribution around
`(σ²/λ)·W`: every step adds fresh sampling noise, which the decay forgets at rate `ηλ`. Summing
the geometric series of the noise's variance gives the residual angle between `B` and `W`

    tan²θ ≈ η·λ·m / ((2 − η·λ)·n)       (≈ d_in·η·λ / (2n) for Dense and η·λ ≪ 1)

with `m = (d_in + κ − 2) / c` (`mirror_fan_in`), `κ = E[x⁴]/σ⁴` the noise's fourth moment
(normal 3, uniform 1.8, Rademacher 1): `d_in` the number of kernel entries feeding one output
element (Dense: `in`; convolution: `k1·…·kn·c_in/groups`), `c` the number of positions each kernel
entry is averaged over (Dense: 1; "valid" convolution: the output's spatial size). The sample
estimate `(1/n)·Σ x xᵀW` of `σ²·W` has per-sample variance `σ⁴·((κ − 2)·W_ij² + ‖W_:j‖²)` per
entry, `σ⁴·(d_in + κ − 2)·‖W‖²` in all; `"auto"` sizes with the leading order `d_in / c`.
Wide Dense layers therefore need
much bigger noise batches than convolutions, which average over many positions; `batch_size`
may be set per layer, or `"auto"` to size each layer's `n` for a target angle (`auto_batch_size`).
Solved for the rate instead, the law says what a capped batch costs: the samples per step a
target angle needs scale with `η·λ`, so a layer limited to `n` samples reaches `θ` at
`η·λ = 2n·tan²θ / (m + n·tan²θ)` (`auto_learning_rate`, `cap_policy="rate"`), following a moving
`W` with a lag of about `1/(η·λ)` steps.
With `λ = 0` there is no fixed point (`B` grows like the step count and its angle shrinks like
`1/√(steps·n)`), so `"auto"` needs `λ > 0`.

Noise comes from a stateless generator seeded by `(seed, layer, counter, replica)`, so a run
resumed from a checkpoint draws exactly the noise the uninterrupted run would have drawn.
`mirror.run(start, count)` runs the `count` mirror steps of counters `start, start + 1, …` as
one compiled call (one loop of a compiled function, `keras_wt.backend.fori_loop`, the counter a
tensor): exactly the noise and
updates of `count` calls of `mirror(counter)`. The counter may be a tensor, so a mirror step can
run inside a user's own `tf.function` (`mirror(optimizer.iterations)`).

A `wm` layer whose `B` no gradient uses (`feedback_used=False`, `keras_wt.unused_feedback`) has no
`B` and is not mirrored; the other layers keep the noise they would draw with it mirrored (a
layer's noise is seeded by its place among all the `wm` layers).
Under a `tf.distribute` strategy every replica draws `n / replicas` of each layer's noise
samples (`n` rounded up to a multiple of the replicas), the weight-gradients are summed across
replicas, and every replica applies the same update: all replicas keep the same `B`.

The package's modules: `config` (`MirrorConfig`, the settings), `noise` (the distributions and
`draw_noise`), `law` (`link_counts`, `mirror_fan_in`, `residual_angle`, `auto_batch_size`,
`auto_learning_rate`, `cost_cap`, `mirror_gradient`: the math above) and `core` (`WeightMirror`,
`wm_layers`); every public name is importable from `keras_wt.mirror` itself. Which mirror trains
a layer's `B` is recorded in `keras_wt.learners` (`WeightMirror` attaches itself to each layer
it mirrors).
"""

from keras_wt.mirror.noise import NOISE_DISTRIBUTIONS, NOISE_KURTOSIS, draw_noise, noise_kurtosis
from keras_wt.mirror.law import (auto_batch_size, auto_learning_rate, cost_cap, link_counts,
                                 mirror_fan_in, mirror_gradient, residual_angle)
from keras_wt.mirror.config import AUTO, MirrorConfig, MirrorSettings, check_batch_size
from keras_wt.mirror.core import WeightMirror, wm_layers

__all__ = (
    "AUTO", "NOISE_DISTRIBUTIONS", "NOISE_KURTOSIS", "MirrorConfig", "MirrorSettings",
    "WeightMirror", "auto_batch_size", "auto_learning_rate", "check_batch_size", "cost_cap",
    "draw_noise",
    "link_counts", "mirror_fan_in", "mirror_gradient", "noise_kurtosis", "residual_angle",
    "wm_layers",
)
