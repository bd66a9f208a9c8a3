"""Exports never destroy what the user had, survive kills, keep one folder per export set, refuse what they cannot
export faithfully, and fail in one line: issue 11's kinds for export, verify, golden, convert-torch and the
model folder's save."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import refformer.export.export as export_module
import refformer.export.folder as folder_module
import refformer.export.session as session_module
import refformer.refimpl.io as io_module
from refformer.export.export import export_model
from refformer.export.folder import (
    default_export_dir,
    export_name,
    find_export,
    read_manifest,
    recover_leftovers,
    replace_folder,
)
from refformer.export.session import resolve_provider
from refformer.export.verify import verify
from refformer.refimpl import RefformerError, init_params, load, save
from refformer.refimpl.io import HOST, SAVE_JOURNAL
from refformer.runtime.cli import main
from refformer.runtime.generator import default_model_dir, ensure_export

from .test_export import make_model


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, message, code=1):
    """Exit code (1; 2 for click's usage errors), a single `error:` line holding message, no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


def dead_pid():
    """The id of a process that has just ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- 1. --out never destroys


def test_out_refuses_a_folder_that_is_not_an_export(tmp_path):
    make_model(tmp_path / "m")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own work")
    one_line_error(invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "mine"), "is not a refformer export")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my own work"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("out", ["{m}", "{m}/.", "{tmp}", "{m}/.."])
def test_out_refuses_the_model_folder_and_its_parents(tmp_path, out):
    make_model(tmp_path / "m")
    before = snapshot(tmp_path / "m")
    result = invoke("export", "--model", tmp_path / "m", "--out", out.format(m=tmp_path / "m", tmp=tmp_path))
    one_line_error(result, "is the model folder or holds it")
    assert snapshot(tmp_path / "m") == before


def test_out_refuses_a_file_a_symlink_and_an_export_with_user_files(tmp_path):
    make_model(tmp_path / "m")
    (tmp_path / "file").write_text("x")
    one_line_error(invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "file"), "is a file", code=2)
    assert (tmp_path / "file").read_text() == "x"
    assert invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "e").exit_code == 0
    (tmp_path / "link").symlink_to(tmp_path / "e")
    one_line_error(invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "link"), "symbolic link")
    (tmp_path / "e" / "results.csv").write_text("mine")
    one_line_error(invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "e"), "not a refformer export")
    assert (tmp_path / "e" / "results.csv").read_text() == "mine"


def test_out_replaces_an_export_and_fills_an_empty_folder(tmp_path):
    make_model(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    assert invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "empty").exit_code == 0
    make_model(tmp_path / "m", seed=1)
    result = invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "empty", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "empty")["dtype"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m"]  # nothing left beside it


def test_out_refuses_the_folder_of_all_export_sets(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    before = snapshot(tmp_path / "m")
    one_line_error(invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "m" / "onnx"),
                   "not a refformer export")
    assert snapshot(tmp_path / "m") == before


# ---------------------------------------------------------------------------- 2. leftovers of killed exports


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    make_model(tmp_path / "m")
    parent = tmp_path / "m" / "onnx"
    dead, live = f".fp32.tmp-{dead_pid()}@{HOST}-abc", f".fp32.tmp-{os.getpid()}@{HOST}-def"
    other_host, user = f".fp32.tmp-{dead_pid()}@elsewhere-ghi", ".my.tmp-folder"
    for name in (dead, live, other_host, user, f".fp16.old-{dead_pid()}@{HOST}-jkl"):
        (parent / name).mkdir(parents=True)
        (parent / name / "decoder.onnx").write_bytes(b"x" * 1000)
    export_model(tmp_path / "m", measure=False)
    names = sorted(p.name for p in parent.iterdir())
    assert names == sorted([live, other_host, user, "fp32", "fp16"])  # the dead .old- went back in place of fp16
    shutil.rmtree(parent / "fp16")
    (parent / dead).mkdir()
    ensure_export(tmp_path / "m")  # generate's path cleans up too (nothing to export: fp32 is fresh)
    assert not (parent / dead).exists() and (parent / live).exists()


def test_a_planted_link_named_like_a_leftover_is_left_alone(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data").write_text("keep")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / f".fp32.old-{dead_pid()}@{HOST}-x").symlink_to(tmp_path / "precious")
    (tmp_path / "onnx" / f".fp16.tmp-{dead_pid()}@{HOST}-x").symlink_to(tmp_path / "precious")
    recover_leftovers(tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "fp32").exists() and (tmp_path / "precious" / "data").read_text() == "keep"


def test_leftovers_of_the_old_layout_go_after_an_hour(tmp_path):
    make_model(tmp_path / "m")
    for name in (".onnx.tmp-ab12cd34", ".onnx-fp16.tmp-x_y_z_w0", ".onnx.old-123", ".onnx.tmp-fresh123"):
        (tmp_path / "m" / name).mkdir()
        (tmp_path / "m" / name / "decoder.onnx").write_bytes(b"x")
        if name != ".onnx.tmp-fresh123":
            os.utime(tmp_path / "m" / name, (0, 0))
    ensure_export(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [".onnx.tmp-fresh123", "config.json",
                                                                  "model.safetensors", "onnx"]


def test_an_export_identical_to_the_existing_one_keeps_the_folder(tmp_path):
    """Concurrent first runs export the same graphs: the later ones keep the first one's folder (no swap under a
    process that has just opened it)."""
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    inode = (tmp_path / "m" / "onnx" / "fp32").stat().st_ino
    export_model(tmp_path / "m", measure=False)
    assert (tmp_path / "m" / "onnx" / "fp32").stat().st_ino == inode
    export_model(tmp_path / "m", measure=False, opset=18)
    assert read_manifest(tmp_path / "m" / "onnx" / "fp32")["opset"] == 18
    # a config change that leaves the graphs alike (dropout) still gets a manifest with the new hashes
    cfg, params = load(tmp_path / "m")
    save(tmp_path / "m", cfg.replace(dropout=0.3), params)
    export_model(tmp_path / "m", measure=False, opset=18)
    assert not folder_module.is_stale(tmp_path / "m", read_manifest(tmp_path / "m" / "onnx" / "fp32"))


def test_concurrent_swaps_into_one_target_all_succeed(tmp_path):
    """Eight first runs at once: every swap is whole, none fails, nothing is left beside the target."""
    errors = []

    def swap(number):
        new = tmp_path / f".t.tmp-{os.getpid()}@{HOST}-{number}"
        new.mkdir()
        for name in ("encoder.onnx", "decoder.onnx", "manifest.json"):
            (new / name).write_text(str(number))
        try:
            replace_folder(new, tmp_path / "t")
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=swap, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    contents = {p.read_text() for p in (tmp_path / "t").iterdir()}
    assert len(contents) == 1 and len(list((tmp_path / "t").iterdir())) == 3  # one export's files, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


# ---------------------------------------------------------------------------- 3. a crash between the renames


def crash_after(monkeypatch, n):
    """os.replace works n times, then every call fails (the process 'died': even its clean-up cannot rename)."""
    real, calls = os.replace, []

    def replace(src, dst, **kwargs):
        calls.append(src)
        if len(calls) > n:
            raise OSError(5, "simulated crash")
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("n", [0, 1])
def test_an_export_killed_between_its_renames_is_rolled_back(tmp_path, monkeypatch, n):
    """Renames: (0) the old export aside, (1) the new one in. A crash after the first leaves no export folder: the
    next start puts the old one back."""
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    target = tmp_path / "m" / "onnx" / "fp32"
    before = snapshot(target)
    with monkeypatch.context() as patch:
        crash_after(patch, n)
        with pytest.raises(OSError, match="simulated crash"):
            export_model(tmp_path / "m", measure=False, opset=18)  # other graphs: the folder is swapped
    monkeypatch.setattr(folder_module, "process_alive", lambda pid: False)  # as if this process had died
    recover_leftovers(target.parent)
    assert snapshot(target) == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["fp32"]
    assert ensure_export(tmp_path / "m") == target and snapshot(target) == before  # fresh: not exported again


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_a_save_killed_between_its_renames_is_finished_or_never_happened(tmp_path, monkeypatch, n):
    """save's renames: (0) the journal, (1) weights, (2) config, (3) tokenizer. Killed before the journal: the old
    model stands; after it: the next load finishes the save. Never weights of one config beside another config."""
    from tests.helpers import write_word_level_tokenizer

    old_cfg = make_model(tmp_path / "m", d_ff=24)
    tokenizer = write_word_level_tokenizer(tmp_path / "tokenizer.json", 40)
    new_cfg = (old_cfg.replace(d_ff=32) if hasattr(old_cfg, "replace")
               else type(old_cfg)(**{**vars(old_cfg), "d_ff": 32}))
    with monkeypatch.context() as patch:
        crash_after(patch, n)
        with pytest.raises(OSError, match="simulated crash"):
            save(tmp_path / "m", new_cfg, init_params(new_cfg, np.random.default_rng(1)), tokenizer=tokenizer)
    cfg, _ = load(tmp_path / "m")  # recovers first
    assert cfg.d_ff == (24 if n == 0 else 32)
    assert (tmp_path / "m" / "tokenizer.json").exists() == (n > 0)
    assert not (tmp_path / "m" / SAVE_JOURNAL).exists()
    monkeypatch.setattr(io_module, "process_alive", lambda pid: False)
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(2)))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == (
        ["config.json", "model.safetensors"] + (["tokenizer.json"] if n > 0 else []))  # no temporary file left


def test_a_forged_save_journal_renames_nothing(tmp_path):
    make_model(tmp_path / "m")
    (tmp_path / "secret").write_text("keep")
    (tmp_path / "m" / SAVE_JOURNAL).write_text(json.dumps({"renames": [["../secret", "config.json"]]}))
    with pytest.raises(RefformerError, match="not a journal"):
        load(tmp_path / "m")
    assert (tmp_path / "secret").read_text() == "keep"


# ---------------------------------------------------------------------------- 4. non-finite weights


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_not_exported_or_verified(tmp_path, bad):
    cfg = make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    cfg, params = load(tmp_path / "m")
    params["decoder"]["layers"][1]["ffn"]["fc1"]["weight"][0, 3] = bad
    save(tmp_path / "m", cfg, params)
    before = snapshot(tmp_path / "m" / "onnx")
    one_line_error(invoke("export", "--model", tmp_path / "m"),
                   "decoder.layers.1.ffn.fc1.weight has 1 non-finite value")
    assert snapshot(tmp_path / "m" / "onnx") == before
    with pytest.raises(RefformerError, match="decoder.layers.1.ffn.fc1.weight has 1 non-finite"):
        verify(tmp_path / "m", tmp_path / "m" / "onnx" / "fp32")


def test_golden_refuses_non_finite_weights(tmp_path):
    cfg = make_model(tmp_path / "m")
    cfg, params = load(tmp_path / "m")
    params["encoder"]["layers"][0]["ffn"]["fc2"]["bias"][0] = np.nan
    save(tmp_path / "m", cfg, params)
    one_line_error(invoke("golden", "--model", tmp_path / "m", "--out", tmp_path / "g.npz"), "non-finite")
    assert not (tmp_path / "g.npz").exists()


def test_weights_beyond_float16_are_not_exported_in_fp16(tmp_path):
    cfg = make_model(tmp_path / "m")
    cfg, params = load(tmp_path / "m")
    params["decoder"]["layers"][0]["ffn"]["fc2"]["bias"][1] = 1e5
    save(tmp_path / "m", cfg, params)
    one_line_error(invoke("export", "--model", tmp_path / "m", "--dtype", "fp16"), "beyond float16's range")
    assert invoke("export", "--model", tmp_path / "m").exit_code == 0  # fp32 holds it


# ---------------------------------------------------------------------------- 5. one layout


def test_each_dtype_and_variant_set_has_its_own_folder(tmp_path):
    make_model(tmp_path / "m")
    for args in ([], ["--dtype", "fp16"], ["--static-length", "8"], ["--static-length", "16", "--fused-attention"]):
        result = invoke("export", "--model", tmp_path / "m", *args)
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "m" / "onnx").iterdir())
    assert names == ["fp16", "fp32", "fp32-static16-fused", "fp32-static8"]
    assert read_manifest(tmp_path / "m" / "onnx" / "fp16")["dtype"] == "fp16"
    assert export_name("fp16", 128, True) == "fp16-static128-fused"
    # generate finds each, exports nothing (the reference decoder is in fp32; fp32-static16-fused serves fused too)
    times = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (tmp_path / "m" / "onnx").iterdir()}
    assert ensure_export(tmp_path / "m", "fp16") == tmp_path / "m" / "onnx" / "fp16"
    assert ensure_export(tmp_path / "m", "fp32", 8) == tmp_path / "m" / "onnx" / "fp32-static8"
    assert (ensure_export(tmp_path / "m", "fp32", fused_attention=True)
            == tmp_path / "m" / "onnx" / "fp32-static16-fused")
    assert times == {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (tmp_path / "m" / "onnx").iterdir()}
    # a generate wanting another static length adds its own set
    ensure_export(tmp_path / "m", "fp32", 12)
    assert (tmp_path / "m" / "onnx" / "fp32-static12").is_dir()
    assert times == {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (tmp_path / "m" / "onnx").iterdir()
                     if p.name != "fp32-static12"}


def test_verify_finds_the_export_set_named_by_its_options(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", dtype="fp16", measure=False)
    result = invoke("verify", "--model", tmp_path / "m", "--provider", "cpu")  # the only set
    assert result.exit_code == 0 and "onnx/fp16 on CPUExecutionProvider" in result.output.splitlines()[0], result.output
    export_model(tmp_path / "m", dtype="fp16", static_length=8, measure=False)
    one_line_error(invoke("verify", "--model", tmp_path / "m"), "found fp16, fp16-static8")
    result = invoke("verify", "--model", tmp_path / "m", "--dtype", "fp16", "--static-length", "8", "--provider", "cpu")
    assert result.exit_code == 0 and "static" in result.output, result.output
    assert find_export(tmp_path / "m", "fp16") == tmp_path / "m" / "onnx" / "fp16"
    one_line_error(invoke("verify", "--model", tmp_path / "m", "--onnx-dir", tmp_path / "m" / "onnx" / "fp16",
                          "--dtype", "fp16"), "--onnx-dir names the export folder")


def test_a_stale_export_is_exported_again_in_place(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    make_model(tmp_path / "m", seed=3)
    assert ensure_export(tmp_path / "m") == tmp_path / "m" / "onnx" / "fp32"
    verify(tmp_path / "m", tmp_path / "m" / "onnx" / "fp32", ["CPUExecutionProvider"])  # fresh again
    assert sorted(p.name for p in (tmp_path / "m" / "onnx").iterdir()) == ["fp32"]


# ---------------------------------------------------------------------------- 6. the bundled model's export


def test_the_bundled_model_exports_into_the_user_cache(tmp_path, user_cache, monkeypatch):
    bundled = default_model_dir()
    target = default_export_dir(bundled, "fp16", 128, True)
    assert str(target).startswith(str(user_cache / "refformer")) and target.name == "fp16-static128-fused"
    written = []
    monkeypatch.setattr(export_module, "export_model", lambda model_dir, out_dir, **options: written.append(out_dir))
    before = sorted(p.name for p in bundled.iterdir())
    ensure_export(bundled, "fp32")
    assert written and str(written[0]).startswith(str(user_cache))
    assert sorted(p.name for p in bundled.iterdir()) == before  # nothing written into the package


def test_a_read_only_model_exports_into_the_user_cache(tmp_path, user_cache, monkeypatch):
    make_model(tmp_path / "m")
    monkeypatch.setattr(folder_module, "writable", lambda model_dir: False)
    assert invoke("export", "--model", tmp_path / "m").exit_code == 0
    assert not (tmp_path / "m" / "onnx").exists()
    found = find_export(tmp_path / "m")
    assert found.parent.parent == user_cache / "refformer" and found.name == "fp32"


# ---------------------------------------------------------------------------- 7. graphs of another model


def test_graphs_of_another_model_are_detected(tmp_path):
    make_model(tmp_path / "a")
    make_model(tmp_path / "b", n_decoder_layers=3, seed=1)
    export_model(tmp_path / "a", measure=False)
    export_model(tmp_path / "b", measure=False)
    a_dir, b_dir = tmp_path / "a" / "onnx" / "fp32", tmp_path / "b" / "onnx" / "fp32"
    shutil.copy(b_dir / "decoder.onnx", a_dir / "decoder.onnx")
    one_line_error(invoke("verify", "--model", tmp_path / "a"),
                   "decoder.onnx is not the file its manifest.json records")
    assert ensure_export(tmp_path / "a") == a_dir  # generate's own export: made again
    verify(tmp_path / "a", a_dir, ["CPUExecutionProvider"])
    # a manifest forged to match the foreign graphs: ONNX Runtime's failure is one line too
    shutil.copy(b_dir / "decoder.onnx", a_dir / "decoder.onnx")
    manifest = json.loads((a_dir / "manifest.json").read_text())
    manifest["files"]["decoder.onnx"] = json.loads((b_dir / "manifest.json").read_text())["files"]["decoder.onnx"]
    (a_dir / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("verify", "--model", tmp_path / "a", "--provider", "cpu")
    assert result.exit_code == 1 and "run `refformer export` again" in result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == result.output.splitlines()[-1:]


@pytest.mark.parametrize("files", [None, [], {"../../etc/passwd": "0" * 64}, {"decoder.onnx": 5}, "x"])
def test_a_manifest_with_a_bad_file_list_is_one_line(tmp_path, files):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    path = tmp_path / "m" / "onnx" / "fp32" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "files": files}))
    one_line_error(invoke("verify", "--model", tmp_path / "m"), "run `refformer export` again")
    assert ensure_export(tmp_path / "m") == path.parent  # generate's own export: made again
    assert read_manifest(path.parent)["files"]["decoder.onnx"]


def test_a_manifest_of_an_older_format_says_to_export_again(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    path = tmp_path / "m" / "onnx" / "fp32" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 1}))
    one_line_error(invoke("verify", "--model", tmp_path / "m"), "run `refformer export` again")


# ---------------------------------------------------------------------------- 8. the CUDA notice


@pytest.mark.parametrize("gpu", [False, True])
def test_the_cuda_notice_only_where_a_gpu_is_present(monkeypatch, capsys, gpu):
    monkeypatch.setattr(session_module, "cuda_usable", lambda: False)
    monkeypatch.setattr(session_module, "gpu_present", lambda: gpu)
    assert resolve_provider("auto") == "CPUExecutionProvider"
    assert ("notice:" in capsys.readouterr().err) == gpu
    with pytest.raises(RefformerError, match="--provider cpu"):
        resolve_provider("cuda")


# ---------------------------------------------------------------------------- 9. numeric extremes, --overwrite


@pytest.mark.parametrize("args, message", [
    (["export", "--opset", "-1"], "--opset must be between"),
    (["export", "--opset", str(10**20)], "--opset must be between"),
    (["export", "--static-length", "0"], "--static-length must be"),
    (["export", "--static-length", "-7"], "--static-length must be"),
    (["export", "--static-length", str(10**20)], "--static-length must be between 1 and max_positions"),
    (["verify", "--seed", "-1"], "--seed must be >= 0"),
    (["golden", "--seed", "-3", "--out", "{tmp}/g.npz"], "--seed must be >= 0"),
    (["convert-torch", "{tmp}/x.pt", "--tokenizer", "{tmp}/t.json", "--out", "{tmp}/c", "--n-heads", "0"], "--n-heads"),
    (["convert-torch", "{tmp}/x.pt", "--tokenizer", "{tmp}/t.json", "--out", "{tmp}/c", "--n-heads", "-4"],
     "--n-heads"),
    (["convert-torch", "{tmp}/x.pt", "--tokenizer", "{tmp}/t.json", "--out", "{tmp}/c", "--n-heads", "2",
      "--pad-id", "-1"], "--pad-id"),
    (["convert-torch", "{tmp}/x.pt", "--tokenizer", "{tmp}/t.json", "--out", "{tmp}/c", "--n-heads", "2",
      "--eos-id", str(10**15)], "--eos-id"),
    (["convert-torch", "{tmp}/x.pt", "--tokenizer", "{tmp}/t.json", "--out", "{tmp}/c", "--n-heads", "2",
      "--max-positions", "0"], "--max-positions"),
])
def test_numeric_extremes_are_one_line(tmp_path, args, message):
    make_model(tmp_path / "m")
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] != "convert-torch":
        args += ["--model", str(tmp_path / "m")]
    one_line_error(invoke(*args), message)
    assert not (tmp_path / "c").exists() and not (tmp_path / "g.npz").exists()


def test_a_huge_seed_works(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    result = invoke("verify", "--model", tmp_path / "m", "--provider", "cpu", "--seed", str(2**70))
    assert result.exit_code == 0, result.output


def test_golden_and_convert_torch_keep_existing_files_unless_overwrite(tmp_path):
    make_model(tmp_path / "m")
    (tmp_path / "g.npz").write_bytes(b"mine")
    one_line_error(invoke("golden", "--model", tmp_path / "m", "--out", tmp_path / "g.npz"), "pass --overwrite")
    assert (tmp_path / "g.npz").read_bytes() == b"mine"
    one_line_error(invoke("golden", "--model", tmp_path / "m", "--out", tmp_path / "m" / "config.json", "--overwrite"),
                   "one of the command's inputs")
    result = invoke("golden", "--model", tmp_path / "m", "--out", tmp_path / "g.npz", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g.npz").read_bytes()[:2] == b"PK"
    before = snapshot(tmp_path / "m")
    one_line_error(invoke("convert-torch", tmp_path / "x.pt", "--tokenizer", tmp_path / "t.json",
                          "--out", tmp_path / "m", "--n-heads", "2"), "pass --overwrite")
    assert snapshot(tmp_path / "m") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    one_line_error(invoke("convert-torch", tmp_path / "x.pt", "--tokenizer", tmp_path / "t.json", "--out",
                          tmp_path / "mine", "--n-heads", "2"), "exists and is not empty; pass --overwrite")


def test_convert_torch_never_writes_a_folder_that_cannot_load(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.helpers import randomize_torch, write_word_level_tokenizer
    from tests.refimpl.test_torch_convert import Seq2SeqTransformer

    model = randomize_torch(Seq2SeqTransformer(12, 8, 2, 16, 1, 1, maxlen=32), np.random.default_rng(4))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    write_word_level_tokenizer(tmp_path / "t.json", 12)
    for extra in (["--max-positions", str(10**12)], ["--n-heads", "3"], ["--bos-id", "500"]):
        result = invoke("convert-torch", tmp_path / "model.pt", "--tokenizer", tmp_path / "t.json",
                        "--out", tmp_path / "c", "--n-heads", "2", *extra)
        assert result.exit_code != 0 and "Traceback" not in result.output, (extra, result.output)
        assert not (tmp_path / "c" / "config.json").exists(), extra


# ---------------------------------------------------------------------------- the hostile tester's cases


@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_default_export_place_taken_by_a_file_or_link_is_named_without_out(tmp_path, command):
    from tests.helpers import write_word_level_tokenizer

    make_model(tmp_path / "m")
    write_word_level_tokenizer(tmp_path / "m" / "tokenizer.json", 40)
    (tmp_path / "m" / "onnx").mkdir()
    (tmp_path / "m" / "onnx" / "fp32").write_text("mine")
    args = ["--model", tmp_path / "m"] + (["x", "--provider", "cpu"] if command == "generate" else [])
    result = invoke(command, *args)
    assert result.exit_code == 1 and "--out" not in result.stderr.splitlines()[-1]
    assert result.stderr.splitlines()[-1] == f"error: the export folder {tmp_path}/m/onnx/fp32 exists and is not a " \
                                             "folder; remove it"
    (tmp_path / "m" / "onnx" / "fp32").unlink()
    (tmp_path / "m" / "onnx").rmdir()
    (tmp_path / "m" / "onnx").write_text("mine")
    one_line_error(invoke("export", "--model", tmp_path / "m"), f"{tmp_path}/m/onnx is a file, where the exports' "
                                                                 "folder belongs: remove it")
    assert (tmp_path / "m" / "onnx").read_text() == "mine"


def test_verify_names_graphs_of_another_shape(tmp_path):
    make_model(tmp_path / "a")
    make_model(tmp_path / "b", d_model=32, seed=1)
    export_model(tmp_path / "a", measure=False)
    export_model(tmp_path / "b", measure=False)
    a_dir, b_dir = tmp_path / "a" / "onnx" / "fp32", tmp_path / "b" / "onnx" / "fp32"
    manifest = json.loads((a_dir / "manifest.json").read_text())
    for name in ("encoder.onnx", "decoder.onnx"):  # the graphs of b, under a's manifest forged to match them
        shutil.copy(b_dir / name, a_dir / name)
        manifest["files"][name] = json.loads((b_dir / "manifest.json").read_text())["files"][name]
    (a_dir / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("verify", "--model", tmp_path / "a", "--provider", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"error: the graphs in {a_dir} give outputs of another shape than "
                                                  "the model's ((3, 6, 32) vs (3, 6, 16)); they belong to another "
                                                  "model: run `refformer export` again"]


def test_golden_takes_a_huge_seed_and_refuses_the_export_folder(tmp_path):
    make_model(tmp_path / "m")
    result = invoke("golden", "--model", tmp_path / "m", "--out", tmp_path / "g.npz", "--seed", str(2**90))
    assert result.exit_code == 0, result.output
    export_model(tmp_path / "m", measure=False)
    before = snapshot(tmp_path / "m")
    one_line_error(invoke("golden", "--model", tmp_path / "m",
                          "--out", tmp_path / "m" / "onnx" / "fp32" / "manifest.json", "--overwrite"),
                   "is in the model's export folder")
    assert snapshot(tmp_path / "m") == before


def test_convert_torch_names_a_device_and_cuts_torchs_advice(tmp_path):
    pytest.importorskip("torch")
    from tests.helpers import write_word_level_tokenizer

    write_word_level_tokenizer(tmp_path / "t.json", 12)
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    one_line_error(invoke("convert-torch", "/dev/zero", "--tokenizer", tmp_path / "t.json", "--out", tmp_path / "c",
                          "--n-heads", "2"), "/dev/zero is not a file")
    result = invoke("convert-torch", tmp_path / "garbage.pt", "--tokenizer", tmp_path / "t.json",
                    "--out", tmp_path / "c", "--n-heads", "2")
    one_line_error(result, "is not a state_dict of tensors")
    assert "trusted source" not in result.stderr and not (tmp_path / "c").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_golden_never_replaces_a_device_or_a_pipe(tmp_path):
    """As root, `golden --out /dev/null --overwrite` renamed a regular file over /dev/null (here: a node of our own)."""
    make_model(tmp_path / "m")
    device, pipe = tmp_path / "null", tmp_path / "pipe"
    os.mknod(device, 0o644 | 0o020000, os.makedev(1, 3))  # S_IFCHR: the same device as /dev/null
    os.mkfifo(pipe)
    for target in (device, pipe):
        one_line_error(invoke("golden", "--model", tmp_path / "m", "--out", target, "--overwrite"),
                       "is not a regular file")
    with pytest.raises(RefformerError, match="is not a regular file"):
        io_module.atomic_write(device, lambda tmp: None)
    assert device.is_char_device() and pipe.is_fifo()


def test_golden_writes_through_a_symbolic_link_and_keeps_permissions(tmp_path):
    make_model(tmp_path / "m")
    target = tmp_path / "golden.npz"
    target.write_bytes(b"old")
    target.chmod(0o600)
    (tmp_path / "link.npz").symlink_to(target.name)
    result = invoke("golden", "--model", tmp_path / "m", "--out", tmp_path / "link.npz", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link.npz").is_symlink() and target.read_bytes()[:2] == b"PK"
    assert target.stat().st_mode & 0o777 == 0o600


def test_golden_refuses_the_models_cache_exports(tmp_path):
    from refformer.export.folder import export_locations

    make_model(tmp_path / "m")
    cached = export_locations(tmp_path / "m", "fp32")[1]
    cached.mkdir(parents=True)
    one_line_error(invoke("golden", "--model", tmp_path / "m", "--out", cached / "g.npz"), "is in the model's export "
                                                                                           "folder")
    assert not (cached / "g.npz").exists()


@pytest.mark.parametrize("args, message", [
    (dict(model_dir=None), "model_dir must be a folder path"),
    (dict(model_dir=b"m"), "model_dir must be a folder path"),
    (dict(out_dir=5), "out_dir must be a folder path"),
    (dict(fused_attention="no"), "fused_attention must be True or False"),
    (dict(external_data="yes"), "external_data must be True or False (or None)"),
    (dict(measure=None), "measure must be True or False"),
])
def test_export_model_refuses_arguments_of_the_wrong_kind(tmp_path, args, message):
    make_model(tmp_path / "m")
    with pytest.raises(RefformerError, match=re.escape(message)):
        export_model(**{"model_dir": tmp_path / "m", "out_dir": tmp_path / "out", **args})
    assert not (tmp_path / "out").exists() and not (tmp_path / "m" / "onnx").exists()


def test_export_model_takes_a_numpy_static_length(tmp_path):
    make_model(tmp_path / "m")
    manifest = export_model(tmp_path / "m", static_length=np.int64(4), measure=False)
    assert manifest["graphs"]["decoder_static"]["max_length"] == 4


@pytest.mark.parametrize("args, message", [
    (dict(providers="CPUExecutionProvider"), "providers must be a non-empty list"),
    (dict(providers=[]), "providers must be a non-empty list"),
    (dict(providers=["Foo"]), "providers must be a non-empty list"),
    (dict(onnx_dir=5), "onnx_dir must be a folder path"),
    (dict(model_dir=None), "model_dir must be a folder path"),
])
def test_verify_refuses_arguments_of_the_wrong_kind(tmp_path, capfd, args, message):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", measure=False)
    with pytest.raises(RefformerError, match=re.escape(message)):
        verify(**{"model_dir": tmp_path / "m", **args})
    assert "EP Error" not in capfd.readouterr().out  # ONNX Runtime's own banner never shows


@pytest.mark.parametrize("command, flag", [("export", "--out"), ("verify", "--onnx-dir")])
def test_an_empty_folder_option_is_one_line(tmp_path, command, flag):
    make_model(tmp_path / "m")
    one_line_error(invoke(command, "--model", tmp_path / "m", flag, ""), "'' is an empty path", code=2)


def test_convert_torch_never_writes_into_the_package(tmp_path):
    pytest.importorskip("torch")
    bundled = default_model_dir()
    before = snapshot(bundled)
    one_line_error(invoke("convert-torch", tmp_path / "x.pt", "--tokenizer", tmp_path / "t.json", "--out", bundled,
                          "--n-heads", "2", "--overwrite"), "inside refformer's own package folder")
    assert snapshot(bundled) == before


def test_export_never_writes_into_the_package(tmp_path):
    bundled = default_model_dir()
    make_model(tmp_path / "m")
    for model, out in ((bundled, bundled / "onnx" / "fp32"), (tmp_path / "m", bundled.parent.parent / "x")):
        one_line_error(invoke("export", "--model", model, "--out", out), "inside refformer's own package folder")
        assert not out.exists()


@pytest.mark.parametrize("kind, message", [("sparse", "is a torch.sparse_coo tensor"),
                                           ("quantized", "is a quantized tensor"),
                                           ("uint16", "has dtype uint16, expected floating point")])
def test_convert_torch_refuses_tensors_it_cannot_read_in_one_line(tmp_path, kind, message):
    torch = pytest.importorskip("torch")
    import warnings

    from tests.helpers import randomize_torch, write_word_level_tokenizer
    from tests.refimpl.test_torch_convert import Seq2SeqTransformer

    state = randomize_torch(Seq2SeqTransformer(12, 8, 2, 16, 1, 1, maxlen=32), np.random.default_rng(4)).state_dict()
    key = next(k for k in state if k.endswith("in_proj_weight"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state[key] = {"sparse": lambda t: t.to_sparse(), "uint16": lambda t: t.to(torch.uint16),
                      "quantized": lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)}[kind](state[key])
    torch.save(state, tmp_path / "model.pt")
    write_word_level_tokenizer(tmp_path / "t.json", 12)
    one_line_error(invoke("convert-torch", tmp_path / "model.pt", "--tokenizer", tmp_path / "t.json", "--out",
                          tmp_path / "c", "--n-heads", "2"), message)
    assert not (tmp_path / "c").exists()


def test_leftovers_under_another_host_name_go_after_a_day(tmp_path):
    """A container gets a new host name at every start: its killed exports' folders in a shared cache would stay
    forever. Another host's leftovers are removed once a day old; a fresh one (maybe running) is kept."""
    make_model(tmp_path / "m")
    parent = tmp_path / "m" / "onnx"
    old, fresh = parent / f".fp32.tmp-{dead_pid()}@oldname-abc", parent / f".fp32.tmp-{dead_pid()}@othername-def"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
    day_ago = os.path.getmtime(old) - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    recover_leftovers(parent)
    assert not old.exists() and fresh.exists()


def test_save_temporaries_under_another_host_name_go_after_a_day(tmp_path):
    make_model(tmp_path / "m")
    old = tmp_path / "m" / f".model.safetensors.{dead_pid()}@oldname.abc.tmp"
    fresh = tmp_path / "m" / f".model.safetensors.{dead_pid()}@othername.def.tmp"
    for path in (old, fresh):
        path.write_bytes(b"x")
    day_ago = os.path.getmtime(old) - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    make_model(tmp_path / "m")  # the next save cleans up first
    assert not old.exists() and fresh.exists()


def test_atomic_write_removes_what_a_killed_write_of_the_same_file_left(tmp_path):
    dead = tmp_path / f".golden.npz.{dead_pid()}@{HOST}.abc.tmp"
    live = tmp_path / f".golden.npz.{os.getpid()}@{HOST}.def.tmp"
    other = tmp_path / f".other.npz.{dead_pid()}@{HOST}.ghi.tmp"
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    io_module.atomic_write(tmp_path / "golden.npz", lambda tmp: open(tmp, "wb").write(b"new"))
    assert (tmp_path / "golden.npz").read_bytes() == b"new"
    assert not dead.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["golden.npz", live.name, other.name])


@pytest.mark.parametrize("max_positions", [2, 3])
def test_a_model_of_two_or_three_positions_exports_and_verifies_every_variant(tmp_path, max_positions):
    """export --static-length 2 --fused-attention was an ONNX Runtime traceback (the checks' prompts and steps ran
    past max_positions), verify failed on its own inputs, and an all-padding source row failed the fused check."""
    make_model(tmp_path / "m", max_positions=max_positions, d_model=8, n_heads=2)
    args = ["--model", tmp_path / "m", "--static-length", max_positions, "--fused-attention"]
    result = invoke("export", *args)
    assert result.exit_code == 0, result.output
    result = invoke("verify", *args, "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert "static " in result.output and "fused " in result.output  # the variants were checked, not skipped


def test_export_refuses_graphs_beyond_the_error_bound(tmp_path, monkeypatch):
    make_model(tmp_path / "m")
    monkeypatch.setattr(export_module, "export_checks", lambda *args, **kwargs: [
        {"check": "random", "provider": "CPUExecutionProvider", "output": "logits (step)", "error": 0.37}])
    one_line_error(invoke("export", "--model", tmp_path / "m"),
                   "differ from refimpl by 3.70e-01 (random: logits (step)), beyond the fp32 bound 1e-05; nothing "
                   "was written")
    assert not (tmp_path / "m" / "onnx" / "fp32").exists()


def test_an_opset_onnx_runtime_cannot_load_is_named(tmp_path):
    import onnxruntime

    make_model(tmp_path / "m")
    export_model(tmp_path / "m", tmp_path / "out", opset=17)
    opset = onnx.defs.onnx_opset_version()  # onnx's newest: ahead of ONNX Runtime 1.31 (which loads up to 26)
    try:
        export_model(tmp_path / "m", tmp_path / "out", opset=opset)
    except RefformerError as error:
        assert str(error) == (f"ONNX Runtime {onnxruntime.__version__} cannot load opset {opset} graphs; pass a "
                              "lower --opset (17 loads everywhere); nothing was written")
        assert read_manifest(tmp_path / "out")["opset"] == 17  # the last good export stays
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]  # no temporary folder left
    else:
        pytest.skip("this ONNX Runtime loads every opset onnx writes")


# ---------------------------------------------------------------------------- the per-user cache's environment


def test_a_relative_or_unusable_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG specification: relative paths are ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert folder_module.cache_root() == tmp_path / "home" / ".cache" / "refformer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "")  # no home folder: a folder of this user's in the temporary folder, never
    # relative to the current folder
    assert folder_module.cache_root().is_absolute()


def test_onnxruntime_prints_nothing_when_the_cache_variable_is_a_file(tmp_path):
    """ONNX Runtime 1.31 prints a colored telemetry warning on import when it cannot write under XDG_CACHE_HOME."""
    make_model(tmp_path / "m")
    (tmp_path / "file").write_text("")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "file")}
    code = "from refformer.runtime.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "export", "--model", str(tmp_path / "m")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_symbolic_link_loop_where_the_export_goes_is_one_line(tmp_path):
    make_model(tmp_path / "m")
    os.symlink("onnx", tmp_path / "m" / "onnx")  # onnx -> onnx
    result = invoke("export", "--model", str(tmp_path / "m"))
    one_line_error(result, "loop of symbolic links; remove the link")


def test_a_numpy_integer_opset_is_taken(tmp_path):
    make_model(tmp_path / "m")
    assert export_model(tmp_path / "m", tmp_path / "out", opset=np.int64(17))["opset"] == 17
    with pytest.raises(RefformerError, match=r"\(an integer\), got 17.0"):
        export_model(tmp_path / "m", tmp_path / "out2", opset=17.0)


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    make_model(tmp_path / "m")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "save_graph", full)
    result = invoke("export", "--model", tmp_path / "m", "--out", tmp_path / "out")
    one_line_error(result, "(No space left on device); nothing was written: free some space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_convert_torch_refuses_meta_tensors_in_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.helpers import write_word_level_tokenizer
    from tests.refimpl.test_torch_convert import Seq2SeqTransformer

    state = Seq2SeqTransformer(12, 8, 2, 16, 1, 1, maxlen=32).state_dict()
    torch.save({k: torch.empty_like(v, device="meta") for k, v in state.items()}, tmp_path / "model.pt")
    write_word_level_tokenizer(tmp_path / "t.json", 12)
    result = invoke("convert-torch", tmp_path / "model.pt", "--tokenizer", tmp_path / "t.json", "--out",
                    tmp_path / "c", "--n-heads", "2")
    one_line_error(result, "is a meta tensor")  # was NotImplementedError: Cannot copy out of meta tensor
    assert not (tmp_path / "c").exists()


def test_a_path_an_ascii_locale_cannot_pass_to_onnx_is_one_line(tmp_path):
    make_model(tmp_path / "m")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    code = "from refformer.runtime.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "export", "--model", str(tmp_path / "m"), "--out",
                             str(tmp_path / "ü")], env=env, capture_output=True, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1 and err.count("\n") == 1 and "run with a UTF-8 locale" in err, err


def test_verify_with_cuda_where_it_cannot_load_is_one_error_and_no_banner(tmp_path, monkeypatch, capfd):
    import refformer.export.verify as verify_module

    make_model(tmp_path / "m")
    export_model(tmp_path / "m")
    monkeypatch.setattr(verify_module, "cuda_usable", lambda: False)
    capfd.readouterr()
    with pytest.raises(RefformerError, match="CUDA execution provider cannot be loaded here"):
        verify(tmp_path / "m", providers=["CUDAExecutionProvider"])
    assert capfd.readouterr().err == ""  # ONNX Runtime's three-line loader banner came first
