"""Nested parameter trees (dicts and lists of arrays) <-> flat dotted names.

The dotted name is the checkpoint key and the ONNX initializer name:
params["decoder"]["layers"][0]["cross_attn"]["q_proj"]["weight"] <-> "decoder.layers.0.cross_attn.q_proj.weight".
"""

import numpy as np

from .errors import RefformerError


def flatten(tree, prefix=""):
    """{dotted name: array} for every array leaf of nested dicts/lists (other leaves are skipped).

    Raises RefformerError unless tree is a dict or list.
    """
    if not isinstance(tree, (dict, list)):
        raise RefformerError(f"tree must be a dict or list of arrays, got {type(tree).__name__}")
    flat = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            flat[name] = value
        elif isinstance(value, (dict, list)):
            flat.update(flatten(value, name + "."))
    return flat


def unflatten(flat, template):
    """Rebuild the structure of template (a tree whose leaves are anything) from flat dotted names.

    Raises RefformerError naming a dotted name that flat lacks.
    """
    if not isinstance(flat, dict):
        raise RefformerError(f"flat must be a dict of dotted names, got {type(flat).__name__}")

    def build(node, prefix):
        if isinstance(node, dict):
            return {key: build(value, f"{prefix}{key}.") for key, value in node.items()}
        if isinstance(node, list):
            return [build(value, f"{prefix}{i}.") for i, value in enumerate(node)]
        if prefix[:-1] not in flat:
            raise RefformerError(f"{prefix[:-1]} is missing")
        return flat[prefix[:-1]]

    return build(template, "")


def tree_map(fn, tree):
    """Apply fn to every leaf (anything not a dict or list), keeping the structure. No checks: fn's errors pass
    through."""
    if isinstance(tree, dict):
        return {key: tree_map(fn, value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [tree_map(fn, value) for value in tree]
    return fn(tree)


def tree_cast(tree, dtype):
    """A copy of the tree with every array leaf cast to dtype. Raises RefformerError for a leaf that is not an array."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise RefformerError(f"dtype must be a numpy dtype such as np.float32, got {dtype!r}") from None

    def cast(leaf):
        if not isinstance(leaf, np.ndarray):
            raise RefformerError(f"every leaf of a parameter tree must be a numpy array, got {type(leaf).__name__}")
        return leaf.astype(dtype)

    return tree_map(cast, tree)
