"""notebooks/quickstart.ipynb runs top to bottom, quietly, writing only under its WORK folder: own
folder of images + captions → shards → train → caption with xmodal.load → loss curve."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
# The words of the notebook's stand-in captions ("a small red circle", ...).
VOCABULARY = {"a", "small", "large", "red", "green", "blue", "yellow", "circle", "square"}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def text_of(output: nbformat.NotebookNode) -> str:
    return output.get("text") or output.get("data", {}).get("text/plain", "") or output.get("evalue", "")


def outputs_of(notebook: nbformat.NotebookNode, code: str) -> list[nbformat.NotebookNode]:
    """The outputs of the one code cell whose source contains ``code``."""
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and code in c.source]
    return cell.outputs


def test_quickstart_notebook_runs_quietly_under_its_work_folder(tmp_path, monkeypatch):
    before = listing(NOTEBOOK.parent)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp: WORK lands here
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Run from notebooks/, as Jupyter opened there would: nothing may land beside the notebook.
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert [o.get("ename") for o in outputs if o.output_type == "error"] == []
    assert listing(NOTEBOOK.parent) == before
    # Quiet: no warning (ipywidgets, tqdm, Lightning, ...) in any output, stderr or displayed.
    assert [text_of(o) for o in outputs if "warn" in text_of(o).lower()] == []
    (work,) = tmp_path.glob("xmodal-quickstart-*")
    (run_dir,) = (work / "outputs" / "caption_my_shards").iterdir()  # named after the shard folder
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    # Only the task's own config nodes are shown; the full tree is in the run dir.
    assert "cluster" in (run_dir / "config_tree.log").read_text()
    assert [text_of(o) for o in outputs if "cluster" in text_of(o)] == []
    # The end-of-run summary and progress lines reach the notebook (xmodal's logger).
    train_text = "".join(text_of(o) for o in outputs_of(notebook, "train(cfg)"))
    assert "step 40/40 (100%)" in train_text and f"best checkpoint:  {run_dir}" in train_text
    # The new image and its caption, from xmodal.load(...).caption(...).
    caption_outputs = outputs_of(notebook, "model.caption(")
    assert "image/png" in caption_outputs[0].get("data", {})
    printed = "".join(o.text for o in caption_outputs if o.output_type == "stream").splitlines()
    (caption_line,) = [line for line in printed if line.startswith("caption: ")]
    words = caption_line.removeprefix("caption: ").split()
    assert words and set(words) <= VOCABULARY, caption_line
    # The loss curve, drawn from the run dir's files.
    assert any("image/png" in o.get("data", {}) for o in outputs_of(notebook, "plt.plot("))
