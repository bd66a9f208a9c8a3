"""The static-cache variant (decoder_static.onnx, fixed buffers, in-graph argmax) on ONNX Runtime CPU:
verified against decoder.onnx by verify, and token for token equal to refimpl for every strategy."""

import numpy as np
import pytest

from refformer.export.export import export_model
from refformer.export.folder import default_export_dir
from refformer.export.verify import verify
from refformer.refimpl import Config, RefformerError, init_params, load, save
from refformer.refimpl.generate import GenerationOptions, generate
from refformer.refimpl.model import left_padded_positions
from refformer.runtime import generator as generator_module
from refformer.runtime import stepper as stepper_module
from refformer.runtime.generator import Generator, auto_variant
from refformer.runtime.stepper import OrtStepper, StaticOrtStepper

from .test_generator import STRATEGIES, TEXTS, make_model, strategy_id, tokenizer_file  # noqa: F401  (fixture)

FAMILIES = ("encoder-decoder", "decoder-only")
STATIC_LENGTH = 40


@pytest.fixture(scope="module")
def exported_models(tmp_path_factory, tokenizer_file):  # noqa: F811
    """family -> a test model (head size 8, so every variant can run) exported once with every graph: decoder_fused and
    the static variants (static, static_mha, static_fused) at a static length of 40."""
    paths = {}
    for family in FAMILIES:
        paths[family] = tmp_path_factory.mktemp(family) / "m"
        make_model(paths[family], tokenizer_file, family)
        export_model(paths[family], static_length=STATIC_LENGTH, fused_attention=True)
    return paths


def variant_generator(exported_models, variant, family):
    """A new Generator on the CPU for the family's exported model (it finds the export fresh: nothing is exported)."""
    return Generator(exported_models[family], provider="cpu", variant=variant, static_length=STATIC_LENGTH), family


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_in_graph_argmax_respects_min_new_tokens(tmp_path, family):
    """eos made the argmax everywhere: the fast path must look at the logits while eos is banned."""
    cfg = Config(vocab_size=30, d_model=16, n_heads=2, d_ff=32, family=family, max_positions=32, dropout=0.0,
                 tie_embeddings=False, lm_head_bias=True)
    params = init_params(cfg, np.random.default_rng(1))
    params["lm_head"]["bias"][cfg.eos_id] = 50.0
    save(tmp_path / "m", cfg, params)
    export_model(tmp_path / "m", static_length=20)
    stepper = StaticOrtStepper(cfg, default_export_dir(tmp_path / "m", static_length=20), "fp32")
    inputs = {"src_ids": np.array([[5, 6, 2]])} if family == "encoder-decoder" else {"prompt_ids": np.array([[1, 5]])}
    options = GenerationOptions(max_new_tokens=6, min_new_tokens=4)
    got = generate(cfg, params, options=options, stepper=stepper, **inputs)
    assert got == generate(cfg, params, options=options, **inputs)
    assert len(got[0][0]) == 5 and got[0][0][-1] == cfg.eos_id


def test_verify_checks_the_static_graph_against_the_reference_graph(tmp_path):
    cfg = Config(vocab_size=30, d_model=16, n_heads=4, d_ff=32, max_positions=32, dropout=0.0)
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)))
    manifest = export_model(tmp_path / "m", static_length=16, dtype="fp16")
    assert manifest["graphs"]["decoder_static"]["max_length"] == 16
    assert manifest["graphs"]["decoder_static"]["verified_against"] == "decoder.onnx"
    rows, _ = verify(tmp_path / "m", providers=["CPUExecutionProvider"])
    static = {row["output"]: row for row in rows if row["check"] == "static"}
    assert set(static) == {"logits vs decoder.onnx", "logits vs refimpl", "next_ids = argmax(logits)"}
    assert all(row["ok"] for row in rows)
    with pytest.raises(RefformerError, match="static-length"):
        export_model(tmp_path / "m", static_length=64)


def test_static_cache_overflow_is_a_clear_error(tmp_path, tokenizer_file):  # noqa: F811
    make_model(tmp_path / "m", tokenizer_file, "decoder-only")
    generator = Generator(tmp_path / "m", provider="cpu", variant="static", static_length=6)
    with pytest.raises(RefformerError, match="static cache holds 6 positions"):
        generator.generate("The weather is", max_new_tokens=20, min_new_tokens=20)


def test_auto_variant_is_reference_on_the_cpu(tmp_path, tokenizer_file):  # noqa: F811
    make_model(tmp_path / "m", tokenizer_file, "decoder-only")
    assert Generator(tmp_path / "m", provider="cpu").variant == "reference"


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_fused_attention_variant_matches_refimpl(exported_models, family):
    """decoder_fused.onnx (com.microsoft MultiHeadAttention, which has a CPU kernel) behind the same stepper."""
    generator, _ = variant_generator(exported_models, "fused", family)
    assert generator.stepper.decoder.get_modelmeta().graph_name == "refformer_decoder_fused"
    cfg, params = load(generator.model_dir)
    inputs = generator.encode_inputs(TEXTS[family])
    for options in STRATEGIES:
        options = GenerationOptions(**options)
        assert generator.generate_ids(TEXTS[family], options) == generate(cfg, params, options=options, **inputs)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_verify_checks_the_fused_graph(tmp_path, dtype):
    cfg = Config(vocab_size=30, d_model=16, n_heads=4, d_ff=32, max_positions=32, dropout=0.0, norm_first=True)
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)))
    manifest = export_model(tmp_path / "m", dtype=dtype, fused_attention=True)
    assert manifest["graphs"]["decoder_fused"]["variant"] == "fused"
    rows, _ = verify(tmp_path / "m", providers=["CPUExecutionProvider"])
    fused = [row for row in rows if row["check"] == "fused"]
    assert len(fused) == 2 and all(row["ok"] for row in rows), rows


# ---------------------------------------------------------------------------- decoder_static_fused.onnx


@pytest.fixture(params=FAMILIES)
def static_fused_generator(request, exported_models):
    """A new Generator per test: the buffer-set tests change its stepper's state."""
    return variant_generator(exported_models, "static_fused", request.param)


@pytest.fixture(scope="module", params=[(variant, family) for variant in ("static", "static_fused", "static_mha")
                                        for family in FAMILIES], ids="-".join)
def static_generator(request, exported_models):
    return variant_generator(exported_models, *request.param)


@pytest.mark.parametrize("options", STRATEGIES + [dict(max_new_tokens=8, min_new_tokens=8)], ids=strategy_id)
def test_static_variants_match_refimpl(static_generator, options):
    """static: decoder_static.onnx, standard ops over fixed buffers; static_fused: GroupQueryAttention writing the
    cache in place (past and present bound to one buffer); static_mha: MultiHeadAttention over the static cache;
    the last two with fused norms and activations."""
    generator, family = static_generator
    variant = generator.variant
    assert isinstance(generator.stepper, StaticOrtStepper)
    assert generator.stepper.in_place == (variant == "static_fused")
    assert generator.stepper.decoder.get_modelmeta().graph_name == f"refformer_decoder_{variant}"
    cfg, params = load(generator.model_dir)
    options = GenerationOptions(**options)
    inputs = generator.encode_inputs(TEXTS[family])
    assert generator.generate_ids(TEXTS[family], options) == generate(cfg, params, options=options, **inputs)


def test_buffer_sets_are_kept_and_reused(static_fused_generator):
    """A captured CUDA graph replays the addresses it was captured with: one buffer set per (batch size, source
    length bucket), kept for the session, and reused calls give the same tokens as the first."""
    generator, family = static_fused_generator
    texts = TEXTS[family]
    first = generator.generate(texts, max_new_tokens=6)
    generator.generate(texts[:1], max_new_tokens=6)
    generator.generate(texts, max_new_tokens=6, num_beams=2)
    sets = dict(generator.stepper.sets)
    assert generator.generate(texts, max_new_tokens=6) == first
    assert generator.stepper.sets.keys() == sets.keys()
    assert all(generator.stepper.sets[key] is value for key, value in sets.items())  # the same buffers, not new ones
    if family == "encoder-decoder":
        assert {source_length % 16 for _, source_length in sets} == {0}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_verify_checks_the_static_fused_graph(tmp_path, dtype):
    cfg = Config(vocab_size=30, d_model=16, n_heads=2, d_ff=32, max_positions=32, dropout=0.0, norm_first=True,
                 norm="rmsnorm")
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)))
    manifest = export_model(tmp_path / "m", dtype=dtype, static_length=16, fused_attention=True)
    graph = manifest["graphs"]["decoder_static_fused"]
    assert (graph["variant"], graph["max_length"], graph["verified_against"]) == ("static_fused", 16, "decoder.onnx")
    assert "static_fused: logits vs decoder.onnx" in manifest["error"]["per_output"]
    assert manifest["graphs"]["decoder_static_mha"]["variant"] == "static_mha"
    rows, _ = verify(tmp_path / "m", providers=["CPUExecutionProvider"])
    for check in ("static_fused", "static_mha"):
        got = {row["output"]: row for row in rows if row["check"] == check}
        assert set(got) == {"logits vs decoder.onnx", "logits vs refimpl", "next_ids = argmax(logits)"}
    assert all(row["ok"] for row in rows), rows


def test_static_fused_needs_a_head_size_multiple_of_8(tmp_path, tokenizer_file):  # noqa: F811
    """Head size 4: GroupQueryAttention cannot run it, so the export has decoder_static_mha.onnx only."""
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder", n_heads=4)
    manifest = export_model(tmp_path / "m", static_length=16, fused_attention=True)
    assert "decoder_static_mha" in manifest["graphs"] and "decoder_static_fused" not in manifest["graphs"]
    with pytest.raises(RefformerError, match="multiple of 8.*use the static variant"):
        Generator(tmp_path / "m", provider="cpu", variant="static_fused")


def test_a_static_length_beyond_max_positions_is_refused_before_exporting(tmp_path, tokenizer_file, capsys):  # noqa: F811
    """Before: Generator printed an export notice for onnx/fp32-static<L>, then export refused the CLI's
    --static-length."""
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder")
    with pytest.raises(RefformerError, match=r"static_length must be at most the model's max_positions \(\d+\), "
                                             r"got 1000000"):
        Generator(tmp_path / "m", provider="cpu", variant="static", static_length=10**6)
    assert "exporting" not in capsys.readouterr().err and not (tmp_path / "m" / "onnx").exists()


def test_auto_variant_per_provider_and_dtype():
    cfg = Config(vocab_size=30, d_model=16, n_heads=2, d_ff=32)
    assert auto_variant(cfg, on_cuda=False, dtype="fp16") == ("reference",)
    assert auto_variant(cfg, on_cuda=True, dtype="fp16") == ("static_fused", "static_mha", "static")
    # no fp32 GroupQueryAttention on CUDA
    assert auto_variant(cfg, on_cuda=True, dtype="fp32") == ("static_mha", "static")
    head_4 = Config(vocab_size=30, d_model=16, n_heads=4, d_ff=32)
    assert auto_variant(head_4, on_cuda=True, dtype="fp16") == ("static_mha", "static")


def test_auto_falls_back_when_the_fused_graph_cannot_run(tmp_path, tokenizer_file, monkeypatch, capsys):  # noqa: F811
    """The fallback chain of auto on CUDA, driven on the CPU: the contrib-op graphs fail in the probe's runs
    (after their first call: where ONNX Runtime would capture the CUDA graph); the standard-op graph is last."""
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder")
    monkeypatch.setattr(generator_module, "auto_variant",
                        lambda cfg, on_cuda, dtype: ("static_fused", "static_mha", "static"))
    calls = []
    run_one = StaticOrtStepper.run_one

    def fail_after_one_call(self, *args):
        calls.append(self.decoder.get_modelmeta().graph_name)
        if "static_" in calls[-1] and calls.count(calls[-1]) > 1:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : graph capture failed")
        return run_one(self, *args)

    monkeypatch.setattr(StaticOrtStepper, "run_one", fail_after_one_call)
    generator = Generator(tmp_path / "m", provider="cpu")
    assert generator.variant == "static"
    err = capsys.readouterr().err
    assert ("the static_fused decoder cannot run here ([ONNXRuntimeError] : 1 : FAIL : graph capture failed); "
            "trying static_mha") in err
    assert "the static_mha decoder cannot run here" in err and "trying static\n" in err


@pytest.mark.parametrize("activation,norm_first,norm", [("relu", False, "layernorm"), ("gelu", True, "layernorm"),
                                                        ("gelu_tanh", False, "rmsnorm"), ("silu", True, "rmsnorm")])
def test_static_fused_graph_for_each_activation_and_norm(tmp_path, activation, norm_first, norm):
    """BiasGelu / FastGelu / QuickGelu / Relu and SkipLayerNormalization / SkipSimplifiedLayerNormalization, post- and
    pre-LN: export measures decoder_static_fused.onnx and decoder_static_mha.onnx against decoder.onnx and refimpl
    on ONNX Runtime CPU."""
    cfg = Config(vocab_size=30, d_model=16, n_heads=2, d_ff=32, max_positions=32, dropout=0.0, activation=activation,
                 norm_first=norm_first, norm=norm, family="decoder-only" if activation == "silu" else "encoder-decoder")
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)))
    error = export_model(tmp_path / "m", static_length=16, fused_attention=True)["error"]
    fused = {key: value for key, value in error["per_output"].items()
             if key.startswith(("static_fused:", "static_mha:"))}
    assert len(fused) == 6 and max(fused.values()) <= error["bound"], error


def test_least_recently_used_buffer_set_goes_beyond_the_limit(static_fused_generator, monkeypatch):
    generator, family = static_fused_generator
    monkeypatch.setattr(stepper_module, "MAX_BUFFER_SETS", 2)
    stepper = generator.stepper
    texts = TEXTS[family]
    first = generator.generate(texts, max_new_tokens=5)
    for n in (1, 2, 1):
        generator.generate(texts[:n], max_new_tokens=5)
    assert [key[0] for key in stepper.sets] == [2, 1]  # the batch of len(texts) was dropped, 1 used last
    assert all(key[:2] in stepper.sets for key in stepper.bindings)
    assert generator.generate(texts, max_new_tokens=5) == first  # allocated again, same tokens


@pytest.mark.parametrize("graph", ["decoder_static.onnx", "decoder_static_mha.onnx", "decoder_static_fused.onnx"])
def test_static_steppers_prompt_pass_steps_and_stale_caches(exported_models, graph):
    """A left-padded prompt goes through decoder.onnx in one call and its cache is moved into the static slots (for
    the in-place graph, each row's real tokens to slots 0 ..): the steps after it match the reference stepper's.
    Buffer sets are reused across calls: non-finite values an earlier call left in a cache must not reach the next."""
    cfg, _ = load(exported_models["decoder-only"])
    onnx_dir = default_export_dir(exported_models["decoder-only"], static_length=STATIC_LENGTH, fused_attention=True)
    reference, static = OrtStepper(cfg, onnx_dir, "fp32"), StaticOrtStepper(cfg, onnx_dir, "fp32", decoder_file=graph)
    prompt = np.array([[cfg.pad_id, cfg.pad_id, 5, 6], [4, 8, 9, 10]])
    prompt_keep = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    first = None
    for attempt in range(2):
        for stepper in (reference, static):
            stepper.start(None, None, 2)
        if attempt == 1:  # poison every cache buffer of the set this batch uses
            for caches in static.caches:
                for k, v in caches:
                    k.update_inplace(np.full(k.shape(), np.nan, np.float32))
                    v.update_inplace(np.full(v.shape(), np.nan, np.float32))
            static.start(None, None, 2)
        ids, keep = prompt, prompt_keep
        positions = left_padded_positions(keep)
        got_all = []
        for t in range(4):  # the prompt pass, then three one-token steps
            want, got = reference.step(ids, positions, keep), static.step(ids, positions, keep)
            real = keep[:, -ids.shape[1]:].astype(bool)
            np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-5)
            got_all.append(got[real])
            ids = np.array([[7 + t], [11 + t]])
            positions = positions[:, -1:] + 1
            keep = np.concatenate([keep, np.ones((2, 1), np.int64)], axis=1)
        first = got_all if first is None else first
        for a, b in zip(got_all, first):
            np.testing.assert_array_equal(a, b)


def test_static_decoder_only_batches_of_mixed_prompt_lengths_fit(tmp_path, tokenizer_file):  # noqa: F811
    """Per-row budgets: a short prompt may run to max_positions, past what a long one leaves, and the long one's
    left padding takes static slots. Such a batch runs as one batch per prompt length: the same ids as each prompt
    alone, and as refimpl."""
    make_model(tmp_path / "m", tokenizer_file, "decoder-only")
    generator = Generator(tmp_path / "m", provider="cpu", variant="static")  # static length = max_positions = 48
    cfg, params = load(generator.model_dir)
    texts = ["A", "The weather is nice today, is it"]
    options = GenerationOptions(min_new_tokens=10**6)  # eos banned: each runs to the end of its positions
    together = generator.generate_ids(texts, options)
    assert [len(s[0]) for s in together] == [cfg.max_positions - len(row) for row in generator.encode_rows(texts)]
    assert together == [generator.generate_ids([text], options)[0] for text in texts]
    assert together == [generate(cfg, params, options=options, **generator.encode_inputs([text]))[0] for text in texts]
