"""The `lvgg` commands run end to end (tiny shapes: this checks they work, not how fast)."""
import subprocess
import sys

from typer.testing import CliRunner

from lvgg import _bridge
from lvgg.cli import app

runner = CliRunner()


def test_info_lists_cpu_features_and_cores():
    result = runner.invoke(app, ["info"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "physical cores among them" in result.output
    f = _bridge.cpu_features()
    # the types lvgg's own kernels run here: the K-quants wherever it has kernels, the grid types with VBMI
    assert ("Q4_K" in f["lvgg_kernel_types"]) == bool(f["lvgg_kernels"])
    assert ("IQ3_XXS" in f["lvgg_kernel_types"]) == (f["lvgg_kernels"] == "avx512_vnni" and f["avx512_vbmi"])
    if f["lvgg_kernel_types"]:
        assert "for: " + ", ".join(f["lvgg_kernel_types"]) in result.output


def test_bench_moe_prints_bandwidth_floor_and_every_config(tmp_path):
    result = runner.invoke(app, ["bench", "moe", "--types", "Q4_K", "--tokens", "1,9", "--threads", "1",
                                 "--layers", "2", "--seconds", "0.01", "--hidden", "256", "--intermediate", "256",
                                 "--experts", "4", "--top-k", "2", "--workdir", str(tmp_path / "new" / "dir")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "read bandwidth, 1 threads" in result.output
    # what it is doing, as it goes: the table only comes at the end
    assert "Q4_K: writing a synthetic file of 2 layers of 4 experts, 256x256" in result.output
    assert "Q4_K: timing 'repacked' at 1, 9 tokens" in result.output
    for config in ("ggml mul_mat_id", "repacked", "per-expert", "auto, both layouts"):
        assert config in result.output
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # made where missing; synthetic files are removed


def test_bench_moe_times_a_split_llamacpp_gguf(tmp_path):
    import numpy as np

    from lvgg.testing.expert_files import write_llamacpp_gguf

    write_llamacpp_gguf(tmp_path / "m.gguf", np.random.default_rng(0), split_max_tensors=3)
    result = runner.invoke(app, ["bench", "moe", "--file", str(tmp_path / "m-00001-of-00003.gguf"), "--tokens", "1,4",
                                 "--threads", "1", "--seconds", "0.01", "--top-k", "2", "--configs", "repacked"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "layers of" in result.output and "Q4_K/Q4_K/Q6_K" in result.output
    result = runner.invoke(app, ["bench", "moe", "--file", str(tmp_path / "m-00002-of-00003.gguf")])
    assert result.exit_code == 2 and "name the first part" in result.output


def test_bench_rejects_unknown_type(tmp_path):
    result = runner.invoke(app, ["bench", "moe", "--types", "Q9_Z", "--tokens", "1", "--workdir", str(tmp_path)])
    assert result.exit_code != 0


def test_bench_nodes_needs_a_core_per_virtual_node(tmp_path):
    result = runner.invoke(app, ["bench", "nodes", "--threads", "1", "--nodes", "2,4", "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert "every count is above the 1 cores used; give 1..1" in " ".join(result.output.split())


def test_bench_ranks_times_one_engine_and_ranks_by_rows_blocks_and_experts(tmp_path):
    result = runner.invoke(app, ["bench", "ranks", "--types", "Q8_0", "--tokens", "1,9", "--threads", "2",
                                 "--ranks", "2", "--layers", "2", "--seconds", "0.01", "--hidden", "256",
                                 "--intermediate", "256", "--experts", "4", "--top-k", "2", "--workdir", str(tmp_path)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for config in ("1 rank", "2 ranks, rows", "2 ranks, blocks (1/1 cores)", "2 ranks, experts"):
        assert config in result.output
    result = runner.invoke(app, ["bench", "ranks", "--threads", "2", "--ranks", "3", "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--ranks 3: give 2..2" in " ".join(result.output.split())


def test_converter_imports_from_outside_the_source_tree(tmp_path):
    # The converter is installed as lvgg.convert: nothing may import it as top-level `convert`,
    # which only resolves when the current directory is the repository.
    code = "import lvgg.convert.hf_to_gguf, lvgg.convert.gguf_to_gguf, lvgg.cli"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
