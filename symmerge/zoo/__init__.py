"""A zoo of small transformers trained here from scratch, to measure what alignment does to merges.

    >>> from symmerge.zoo import ZOO, build, evaluate
    >>> a, b = build("vit-digits", seed=0), build("vit-digits", seed=1)     # cached under .cache/zoo/
    >>> evaluate(a)                                                         # {"loss": ..., "accuracy": ...}

data.py loads the data sets (from installed packages only), train.py trains the models, evaluate.py scores them
(pure, batched), registry.py names the recipes and caches what they trained.
"""

from symmerge.zoo.data import CharCorpus, ImageSplits, load_digits, load_fashion_mnist, load_shakespeare
from symmerge.zoo.evaluate import evaluate_classifier, evaluate_lm, lm_windows
from symmerge.zoo.registry import ZOO, ZooEntry, build, evaluate, is_complete, load_model, read_record
from symmerge.zoo.train import train_char_gpt2, train_vit

__all__ = [
    "CharCorpus", "ImageSplits", "ZOO", "ZooEntry", "build", "evaluate", "evaluate_classifier", "evaluate_lm",
    "is_complete", "lm_windows", "load_digits", "load_fashion_mnist", "load_model", "load_shakespeare",
    "read_record", "train_char_gpt2", "train_vit",
]
