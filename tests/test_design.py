"""docs/DESIGN.md stays true to the code: every module of the distribution is in its layout tables, and every
function, builder and test its function map and correctness chain name exists."""

import importlib
import re
from pathlib import Path

import pytest

from refformer.export import contract

ROOT = Path(__file__).resolve().parent.parent
DESIGN = (ROOT / "docs" / "DESIGN.md").read_text()
FOLDERS = ("refimpl", "export", "runtime")


def section(title):
    """The text of the '## title' section, up to the next '## ' heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DESIGN, re.S | re.M)
    assert match, f"docs/DESIGN.md has no '## {title}' section"
    return match.group(1)


def table_rows(text):
    """The cells of every table row in text (header and separator rows dropped)."""
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if not set(row[0].strip()) <= set("-: ")][1:]


def names(cell):
    return re.findall(r"`([^`]+)`", cell)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for folder in FOLDERS
                                        for p in (ROOT / folder).rglob("*.py") if p.name != "__init__.py"))
def test_every_module_is_in_the_layout(path):
    folder, _, rest = path.partition("/")
    layout = section("Layout")
    assert f"`{rest}`" in layout or f"`{Path(rest).name}`" in layout, f"docs/DESIGN.md's Layout does not name {path}"


def resolve(package, dotted):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(f"refformer.{package}.{module}"), name)


def check_test(reference):
    path, _, name = reference.partition("::")
    assert (ROOT / path).is_file(), f"{path} does not exist"
    if name:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path} has no {name}"


FUNCTION_MAP = table_rows(section("Function map"))


@pytest.mark.parametrize("row", FUNCTION_MAP, ids=[row[0] for row in FUNCTION_MAP])
def test_function_map_names_exist(row):
    reference, builder, tests = row
    for name in names(reference):
        assert callable(resolve("refimpl", name)), name
    for name in names(builder):
        assert callable(resolve("export", name)), name
    assert names(tests)
    for name in names(tests):
        check_test(name)


def test_function_map_covers_every_builder_twin():
    """Every public function of export's twin modules is a builder named in the map or a documented helper."""
    mapped = {name for row in FUNCTION_MAP for name in names(row[1])}
    for module in ("ops", "attention", "layers"):
        mod = importlib.import_module(f"refformer.export.{module}")
        public = {n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                  and getattr(v, "__module__", None) == mod.__name__}
        helpers = {"scalar", "concat_cache", "write_slot_mask", "write_cache", "decoder_layers"}
        assert public - helpers <= {m.split(".", 1)[1] for m in mapped if m.startswith(module + ".")}, module


def test_correctness_chain_tests_exist_and_bounds_match_the_contract():
    chain = section("Correctness chain")
    for row in table_rows(chain):
        for name in names(row[-1]):
            if name.startswith("tests/"):
                check_test(name)
    assert f"fp32 ≤ {contract.ERROR_BOUNDS['fp32']:.0e}".replace("e-05", "e-5") in chain
    assert f"fp16 ≤ {contract.ERROR_BOUNDS['fp16']:.0e}".replace("e-02", "e-2") in chain


def test_graph_contract_names_are_the_contracts():
    text = section("Graph contract")
    patterns = (contract.PAST_KEY, contract.PAST_VALUE, contract.PRESENT_KEY, contract.PRESENT_VALUE,
                contract.CROSS_KEY, contract.CROSS_VALUE)
    for name in (contract.INPUT_IDS, contract.ATTENTION_MASK, contract.POSITION_IDS, contract.WRITE_INDEX,
                 contract.ENCODER_ATTENTION_MASK, contract.ENCODER_HIDDEN_STATES, contract.LOGITS, contract.NEXT_IDS,
                 *(pattern.format("{i}") for pattern in patterns)):
        assert f"`{name}`" in text, name
    for variant in contract.VARIANTS:
        assert f"`{variant}`" in section("Variants"), variant


def test_code_cites_only_the_repositorys_design():
    for folder in (*FOLDERS, "tests", "benchmarks", "package"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            outside = ("shared/" + "DESIGN", "shared/" + "STYLE")  # spelled apart so this file does not match itself
            assert not any(o in text for o in outside), f"{path} cites a design file outside the repo"


def test_cited_sections_exist():
    """A citation of a DESIGN.md section by its title, quoted or not, in the code names a heading of the file."""
    headings = {line.lstrip("#").strip().lower() for line in DESIGN.splitlines() if line.startswith("#")}
    cite = re.compile(r'DESIGN\.md(?:,|\s*\(|\s)\s*"?([A-Z][A-Za-z ]+?)(?:"|\)|:|,|\.|$)', re.M)
    for folder in (*FOLDERS, "tests", "benchmarks", "package"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "test_design.py":
                continue
            for title in cite.findall(path.read_text()):
                title = title.strip().lower()
                assert any(h == title or h.startswith(title) or h == "the " + title for h in headings), \
                    f"{path.relative_to(ROOT)} cites docs/DESIGN.md section {title!r}, which it does not have"
