"""What each mirror noise distribution costs to draw, as a ratio to Gaussian noise (issue #21).

Draws the noise of one mirror step with `keras_wt.mirror.draw_noise` (exactly the mirror's
draw: stateless Philox, the seed a tensor) for the noise shapes of the reference MLP (a batch
of 128 samples of the 784 and 500 inputs of its two layers), of the BN CNN's 3,136-input hidden
Dense layer at the convnet recipe's capped auto batch (2,048), and of a ResNet-18 convolution at
32x32 with a noise batch of 64 (64 channels). Each (shape, jit) row times `normal`, `uniform`
and `rademacher` interleaved, one draw each in a shuffled order per round, each draw summed
(so that XLA draws all of it; the sum costs the same for every distribution) and read back; the table gives the median draw time of each distribution as a
ratio to `normal`'s median in the same rows. Ratios only: absolute times depend on the machine.

    .venv/bin/python benchmarks/mirror_noise.py            # ~1 min on 2 cores
    .venv/bin/python benchmarks/mirror_noise.py --rounds 200
"""

import argparse
import random
import time

import numpy as np
import tensorflow as tf

from keras_wt.mirror import NOISE_DISTRIBUTIONS, draw_noise

SHAPES = {
    "MLP layer 1 (128×784)": (128, 784),
    "MLP layer 2 (128×500)": (128, 500),
    "CNN hidden Dense, auto (2048×3136)": (2048, 3136),
    "ResNet-18 conv (64×32×32×64)": (64, 32, 32, 64),
}


def drawer(shape, distribution, jit_compile):
    @tf.function(jit_compile=jit_compile)
    def draw(seed):
        x = draw_noise(shape, seed, distribution, 1.0)
        return tf.reduce_sum(x)  # all of it: XLA would draw only an element it is asked for
    return draw


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    print(f"median draw time / normal's, {args.rounds} interleaved rounds")
    print("| noise shape | jit | " + " | ".join(NOISE_DISTRIBUTIONS) + " |")
    print("|---|---|" + "---|" * len(NOISE_DISTRIBUTIONS))
    for name, shape in SHAPES.items():
        for jit_compile in (False, True):
            draws = {d: drawer(shape, d, jit_compile) for d in NOISE_DISTRIBUTIONS}
            times = {d: [] for d in NOISE_DISTRIBUTIONS}
            for r in range(args.warmup + args.rounds):
                order = list(NOISE_DISTRIBUTIONS)
                rng.shuffle(order)
                for d in order:
                    seed = tf.constant([r, 7], tf.int64)
                    start = time.perf_counter()
                    draws[d](seed).numpy()
                    if r >= args.warmup:
                        times[d].append(time.perf_counter() - start)
            base = np.median(times["normal"])
            ratios = " | ".join(f"{np.median(times[d]) / base:.2f}" for d in NOISE_DISTRIBUTIONS)
            print(f"| {name} | {'on' if jit_compile else 'off'} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
