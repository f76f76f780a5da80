"""Models: backbone registry, heads, classifier, on-device augmentation."""

# Registers the built-in backbones and their custom layers (needed to reload
# a saved model that contains them).
from leukemia_tf.models import backbones, cnn, dinov2  # noqa: F401
from leukemia_tf.models.augment import (
    Augmenter,
    build_augmenter,
    color_factors,
    cutmix,
    mixup,
    sample_beta,
)
from leukemia_tf.models.classifier import (
    build_classifier,
    get_backbone,
    set_backbone_trainable,
)
from leukemia_tf.models.heads import (
    FlatHead,
    HierarchicalHead,
    flat_loss,
    hierarchical_loss,
    leaf_probabilities,
    level_key,
    level_log_probs,
    level_targets_to_soft,
    node_probabilities,
)
from leukemia_tf.models.registry import (
    build_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)

__all__ = [
    "Augmenter",
    "FlatHead",
    "HierarchicalHead",
    "build_augmenter",
    "build_backbone",
    "build_classifier",
    "color_factors",
    "cutmix",
    "flat_loss",
    "get_backbone",
    "get_backbone_spec",
    "hierarchical_loss",
    "leaf_probabilities",
    "level_key",
    "level_log_probs",
    "level_targets_to_soft",
    "list_backbones",
    "mixup",
    "node_probabilities",
    "register_backbone",
    "sample_beta",
    "set_backbone_trainable",
]
