"""Run one reference experiment from Python: the same code as the `keras-wt-train` command.

    python examples/load_and_run.py --dataset fashion_mnist --algo kp --n_epochs 5
    python examples/load_and_run.py --dataset fashion_mnist --algo kp --n_epochs 10 --resume

Every flag of `keras-wt-train --help` is accepted (the reference flags of Akrout et al.'s code:
`--n_epochs --size_hidden_layers --batch_size --learning_rate --test_frequency --save_dir
--seed`, plus `--dataset --algo --model --data_dir --resume`, the `--mirror_*` flags and
`--kp_weight_decay`). The dataset is read from local files first (Fashion-MNIST: the Debian
package `dataset-fashion-mnist`), so this runs offline.
"""

import logging

from keras_wt.app import experiment

if __name__ == "__main__":
    run_dir = experiment.train_from_flags()
    config, results = experiment.load_results(run_dir)
    if results:
        last = results[max(results, key=lambda key: int(key.split("_")[1]))]
        logging.getLogger(__name__).info(
            "%s on %s: test accuracy %.2f%%, weight angles %s, delta angles %s (results in %s)",
            config["algo"], config["dataset"], last["test_accuracy"], last["weight_angles"],
            last["delta_angles"], run_dir,
        )
