"""Conversion inside layers that are not graphs: custom layers, wrappers, keras-hub models.

`keras_wt.convert` rebuilds the layers of a Sequential or Functional graph with
`keras.models.clone_model`. The sublayers of any other layer are made by that layer's own code
— a user's `Layer` holding `Dense` sublayers, `TimeDistributed`, `Bidirectional`, keras-hub's
`TransformerEncoder`, and the Functional subclasses whose class and methods a user keeps
(keras-hub's backbones and tasks, `GPT2CausalLM.generate`) — so they are converted in place,
in a copy of the model (`keras_wt.convert` makes it):

* **Promotion.** A stock layer whose twin is a `FeedbackLayer` (`Dense`, `EinsumDense`, the
  convolutions but separable ones, `ReversibleEmbedding`) becomes an instance of its twin
  (`_compat.set_class`) and gets its `B` (`FeedbackLayer.build_feedback`): the same object, with
  the same weight variables, in the same place — an attribute, a list, or a node of a graph.
* **Replacement.** A stock layer whose twin is made of feedback sublayers
  (`SeparableConv1D/2D`, `MultiHeadAttention`, and any such twin of `keras_wt.layers.TWINS`) is
  replaced by that twin, built from its config and build shapes, its weights copied, in every
  attribute, list or dict of its parent that holds it (`_compat.replace_child`). A node of a
  graph Keras did not clone cannot be replaced: it is reported (`Conversion.left`).

A converted layer keeps its name: where several feedback layers share one (the `query` of every
Transformer block), the keys of the alignment metrics, `feedback_pairs` and the mirror are paths
of ancestor names (`keras_wt.layers.feedback_keys`), and a wrapper that names its sublayers
after its own (`Bidirectional`'s `forward_<name>`) names them the same when it is loaded.

**Saving.** Such a layer's `get_config` holds only its constructor arguments: loaded, it would
rebuild stock sublayers, which do not take the feedback variables saved. So the *root* of an
in-place conversion (the topmost layer or model holding converted sublayers whose configuration
is not a graph's: see `wrap_roots`) becomes an instance of `Converted[<its class>]`, a subclass
of its own class (one per class, named as the class, so that Keras saves its weights at the same
paths), registered for saving as `keras_wt>Converted`. Its `get_config` is
`{"layer": <the layer serialized as its own class>, "feedback_layers": [{"path", "class_name",
"name", "config"}, ...]}`, one entry per feedback layer below it (the child indices from the
root, the twin's registered name, its name and feedback arguments); `Converted.from_config`
deserializes the layer, converts the sublayers at those paths again (`apply`) — so that
`keras.saving.load_model` (after `import keras_wt`) then loads every `B` saved — and returns it.
`keras_wt.strip` turns it back into its own class.
"""

from keras_wt.nested import inplace
from keras_wt.nested import saving
from keras_wt.nested.inplace import Conversion
from keras_wt.nested.inplace import convert_layer
from keras_wt.nested.inplace import is_graph
from keras_wt.nested.inplace import is_plain_graph
from keras_wt.nested.saving import Converted
from keras_wt.nested.saving import apply
from keras_wt.nested.saving import converted_class
from keras_wt.nested.saving import copy_model
from keras_wt.nested.saving import original_class
from keras_wt.nested.saving import record
from keras_wt.nested.saving import unwrap
from keras_wt.nested.saving import wrap
from keras_wt.nested.saving import wrap_roots

__all__ = (
    "Conversion", "Converted", "apply", "convert_layer", "converted_class", "copy_model",
    "is_graph", "is_plain_graph", "original_class", "record", "strip_below", "unwrap", "wrap",
    "wrap_roots",
)


def strip_below(root):
    """Makes every keras_wt layer below `root` its stock twin, in place (composite twins are
    replaced in their parent), and every `Converted` layer at or below it an instance of its
    own class again.

    Raises:
        ValueError: a keras_wt layer has no stock twin, or cannot be replaced.
    """
    inplace.strip_layers(root)
    unwrap(root)
