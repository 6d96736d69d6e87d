"""Draw the four figures of the reference experiments: the same code as `keras-wt-plot`.

    python examples/plot_figures.py --save_dir experiments --dataset fashion_mnist

writes `figures/fashion_mnist/{test_accuracies,loss,weight_angles,delta_angles}.png` from the
latest run of every algorithm in `experiments/fashion_mnist/<algo>-V<i>/`.
"""

from keras_wt.app import plots

if __name__ == "__main__":
    plots.main()
