"""keras_wt: deep learning without weight transport, as drop-in Keras 3 layers.

Backprop (`bp`), feedback alignment (`fa`), sign symmetry (`ss`), the weight mirror (`wm`) and
the Kolen–Pollack circuit (`kp`) of Akrout et al., "Deep Learning without Weight Transport"
(NeurIPS 2019), and the rest of the field's rules in the same registry: sign-concordant feedback
with fixed or batchwise random magnitudes (`frsf`, `brsf`), direct feedback alignment (`dfa`),
and Kunin et al.'s symmetric and information alignment (`sa`, `ia`). See DESIGN.md for the math
and the README for a tour.
"""

from keras_wt._backend import check_backend

check_backend()

from keras_wt import algorithms  # noqa: E402
from keras_wt import alignment  # noqa: E402
from keras_wt import callbacks  # noqa: E402
from keras_wt import datasets  # noqa: E402
from keras_wt import dfa  # noqa: E402
from keras_wt import local  # noqa: E402
from keras_wt import layers  # noqa: E402
from keras_wt import metrics  # noqa: E402
from keras_wt import mirror  # noqa: E402
from keras_wt import models  # noqa: E402
from keras_wt import optimizers  # noqa: E402
from keras_wt import schedules  # noqa: E402  (registers WarmupSchedule for load_model)
from keras_wt import unused_feedback  # noqa: E402
from keras_wt.convert import convert, strip  # noqa: E402
from keras_wt.algorithms import ALGORITHMS  # noqa: E402
from keras_wt.layers import feedback_pairs  # noqa: E402
from keras_wt.unused_feedback import drop_unused_feedback  # noqa: E402

__version__ = "0.1.0"
