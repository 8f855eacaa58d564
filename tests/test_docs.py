"""The documentation a clone holds: its links resolve, and the pages the issues asked for say what they must."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_and_referenced_doc_exists_in_the_repository():
    for page in PAGES:
        text = page.read_text()
        # Markdown links, and the docs pages named in backticks (run outputs such as runs/…/report.md are not files
        # of a clone).
        targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text) + re.findall(r"`((?:\.\./|docs/)[\w./-]+\.md)`", text)
        for target in targets:
            resolved = (page.parent / target).resolve()
            assert resolved.exists() or (ROOT / target).exists(), f"{page.name} links {target}, which a clone lacks"
    assert "../shared" not in "".join(page.read_text() for page in PAGES)


def test_the_method_notes_live_in_docs():
    method = (ROOT / "docs" / "method.md").read_text()
    for formula in ("W' = c3 · W − c1 · W A_i", "A* = √(1−ᾱ) (ᾱ Σ + (1−ᾱ) I)⁻¹", "Traps in the authors' released code"):
        assert formula in method


def test_the_readme_documents_tensorboard_export_examples_and_reproducibility():
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    for text in ("TensorBoard", "tensorboard --logdir", "torch.onnx.export(model, (x,), \"model.onnx\", dynamo=True)",
                 "denoiserep[export]", "examples/hf_trainer.py", "examples/lightning_module.py",
                 "docs/reproducibility.md", "norm_statistics=True", "save_adapter", "disable_adapter", "unload"):
        assert text in readme, text


def test_the_reproducibility_page_explains_ddp_against_one_process():
    page = re.sub(r"\s+", " ", (ROOT / "docs" / "reproducibility.md").read_text())
    for text in ("Per-rank random streams", "BatchNorm statistics per rank", "same number of processes",
                 "bit for bit"):
        assert text in page
