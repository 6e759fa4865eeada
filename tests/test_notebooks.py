"""The colab/ notebooks run top to bottom (smoke settings) and are saved without outputs.

Each notebook runs in a fresh `python3` kernel (this interpreter: jupyter_client runs a
kernel spec whose command is `python` with `sys.executable`) with `LONGJAX_NOTEBOOK_SMOKE=1`, which
makes its settings cell pick the smallest sizes that still run every cell, its runs under
a temporary folder (`LONGJAX_WORKDIRS`, also the working directory) and the embedded
corpus from one built for the tests (`TFDS_DATA_DIR`). The kernel inherits the suite's
fast-compile XLA flags (tests/conftest.py).
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_quickstart", "02_length_extrapolation", "03_kernels_and_ring_attention",
             "04_mixer_zoo", "05_pretrained_models")
CELL_TIMEOUT_S = 300  # a hang guard; the notebooks take seconds each
# Run first in the kernel: the notebook must import this checkout's longjax (the editable
# install), not another copy, and never reach its install cell's clone instructions.
SAME_LONGJAX = f"""\
import pathlib
import longjax
assert pathlib.Path(longjax.__file__).resolve().is_relative_to({str(REPO)!r}), longjax.__file__
"""


def read(name):
    return nbformat.read(REPO / "colab" / f"{name}.ipynb", as_version=4)


def test_colab_holds_the_notebooks():
    assert sorted(p.stem for p in (REPO / "colab").glob("*.ipynb")) == list(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_without_outputs(name):
    notebook = read(name)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {index} has saved outputs; clear them"
            assert cell.execution_count is None, f"{name} cell {index} has an execution count"
    assert "longjax" in notebook.cells[1].source and "pip" in notebook.cells[1].source, (
        f"{name}: its first code cell installs longjax when it is not importable")


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory):
    """The embedded corpus, built once per test process into a fresh folder (tests leave
    ~/tensorflow_datasets alone, and parallel workers never build into one folder)."""
    from longjax.data.stdlib_corpus import StdlibSource

    path = tmp_path_factory.mktemp("tensorflow_datasets")
    StdlibSource(data_dir=str(path), file_format="array_record").download_and_prepare()
    return path


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_top_to_bottom(name, tmp_path, monkeypatch, tfds_data_dir):
    monkeypatch.setenv("LONGJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("LONGJAX_WORKDIRS", str(tmp_path))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_data_dir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if name == "05_pretrained_models":  # a tiny random Llama with a tokenizer, made here
        pytest.importorskip("transformers")
        from hf_models import make_llama_with_tokenizer

        make_llama_with_tokenizer(tmp_path / "checkpoint")
        monkeypatch.setenv("LONGJAX_HF_CHECKPOINT", str(tmp_path / "checkpoint"))
    notebook = read(name)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(SAME_LONGJAX))
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}},
                            shutdown_kernel="immediate")
    client.execute()  # raises CellExecutionError, with the cell and traceback, on an error
