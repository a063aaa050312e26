"""A llama.cpp GGUF as the experts file: single, split into parts, or a Hub quant in the HF cache."""
import os
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

import lvgg
from lvgg.cli import app
from lvgg.gguf_files import resolve
from lvgg.models import gguf_expert_name
from lvgg.testing.expert_files import write_all, write_llamacpp_gguf
from lvgg.testing.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The same model as one file and as 3 parts (3, 3 and 2 tensors)."""
    d = tmp_path_factory.mktemp("gguf")
    write_llamacpp_gguf(d / "one.gguf", np.random.default_rng(1))
    write_llamacpp_gguf(d / "model.gguf", np.random.default_rng(1), split_max_tensors=3)
    return d, d / "one.gguf", d / "model-00001-of-00003.gguf"


def outputs(store, rng):
    moe = lvgg.CpuMoE(store, threads=1)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    ids = np.array([[0, 5], [7, 1], [2, 2]], np.int32)
    w = np.full((3, 2), 0.5, np.float32)
    return [moe(layer, x, ids, w) for layer in store.layers]


def test_split_parts_serve_as_the_whole_file(model_files):
    d, one, first = model_files
    assert [p.name for p in resolve(first)] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole, parts = lvgg.ExpertStore(one, repack=False), lvgg.ExpertStore(first, repack=False)
    assert parts.layers == whole.layers == [0, 1]
    mapped = np.frombuffer(parts.mapped_bytes(), np.uint8)
    tensors = {t.name: np.asarray(t.data).view(np.uint8) for t in gguf.GGUFReader(one).tensors}  # gguf-py's reading
    for layer in parts.layers:
        info = parts.layer_info(layer)
        assert info.types == {"gate": "q4_K", "up": "q4_K", "down": "q6_K"}  # ggml's names
        for proj in ("gate", "up", "down"):  # the bytes at each offset of the joint mapping are the tensor's
            raw = tensors[gguf_expert_name(layer, proj)]
            assert mapped[info.offsets[proj]:info.offsets[proj] + raw.size].tobytes() == raw.tobytes()
    for a, b in zip(outputs(whole, np.random.default_rng(0)), outputs(parts, np.random.default_rng(0))):
        np.testing.assert_array_equal(a, b)
    repacked = lvgg.ExpertStore(first)  # the CPU's own layout, copied from the parts
    for a, b in zip(outputs(lvgg.ExpertStore(one), np.random.default_rng(0)),
                    outputs(repacked, np.random.default_rng(0))):
        np.testing.assert_array_equal(a, b)


def copy_parts(model_files, tmp_path):
    d, _, _ = model_files
    for p in d.glob("model-*.gguf"):
        shutil.copy(p, tmp_path / p.name)
    return [tmp_path / f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]


def test_a_missing_part_is_named(model_files, tmp_path):
    parts = copy_parts(model_files, tmp_path)
    parts[1].unlink()
    with pytest.raises(FileNotFoundError, match="missing 1 of its 3 parts: model-00002-of-00003.gguf"):
        lvgg.ExpertStore(parts[0])


def test_a_later_part_is_refused_with_the_first_named(model_files, tmp_path):
    parts = copy_parts(model_files, tmp_path)
    with pytest.raises(ValueError, match=r"part 2 of 3 of a split GGUF; name the first part \(model-00001-of-00003"):
        lvgg.ExpertStore(parts[1])


def test_a_duplicated_part_is_refused(model_files, tmp_path):
    parts = copy_parts(model_files, tmp_path)
    shutil.copy(parts[0], parts[1])
    with pytest.raises(ValueError, match="should be part 2 of 3, its header says part 1 of 3: a part is duplicated"):
        lvgg.ExpertStore(parts[0])


def test_a_part_of_another_model_is_refused(model_files, tmp_path):
    parts = copy_parts(model_files, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    write_llamacpp_gguf(other / "model.gguf", np.random.default_rng(2), split_max_tensors=4, n_layers=3)
    shutil.copy(other / "model-00003-of-00003.gguf", parts[2])
    with pytest.raises(ValueError, match="parts of .* hold 10 tensors, its first part says 8: a part is from another"):
        lvgg.ExpertStore(parts[0])


def test_split_sets_are_checked_before_vllm_starts(model_files, tmp_path):
    parts = copy_parts(model_files, tmp_path)
    shutil.copy(parts[0], parts[1])
    folder = make_tiny_model("qwen3_moe", tmp_path / "m", seed=3)
    r = CliRunner().invoke(app, ["serve", str(folder), "--experts", str(parts[0])])
    assert r.exit_code == 2
    assert "should be part 2 of 3, its header says part 1 of 3" in r.output


def test_one_part_renamed_as_a_whole_file_is_refused(model_files, tmp_path):
    parts = copy_parts(model_files, tmp_path)
    alone = tmp_path / "model.gguf"
    shutil.copy(parts[0], alone)
    with pytest.raises(ValueError, match="says it is one of 3 parts of a split GGUF, 1 given; name its first part"):
        lvgg.ExpertStore(alone)


@pytest.mark.parametrize("architecture, message", [
    ("qwen3", "holds a qwen3 model's experts (general.architecture); this model is qwen3_moe"),
    ("qwen3moe", "holds no routed-expert tensors (blk.N.ffn_{gate,up,down}_exps.weight)"),
])
def test_a_dense_gguf_is_refused_before_vllm_starts(tmp_path, architecture, message):
    folder = make_tiny_model("qwen3_moe", tmp_path / "m", seed=3)
    dense = tmp_path / "dense.gguf"
    w = gguf.GGUFWriter(str(dense), architecture)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((256, 256), np.float32))
    write_all(w)
    r = CliRunner().invoke(app, ["serve", str(folder), "--experts", str(dense)])
    assert r.exit_code == 2
    assert message in r.output


# --- the Hub form: org/repo:QUANT, from a cache laid out as huggingface_hub lays it out ---------

REPO, REVISION = "someone/Model-GGUF", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(model_files, tmp_path_factory):
    d, one, _ = model_files
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (snapshot / "Q4_K_M").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    (repo / "blobs").mkdir()
    files = {f"Q4_K_M/Model-Q4_K_M-0000{i}-of-00003.gguf": d / f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)}
    files["Model-Q4_K_S.gguf"] = one
    files["mmproj-Model-F16.gguf"] = one
    for i, (name, src) in enumerate(files.items()):  # blobs by hash, snapshot entries linking to them
        blob = repo / "blobs" / f"{i:064x}"
        shutil.copy(src, blob)
        os.symlink(os.path.relpath(blob, (snapshot / name).parent), snapshot / name)
    return cache


def inspect_from_hub(cache, spec):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "lvgg.cli", "inspect", spec], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_hub_quant_resolves_to_its_parts_in_the_cache(hub_cache):
    r = inspect_from_hub(hub_cache, f"{REPO}:Q4_K_M")
    assert r.returncode == 0, r.stderr
    assert "Model-Q4_K_M-00001-of-00003.gguf (and 2 more parts): architecture qwen3moe, 2 MoE layers" in r.stdout
    r = inspect_from_hub(hub_cache, f"{REPO}:q4_k_s")  # the tag, either case
    assert r.returncode == 0, r.stderr
    assert "Model-Q4_K_S.gguf: architecture qwen3moe, 2 MoE layers" in r.stdout


@pytest.mark.parametrize("spec, message", [
    (f"{REPO}:Q8_0", "has no GGUF file of quant 'Q8_0'; its GGUF files: Model-Q4_K_M-00001-of-00003.gguf"),
    ("someone/Other-GGUF:Q4_K_M", "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
])
def test_a_hub_quant_not_there_is_named(hub_cache, spec, message):
    r = inspect_from_hub(hub_cache, spec)
    assert r.returncode != 0
    assert message in r.stdout + r.stderr
