"""Arguments a hostile caller passes to the NumPy library that once escaped as MemoryError, OverflowError,
ValueError or TypeError (or ran for minutes): each now raises RefformerError at once."""

import time

import numpy as np
import pytest

from refformer.refimpl import (
    Config,
    attention_forward,
    causal_mask,
    cross_entropy_backward,
    cross_entropy_forward,
    empty_cache,
    encode,
    init_params,
    log_softmax_forward,
    model_backward,
    model_forward,
    rel_error,
    softmax_forward,
)
from refformer.refimpl.errors import RefformerError

CFG = Config(vocab_size=20, d_model=8, n_heads=2, d_ff=16, n_encoder_layers=1, n_decoder_layers=1, max_positions=16)
HUGE = np.broadcast_to(np.zeros(1, np.float32), (10 ** 6, 10 ** 6))  # 4 TB seen, 4 bytes used


def test_views_larger_than_memory_are_refused_before_any_work():
    """softmax of a broadcast 10^6 x 10^6 view read 4 TB for 400 s, then raised MemoryError."""
    start = time.perf_counter()
    for call in (lambda: softmax_forward(HUGE), lambda: log_softmax_forward(HUGE),
                 lambda: rel_error(HUGE, HUGE), lambda: rel_error(np.ones(3), np.ones(3) + HUGE[0, :3])):
        try:
            call()
        except RefformerError as error:
            assert "larger than this machine's memory" in str(error) or "shapes differ" in str(error)
    q = np.zeros((1, 1, 2, 4))
    with pytest.raises(RefformerError, match="does not broadcast"):  # the shape is checked before NaN is sought
        attention_forward(q, q, q, HUGE)
    assert time.perf_counter() - start < 5


def test_sizes_beyond_int64_are_refused():
    with pytest.raises(RefformerError, match="past must be"):
        causal_mask(3, 5, past=10 ** 20)  # was OverflowError: Python int too large to convert to C long
    with pytest.raises(RefformerError, match="batch_size"):
        empty_cache(CFG, 10 ** 20)  # was ValueError: Maximum allowed dimension exceeded


def test_numbers_too_large_for_a_float_and_ragged_masks():
    params = init_params(CFG, np.random.default_rng(0))
    src, tgt = np.array([[4, 5, 2]]), np.array([[1, 4]])
    logits, _ = model_forward(CFG, params, src, tgt)
    with pytest.raises(RefformerError, match="label_smoothing"):
        cross_entropy_forward(logits, tgt, label_smoothing=10 ** 400)  # was TypeError from np.isfinite
    _, cache = cross_entropy_forward(logits, tgt)
    with pytest.raises(RefformerError, match="dloss"):
        cross_entropy_backward(cache, 10 ** 400)
    with pytest.raises(RefformerError, match="rectangular"):  # was ValueError: inhomogeneous shape
        encode(CFG, params, np.array([[4, 5], [6, 2]]), [[1, 1], [1]])
    with pytest.raises(RefformerError, match="rectangular"):
        model_forward(CFG, params, np.array([[4, 5], [6, 2]]), np.array([[1, 4], [1, 5]]), src_mask=[[1], [1, 1]])


def test_training_helpers_refuse_wrong_kinds(tmp_path):
    """Each was a TypeError, AttributeError, KeyError, ValueError or OverflowError from inside."""
    import os

    from refformer.refimpl.training.batching import batch_stream, collate, epoch_order, fingerprint, make_batches
    from refformer.refimpl.training.checks import check_fits, check_output_dir, estimate_batch_memory
    from refformer.refimpl.training.evaluate import evaluate
    from refformer.refimpl.training.log import plot_log, read_log, write_log

    examples = [([4, 2], [1, 5], [5, 2])]
    params = init_params(CFG, np.random.default_rng(0))
    calls = [lambda: fingerprint(None), lambda: fingerprint([np.zeros(3)]), lambda: batch_stream({0: 1}, 0).__next__(),
             lambda: collate(examples, pad_id=10 ** 20), lambda: make_batches(examples, max_tokens=9, pad_id=10 ** 20),
             lambda: make_batches(examples, max_tokens=9, pad_id=0, shuffle_ties=np.zeros(2)),
             lambda: epoch_order(10 ** 20, 0, 0), lambda: estimate_batch_memory(None, 1, 1, 1),
             lambda: estimate_batch_memory(CFG, "2", 1, 1), lambda: check_fits(CFG, "x"),
             lambda: check_output_dir(tmp_path / "o", resume=np.zeros(2)),
             lambda: check_output_dir(tmp_path / "o", inputs=None),
             lambda: evaluate(CFG, params, examples, references=1.5), lambda: write_log(None, []),
             lambda: plot_log(1.5, [])]
    for n, call in enumerate(calls):
        with pytest.raises(RefformerError):
            call()
    # an integer path was opened as a file descriptor, and closing the file closed it: stdout here
    stdout = os.dup(1)
    try:
        with pytest.raises(RefformerError, match="path must be a file path"):
            read_log(1)
        os.fstat(1)  # still open
    finally:
        os.close(stdout)


def test_data_functions_refuse_paths_that_are_not_paths(tmp_path):
    """read_lines(0) read stdin (an integer is a file descriptor to open()); others raised TypeError/ValueError."""
    from refformer.refimpl.training import data

    calls = [lambda: data.read_lines(0), lambda: data.read_tsv(None), lambda: data.write_lines(1, ["a"]),
             lambda: data.write_tsv(tmp_path / "x.tsv", None), lambda: data.split_path(None, "train", "decoder-only"),
             lambda: data.split_path(tmp_path, np.zeros(2), "decoder-only"), lambda: data.detect_family(1.5),
             lambda: data.check_split_output(None, ".tsv"), lambda: data.check_split_output(tmp_path, np.zeros(2)),
             lambda: data.extract_de_en(np.zeros(2)), lambda: data.find_pydoc_sources(np.zeros(2)),
             lambda: data.split_by_hash(None, str), lambda: data.split_by_hash(["a"], None)]
    for call in calls:
        with pytest.raises(RefformerError):
            call()


def test_backward_refuses_a_cache_of_another_config_or_dtype():
    """model_backward took a cache from another config (or from float32 parameters with float64 ones) and returned
    wrong gradients; a dlogits of another dtype gave float64 gradients for float32 parameters."""
    params = init_params(CFG, np.random.default_rng(0), dtype=np.float64)
    src, tgt = np.array([[4, 5, 2]]), np.array([[1, 4]])
    logits, cache = model_forward(CFG, params, src, tgt)
    other = CFG.replace(norm_first=not CFG.norm_first)
    with pytest.raises(RefformerError, match="another config"):
        model_backward(other, params, cache, np.ones_like(logits))
    params32 = init_params(CFG, np.random.default_rng(0), dtype=np.float32)
    with pytest.raises(RefformerError, match="float64 parameters"):
        model_backward(CFG, params32, cache, np.ones_like(logits, dtype=np.float32))
    with pytest.raises(RefformerError, match="dlogits has dtype float32"):
        model_backward(CFG, params, cache, np.ones_like(logits, dtype=np.float32))
    grads = model_backward(CFG, params, cache, np.ones_like(logits))
    assert grads["decoder"]["embed_tokens"]["weight"].dtype == np.float64


def test_minus_inf_logits_and_rows_beyond_the_float_range():
    """A -inf logit (a banned class) made cross_entropy NaN through 0 * inf; a row spanning more than the float range
    printed overflow warnings; log_softmax of an all -inf row was NaN (softmax gives zeros there)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, cache = cross_entropy_forward(np.array([[0.0, -np.inf, 1.0]]), np.array([0]))
        assert np.isfinite(loss) and np.isclose(loss, np.log1p(np.e))
        assert np.isfinite(cross_entropy_backward(cache)).all()
        assert cross_entropy_forward(np.array([[0.0, -np.inf]]), np.array([1]))[0] == np.inf  # the target's is -inf
        np.testing.assert_array_equal(softmax_forward(np.array([[1e308, -1e308]]))[0], [[1.0, 0.0]])
        np.testing.assert_array_equal(softmax_forward(np.array([[3e38, -3e38]], np.float32))[0], [[1.0, 0.0]])
        np.testing.assert_array_equal(log_softmax_forward(np.array([[1e308, -1e308]]))[0], [[0.0, -np.inf]])
        np.testing.assert_array_equal(log_softmax_forward(np.full((1, 3), -np.inf))[0], np.full((1, 3), -np.inf))
        for big in (1e30, -1e30):
            logits = np.zeros((1, 2, 5))
            logits[0, 0, 3] = big
            assert np.isfinite(cross_entropy_forward(logits, np.array([[3, 4]]))[0])


@pytest.mark.parametrize("dtype,scale", [(np.float64, 1e300), (np.float32, 1e30), (np.float32, 1e20)])
def test_norms_of_rows_whose_squares_overflow(dtype, scale):
    """layer_norm/rms_norm of finite rows whose squares overflow (1e20 in float32, a diverging run's activations)
    gave zeros with an overflow warning: the variance was inf. Both are scale-invariant, so y(c x) = y(x) and
    dx(c x) = dx(x) / c."""
    import warnings

    from refformer.refimpl import layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 16)) + np.array([[0.0], [5.0], [-1.0]])).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    weight, bias = rng.normal(size=16).astype(dtype), rng.normal(size=16).astype(dtype)
    big = x * dtype(scale)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for forward, backward, p in ((layer_norm_forward, layer_norm_backward, {"weight": weight, "bias": bias}),
                                     (rms_norm_forward, rms_norm_backward, {"weight": weight})):
            y, cache = forward(p, x, 1e-30)
            y_big, cache_big = forward(p, big, 1e-30)
            assert y_big.dtype == dtype and np.isfinite(y_big).all()
            np.testing.assert_allclose(y_big, y, rtol=tol, atol=tol)
            dx, dp = backward(p, cache, dy)
            dx_big, dp_big = backward(p, cache_big, dy)
            np.testing.assert_allclose(dx_big * dtype(scale), dx, rtol=tol, atol=tol)
            np.testing.assert_allclose(dp_big["weight"], dp["weight"], rtol=tol, atol=tol)
    ones = np.full((1, 4), np.finfo(dtype).max / 2, dtype)  # the mean's sum overflows too: a constant row
    np.testing.assert_array_equal(layer_norm_forward({"weight": np.ones(4, dtype)}, ones, 1e-5)[0], np.zeros((1, 4)))
    nan_row = np.array([[np.nan, 1.0, 2.0, 3.0], [1e300, -1e300, 0.0, 1.0]], dtype=np.float64)
    y = layer_norm_forward({"weight": np.ones(4)}, nan_row, 1e-5)[0]
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()  # NaN propagates in its own row only


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_at_huge_inputs_are_finite_without_warnings(dtype):
    """gelu_tanh's gradient at |x| > ~1e19 in float32 was NaN (0 * inf where tanh saturates); gelu, gelu_tanh and
    silu printed overflow warnings for results that are exact (exp(-inf) = 0, tanh(inf) = 1)."""
    import warnings

    from refformer.refimpl import activation_backward, activation_forward

    x = np.array([1e30, -1e30, 3e38, -3e38, 1e13, -1e13, 30.0, -30.0, -1000.0, 0.5], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind in ("relu", "gelu", "gelu_tanh", "silu"):
            y, cache = activation_forward(x, kind)
            dx = activation_backward(cache, np.ones_like(x), kind)
            assert y.dtype == dx.dtype == dtype and np.isfinite(y).all() and np.isfinite(dx).all(), kind
            np.testing.assert_allclose(dx[:6], [1, 0, 1, 0, 1, 0], atol=1e-6)


def test_numerical_gradient_restores_x_and_divides_by_the_step_taken():
    """numerical_gradient left x perturbed when f raised; in float32 it divided by 2 eps although x + eps rounds
    (the gradient of sum(x^2) at [1, 2] came out [1.91, 3.81]); rel_error of +-1e308 was inf with a warning."""
    import warnings

    from refformer.refimpl import numerical_gradient, rel_error

    x = np.zeros(3)
    with pytest.raises(ZeroDivisionError):
        numerical_gradient(lambda: 1 / 0, x)
    np.testing.assert_array_equal(x, np.zeros(3))
    x32 = np.array([1.0, 2.0], np.float32)
    _, grad = numerical_gradient(lambda: float((x32.astype(np.float64) ** 2).sum()), x32)
    np.testing.assert_allclose(grad, [2.0, 4.0], rtol=1e-6)
    with pytest.raises(RefformerError, match="too small to change"):
        numerical_gradient(lambda: 1.0, np.array([1e10]), eps=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_error(np.array([1e308]), np.array([-1e308])) == 2.0


def test_corpora_in_utf16_or_utf32_with_a_byte_order_mark_and_pipes(tmp_path):
    """train.tsv saved as UTF-16 (Windows editors) was refused as 'not valid UTF-8 (byte 0xff)' while generate
    --input reads it; read_tsv/read_lines of a pipe blocked forever."""
    import os

    from refformer.refimpl.training.data import read_lines, read_tsv

    for encoding in ("utf-16", "utf-32", "utf-16-be", "utf-32-be"):
        path = tmp_path / f"{encoding}.tsv"
        mark = "\ufeff" if encoding.endswith("-be") else ""  # "utf-16" and "utf-32" write their own mark
        path.write_bytes(f"{mark}ein Haus\ta house\n\nder Hund\tthe dög\n".encode(encoding))
        assert read_tsv(path) == [("ein Haus", "a house"), ("der Hund", "the dög")]
        assert read_lines(path) == ["ein Haus\ta house", "der Hund\tthe dög"]
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"\xff\xfe" + "ein".encode("utf-16-le") + b"\x00")
    with pytest.raises(RefformerError, match="UTF-16 byte-order mark but is not valid UTF-16"):
        read_tsv(bad)
    os.mkfifo(tmp_path / "pipe.tsv")
    for read in (read_tsv, read_lines):
        with pytest.raises(RefformerError, match="not a regular file"):
            read(tmp_path / "pipe.tsv")


def test_a_negative_position_is_not_called_too_long():
    """decoder_step with position -1 said 'the input is too long for this model'."""
    from refformer.refimpl import decoder_step

    cfg = Config(vocab_size=20, d_model=8, n_heads=2, d_ff=16, n_encoder_layers=0, n_decoder_layers=1,
                 family="decoder-only", max_positions=4)
    params = init_params(cfg, np.random.default_rng(0))
    with pytest.raises(RefformerError, match=r"positions must lie in \[0, max_positions=4\); it holds -1"):
        decoder_step(cfg, params, np.array([[1]]), np.array([[-1]]), np.array([[1]]), empty_cache(cfg, 1))
    with pytest.raises(RefformerError, match="too long"):
        decoder_step(cfg, params, np.array([[1]]), np.array([[4]]), np.array([[1]]), empty_cache(cfg, 1))


def test_no_public_function_changes_its_inputs():
    """Every swept public function, called with good arguments (test_errors.good_calls), leaves every array it was
    given (parameters, inputs, caches, upstream gradients) as it was."""
    import copy

    from refformer.refimpl import encode
    from tests.refimpl.test_errors import DO, ED, good_calls

    def arrays(value, prefix="", out=None):
        out = {} if out is None else out
        if isinstance(value, np.ndarray):
            out[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                arrays(item, f"{prefix}.{key}", out)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                arrays(item, f"{prefix}.{i}", out)
        return out

    rng = np.random.default_rng(0)  # the arguments of test_errors' setup fixture
    params = init_params(ED, rng, np.float64)
    s = dict(params=params, decoder_only=init_params(DO, rng, np.float64), src=rng.integers(4, 13, size=(2, 5)),
             tgt=rng.integers(4, 13, size=(2, 3)), x=rng.standard_normal((2, 3, 8)),
             memory=rng.standard_normal((2, 5, 8)), q=rng.standard_normal((2, 2, 3, 4)),
             k=rng.standard_normal((2, 2, 5, 4)), layer=params["decoder"]["layers"][0],
             enc_layer=params["encoder"]["layers"][0], attn=params["decoder"]["layers"][0]["self_attn"])
    s["cross_kv"] = encode(ED, params, s["src"])[1]
    calls = good_calls(s)
    assert len(calls) > 40
    changed = []
    for name, (function, args, kwargs) in calls.items():
        before = copy.deepcopy(arrays([args, kwargs]))
        try:
            function(*args, **kwargs)
        except RefformerError:
            continue
        after = arrays([args, kwargs])
        changed += [f"{name}: argument {key}" for key, value in before.items()
                    if not np.array_equal(value, after[key], equal_nan=value.dtype.kind in "fc")]
    assert not changed, changed
