"""The code paths only CUDA takes, driven on the CPU (issue 16: device time is short, so their bugs are found here).

- auto on CUDA (auto_variant(cfg, on_cuda=True, dtype)) tries only variants that compute the model: each one, run
  here as Generator(variant=...), gives transformers' ids for tiny imported Llama / Qwen2 / T5 / BART / Marian.
- The in-place cache (decoder_static_fused.onnx) on CUDA: the prompt's cache goes through the device prompt writer
  (write_prompt: GatherElements dropping each row's left padding) and a beam reorder through gather_rows over all L
  slots, never the host copies of the CPU (StaticOrtStepper.host_cache False drives that path here).
- decoder_static_fused.onnx in fp32 on CUDA (no GroupQueryAttention kernel) is refused before any session.
"""

import json

import numpy as np
import pytest

from refformer.export import contract
from refformer.export.session import cuda_usable
from refformer.refimpl import Config, RefformerError
from refformer.refimpl.generate import GenerationOptions
from refformer.runtime import generator as generator_module
from refformer.runtime.generator import Generator, auto_variant
from refformer.runtime.stepper import StaticOrtStepper

from .test_generator import imported_generator, transformers_ids
from .test_imported_static_fused import FAMILIES as GQA_FAMILIES

ROWS = ([[5, 6, 7, 8], [9, 10, 11, 12]], [[5, 6, 7, 8, 9, 10], [11, 12]])  # one length; ragged (left padding)
SEARCHES = {"greedy": dict(max_new_tokens=8), "beams": dict(num_beams=2, max_new_tokens=6)}

LLAMA = dict(vocab_size=30, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=32, family="decoder-only",
             positional="rotary", norm="rmsnorm", norm_first=True, ffn_gated=True, activation="silu")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (transformers model, its imported model folder): tests/hf_models.py's tiny models, and the head-size-16
    Llama / Qwen2 of test_imported_static_fused, each built and imported once."""
    transformers = pytest.importorskip("transformers")
    from tests import hf_models

    made = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, (model_class, options) in GQA_FAMILIES.items():
            patch.setitem(hf_models.FAMILIES, name, (getattr(transformers, model_class),
                                                     dict(options, vocab_size=hf_models.V), "sdpa"))

        def get(family):
            if family not in made:
                folder = tmp_path_factory.mktemp(family)
                model, _ = imported_generator(folder, family)
                made[family] = model, folder / "m"
            return made[family]

        yield get


def search(generator, rows, name):
    options = generator.check_options(GenerationOptions(**SEARCHES[name]))
    return [sequence for row in generator.search_rows(rows, options) for sequence in row]


def expected(model, generator, rows, name):
    """transformers' ids row by row (unpadded), as test_imported_static_fused compares them."""
    return [transformers_ids(model, generator, [row], **SEARCHES[name])[0] for row in rows]


def test_auto_variant_on_cuda_tries_only_variants_that_compute_the_model():
    """Before: static_mha (no grouped-query or rotary attention) was tried for every Llama, and static_fused for T5
    (relative bias) and rotary head sizes GroupQueryAttention refuses; each failed in make_stepper with a notice."""
    llama, cuda = Config(**LLAMA), True
    assert auto_variant(llama, cuda, "fp16") == ("static_fused", "static")
    assert auto_variant(llama, cuda, "fp32") == ("static",)  # GroupQueryAttention has no fp32 CUDA kernel
    assert auto_variant(Config(**{**LLAMA, "head_dim": 8}), cuda, "fp16") == ("static",)  # rotary needs 16
    assert auto_variant(Config(**{**LLAMA, "head_dim": 12}), cuda, "fp16") == ("static",)  # not a multiple of 8
    t5 = Config(vocab_size=30, d_model=16, n_heads=2, d_ff=32, positional="relative", norm="rmsnorm")
    assert auto_variant(t5, cuda, "fp16") == auto_variant(t5, cuda, "fp32") == ("static",)
    marian = Config(vocab_size=30, d_model=16, n_heads=2, d_ff=32)  # head size 8, n_kv_heads = n_heads
    assert auto_variant(marian, cuda, "fp16") == ("static_fused", "static_mha", "static")
    assert auto_variant(marian, cuda, "fp32") == ("static_mha", "static")
    bart = Config(vocab_size=30, d_model=16, n_heads=4, d_ff=32, positional="learned")  # head size 4
    assert auto_variant(bart, cuda, "fp16") == auto_variant(bart, cuda, "fp32") == ("static_mha", "static")
    for cfg in (llama, t5, marian, bart):
        for dtype in contract.DTYPES:
            assert all(contract.variant_runs(cfg, v, dtype, contract.CUDA_PROVIDER) for v in auto_variant(cfg, cuda,
                                                                                                         dtype))


def test_static_fused_in_fp32_on_cuda_is_refused_before_any_session(tmp_path):
    """Before: ONNX Runtime's session would have put GroupQueryAttention on the CPU (or refused the CUDA-graph
    capture with a message to export again)."""
    cfg = Config(**LLAMA)
    file = contract.graph_file(contract.decoder_graph(contract.STATIC_FUSED))
    with pytest.raises(RefformerError, match=r"decoder_static_fused.onnx has no fp32 kernels on "
                                             r"CUDAExecutionProvider .*use fp16, or the static variant"):
        StaticOrtStepper(cfg, tmp_path, "fp32", contract.CUDA_PROVIDER, decoder_file=file)


def test_generator_refuses_static_fused_in_fp32_on_cuda_before_exporting(imported, monkeypatch):
    """Before: make_stepper exported the whole static set (minutes for a large model) and only then the stepper
    refused it."""
    _, folder = imported("llama-16")
    monkeypatch.setattr(generator_module, "runtime_provider", lambda provider, dtype: contract.CUDA_PROVIDER)
    exports = []
    monkeypatch.setattr(generator_module, "ensure_export", lambda *args, **kwargs: exports.append(args))
    with pytest.raises(RefformerError, match=r"decoder_static_fused.onnx has no fp32 kernels on CUDAExecutionProvider"):
        Generator(folder, provider="cuda", dtype="fp32", variant="static_fused")
    assert exports == []


@pytest.mark.parametrize("family", ["llama-16", "qwen2-16"])
def test_the_in_place_cache_on_the_device_path_gives_transformers_ids(imported, family, monkeypatch):
    """decoder_static_fused.onnx with the prompt writer and gather_rows reorder CUDA uses (host_cache False): the
    same slots as the host copies after a ragged prompt, and transformers' ids greedy and under beam search, for
    prompts of one length and ragged ones, in fp32."""
    model, folder = imported(family)
    host = Generator(folder, provider="cpu")
    device = Generator(folder, provider="cpu")
    assert host.variant == device.variant == "static_fused" and device.stepper.in_place
    device.stepper.host_cache = False
    calls = []
    for name in ("write_prompt", "write_prompt_on_host", "gather_rows"):
        original = getattr(StaticOrtStepper, name)
        monkeypatch.setattr(StaticOrtStepper, name, lambda self, *a, _f=original, _n=name: (calls.append(_n),
                                                                                               _f(self, *a))[1])
    # one ragged prompt pass on each path: each row's real tokens in slots 0 .. n - 1, the logits the same
    ids = np.array([[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]])
    keep = (ids != 0).astype(np.int64)
    keep[0, 2] = 1  # row 0: bos + 2 tokens after two pads
    ids[0, :2] = 3  # the pads' ids do not matter
    positions = np.maximum(np.cumsum(keep, axis=1) - 1, 0)
    lengths = keep.sum(axis=1)
    logits = {}
    for name, generator in (("host", host), ("device", device)):
        generator.stepper.start(None, None, 2)
        logits[name] = generator.stepper.step(ids, positions, keep)
    assert calls == ["write_prompt_on_host", "write_prompt"]
    np.testing.assert_allclose(logits["host"], logits["device"], rtol=0, atol=0)
    for pair_host, pair_device in zip(host.stepper.caches[host.stepper.parity],
                                      device.stepper.caches[device.stepper.parity]):
        for a, b in zip(pair_host, pair_device):
            for row, n in enumerate(lengths):
                np.testing.assert_array_equal(a.numpy()[row, :, :n], b.numpy()[row, :, :n])
    calls.clear()
    for name in SEARCHES:
        for rows in ROWS:
            assert search(device, rows, name) == expected(model, device, rows, name), (name, rows)
    assert "write_prompt" in calls and "gather_rows" in calls and "write_prompt_on_host" not in calls


@pytest.mark.parametrize("family", ["llama-16", "t5", "marian"])
def test_every_variant_auto_tries_on_cuda_computes_the_imported_model(imported, family, monkeypatch, capsys):
    """Each variant of auto's CUDA chains (fp16 and fp32), run here in fp32 (the in-place cache on its device path),
    gives transformers' ids; the fp16 chain's first variant runs in fp16 with the same ids on these tiny models; and
    auto with the CUDA chain starts on its first choice without a fallback notice."""
    model, folder = imported(family)
    cfg = Generator(folder, provider="cpu").cfg
    chains = {dtype: auto_variant(cfg, True, dtype) for dtype in contract.DTYPES}
    for variant in dict.fromkeys(chains["fp16"] + chains["fp32"]):
        generator = Generator(folder, provider="cpu", variant=variant)
        if getattr(generator.stepper, "in_place", False):
            generator.stepper.host_cache = False
        for name in SEARCHES:
            rows = ROWS[1]
            assert search(generator, rows, name) == expected(model, generator, rows, name), (variant, name)
    fp16 = Generator(folder, provider="cpu", dtype="fp16", variant=chains["fp16"][0])
    if getattr(fp16.stepper, "in_place", False):
        fp16.stepper.host_cache = False
    assert search(fp16, ROWS[1], "greedy") == expected(model, fp16, ROWS[1], "greedy")
    error = json.loads((fp16.onnx_dir / "manifest.json").read_text())["error"]  # export's measure against refimpl
    assert error["bound"] == contract.ERROR_BOUNDS["fp16"] and error["max"] <= error["bound"]
    assert f"{chains['fp16'][0]}: logits vs refimpl" in error["per_output"]
    real = auto_variant
    monkeypatch.setattr(generator_module, "auto_variant", lambda cfg, on_cuda, dtype: real(cfg, True, dtype))
    capsys.readouterr()
    for dtype in contract.DTYPES:
        assert Generator(folder, provider="cpu", dtype=dtype).variant == chains[dtype][0]
    assert "cannot run here" not in capsys.readouterr().err


@pytest.mark.skipif(not cuda_usable(), reason="ONNX Runtime's CUDA provider cannot be loaded here")
@pytest.mark.parametrize("family", ["llama-16", "qwen2-16", "t5", "marian"])
def test_on_cuda_auto_and_each_variant_give_transformers_ids(imported, family, capsys):
    """The same paths on a GPU (the H200 session: `python -m pytest -q tests/runtime/test_cuda_paths_on_cpu.py`):
    auto in fp16 and fp32 (probe, CUDA graphs, fallback notices printed for the log), then every variant of the chain,
    greedy and beams on ragged prompts, against transformers' fp32 ids (fp16 too: these tiny models' margins are
    wide; on the CPU fp16 gives the same ids)."""
    model, folder = imported(family)
    for dtype in contract.DTYPES:
        chosen = Generator(folder, provider="cuda", dtype=dtype)
        err = capsys.readouterr().err
        print(f"{family} {dtype}: auto -> {chosen.variant}; {err.strip() or 'no notice'}")
        cfg = chosen.cfg
        for variant in auto_variant(cfg, True, dtype):
            generator = chosen if variant == chosen.variant else Generator(folder, provider="cuda", dtype=dtype,
                                                                            variant=variant)
            assert generator.stepper.provider == contract.CUDA_PROVIDER and not getattr(generator.stepper,
                                                                                      "host_cache", False)
            for name in SEARCHES:
                for rows in ROWS:
                    assert search(generator, rows, name) == expected(model, generator, rows, name), (dtype, variant,
                                                                                                     name, rows)
