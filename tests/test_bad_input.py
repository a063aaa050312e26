"""Bad files and bad arguments raise Python exceptions that say what was expected; nothing aborts."""
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import lvgg
from lvgg.testing.expert_files import random_experts, write_experts_file

E, D, F = 8, 64, 96


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("good") / "experts.gguf"
    return write_experts_file(path, {0: random_experts(rng, E, D, F), 2: random_experts(rng, E, D, F)}, Q.Q8_0)


@pytest.fixture(scope="module")
def moe(good_file):
    return lvgg.CpuMoE(lvgg.ExpertStore(good_file), threads=1, max_tokens=64, max_top_k=4)


def args(T=3, K=2, x_dtype=torch.float32, ids_dtype=torch.int32):
    return (torch.randn(T, D).to(x_dtype), torch.randint(0, E, (T, K), dtype=ids_dtype), torch.rand(T, K))


# --- files -------------------------------------------------------------------------------

def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="experts file not found"):
        lvgg.ExpertStore(tmp_path / "nope.gguf")


def test_text_file_is_not_gguf(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_text("this is not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file: expected the magic 'GGUF'.*found 'this'"):
        lvgg.ExpertStore(p)
    # a binary file (a safetensors header's length): its bytes are named, not decoded as UTF-8
    p.write_bytes(bytes([0xd0, 0x01, 0x5c, 0x0a]) + b"{}")
    with pytest.raises(ValueError, match=r"found '\\xd0\\x01\\x5c\\x0a'; convert the model"):
        lvgg.ExpertStore(p)


def test_empty_file_is_not_gguf(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="only 0 bytes"):
        lvgg.ExpertStore(p)


def test_directory_is_refused(tmp_path):
    with pytest.raises(OSError, match="is a directory, not a GGUF file"):
        lvgg.ExpertStore(tmp_path)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.7, 0.999])
def test_truncated_file_is_refused(good_file, tmp_path, fraction):
    data = good_file.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        lvgg.ExpertStore(p)


def test_tensor_count_larger_than_the_file_holds(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    n = int.from_bytes(data[8:16], "little")
    data[8:16] = (n + 5).to_bytes(8, "little")
    p = tmp_path / "count.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        lvgg.ExpertStore(p)


def _tensor_info_field_end(path, name):
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == name)
    return t.field.offset + sum(p.nbytes for p in t.field.parts)


def test_tensor_offset_past_end_of_file(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    end = _tensor_info_field_end(good_file, "blk.2.ffn_down_exps.weight")
    data[end - 8:end] = (len(data) * 4 // 32 * 32).to_bytes(8, "little")  # offset field, aligned
    p = tmp_path / "offset.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="blk.2.ffn_down_exps.weight"):
        lvgg.ExpertStore(p)


def test_absurd_shape_is_refused(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    reader = gguf.GGUFReader(str(good_file))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    dims_at = t.field.offset + t.field.parts[0].nbytes + t.field.parts[1].nbytes + t.field.parts[2].nbytes
    data[dims_at + 8:dims_at + 16] = (1 << 60).to_bytes(8, "little")  # second dimension
    p = tmp_path / "shape.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError):
        lvgg.ExpertStore(p)


def test_mismatched_expert_shapes_name_the_tensor(tmp_path):
    rng = np.random.default_rng(0)
    layer = random_experts(rng, E, D, F)
    layer["gate"] = layer["gate"][:, :, :32]  # D=32 where down says 64
    p = write_experts_file(tmp_path / "m.gguf", {3: layer}, Q.F32)
    with pytest.raises(ValueError, match=r"blk.3.ffn_gate_exps.weight' has shape \[32, 96, 8, 1\], expected \[64, 96, 8, 1\]"):
        lvgg.ExpertStore(p)


def test_missing_down_projection_is_named(tmp_path):
    rng = np.random.default_rng(0)
    layer = random_experts(rng, E, D, F)
    del layer["down"]
    p = write_experts_file(tmp_path / "m.gguf", {5: layer}, Q.F32)
    with pytest.raises(ValueError, match="layer 5 .* no 'blk.5.ffn_down_exps.weight'"):
        lvgg.ExpertStore(p)


def test_file_without_experts_cannot_make_an_engine(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "dense.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    store = lvgg.ExpertStore(tmp_path / "dense.gguf")
    assert store.layers == []
    with pytest.raises(ValueError, match="holds no routed-expert tensors"):
        lvgg.CpuMoE(store)


def test_fuzzed_files_never_crash_the_process():
    script = Path(__file__).with_name("fuzz_gguf.py")
    done = subprocess.run([sys.executable, str(script), "--cases", "400", "--seed", "11"],
                          capture_output=True, text=True, timeout=600)
    last_case = done.stderr.strip().splitlines()[-1:] if done.stderr else []
    assert done.returncode == 0, f"fuzz failed (rc={done.returncode}) at {last_case}: {done.stdout[-2000:]}"


def test_check_layer_names_the_first_difference(good_file):
    store = lvgg.ExpertStore(good_file)
    assert store.check_layer(2, n_experts=E, hidden_size=D, intermediate_size=F).form == "gate+up+down"
    with pytest.raises(ValueError, match="layer 2 has hidden_size=64, the model expects 2048"):
        store.check_layer(2, n_experts=E, hidden_size=2048)


def test_a_store_of_some_layers_computes_them_like_the_whole_file(good_file):
    """A pipeline-parallel rank's store: its layers only, the same results."""
    whole, part = lvgg.ExpertStore(good_file), lvgg.ExpertStore(good_file, layers=[2])
    assert part.layers == [2] and whole.layers == [0, 2]
    x, ids, w = args(T=5)
    outs = [lvgg.CpuMoE(s, threads=1, max_tokens=64, max_top_k=4)(2, x, ids, w) for s in (whole, part)]
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(IndexError, match="layer 0 has no routed experts"):
        lvgg.CpuMoE(part, threads=1, max_tokens=64, max_top_k=4)(0, x, ids, w)
    with pytest.raises(ValueError, match=r"has no experts for layer 1 \(its MoE layers: 0,2\)"):
        lvgg.ExpertStore(good_file, layers=[1, 2])
    with pytest.raises(ValueError, match="at least one MoE layer"):
        lvgg.ExpertStore(good_file, layers=[])


# --- arguments -----------------------------------------------------------------------------

def test_layer_without_experts_is_index_error(moe):
    with pytest.raises(IndexError, match=r"layer 1 has no routed experts .*MoE layers in the file: 0,2"):
        moe(1, *args())


@pytest.mark.parametrize("bad", [-2, E, 1 << 40, -(1 << 40)])  # -1 is "no expert"
def test_expert_id_out_of_range(moe, bad):
    x, ids, w = args(ids_dtype=torch.int64)
    ids[1, 1] = bad
    with pytest.raises(IndexError, match=rf"topk_ids\[1, 1\] = {bad} is not an expert index: expected 0..7, or -1"):
        moe(0, x, ids, w)


def test_wrong_x_dtype(moe):
    x, ids, w = args(x_dtype=torch.float64)
    with pytest.raises(TypeError, match="x has dtype float64, which the CPU MoE engine does not take"):
        moe(0, x, ids, w)


def test_wrong_ids_dtype(moe):
    x, _, w = args()
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        moe(0, x, torch.zeros(3, 2, dtype=torch.float32), w)


def test_wrong_hidden_size(moe):
    with pytest.raises(ValueError, match="x has hidden size 65 but the experts expect 64"):
        moe(0, torch.randn(3, 65), *args()[1:])


def test_row_counts_must_agree(moe):
    x, ids, w = args()
    with pytest.raises(ValueError, match="same number of rows; found 3, 2, 3, 3"):
        moe(0, x, ids[:2], w)


def test_weights_shape_must_match_ids(moe):
    x, ids, _ = args()
    with pytest.raises(ValueError, match=r"topk_weights must be \[tokens, 2\]"):
        moe(0, x, ids, torch.rand(3, 3))


def test_out_shape(moe):
    x, ids, w = args()
    with pytest.raises(ValueError, match=r"out must be \[tokens, 64\]"):
        moe(0, x, ids, w, torch.empty(3, 32))


def test_too_many_tokens(moe):
    with pytest.raises(ValueError, match="65 tokens, more than max_tokens=64"):
        moe(0, *args(T=65))


def test_top_k_above_configured(moe):
    with pytest.raises(ValueError, match=r"5 experts per token; expected 1..4"):
        moe(0, *args(K=5))


def test_non_contiguous_input(moe):
    x, ids, w = args()
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        moe(0, torch.randn(D, 3).t(), ids, w)


def test_three_dimensional_input(moe):
    x, ids, w = args()
    with pytest.raises(ValueError, match="x must be 2-D, found 3-D"):
        moe(0, x.reshape(3, 1, D), ids, w)


def test_wrong_activation_for_gated_experts(good_file):
    moe = lvgg.CpuMoE(lvgg.ExpertStore(good_file), threads=1, activation="relu2")
    with pytest.raises(ValueError, match="experts are gated"):
        moe(0, *args())


def test_unknown_activation(good_file):
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        lvgg.CpuMoE(lvgg.ExpertStore(good_file), activation="tanh")


def test_more_threads_than_cpus(good_file):
    with pytest.raises(ValueError, match="threads=.* but only .* CPUs are given"):
        lvgg.CpuMoE(lvgg.ExpertStore(good_file), threads=len(os.sched_getaffinity(0)) + 1,
                    cpus=sorted(os.sched_getaffinity(0)))


def test_cpu_outside_the_process_set(good_file):
    with pytest.raises(ValueError, match="CPU 4000 is not in this process's CPU set"):
        lvgg.CpuMoE(lvgg.ExpertStore(good_file), cpus=[4000])


def test_quantize_rejects_bad_row_length():
    from lvgg import _bridge
    with pytest.raises(ValueError, match="multiple of its block size 256"):
        _bridge.quantized_row_size(int(Q.Q4_K), 100)


def test_zero_tokens_is_a_no_op(moe):
    out = moe(0, *args(T=0))
    assert out.shape == (0, D)


def test_unknown_schedule(good_file):
    with pytest.raises(ValueError, match="unknown schedule 'fast'"):
        lvgg.CpuMoE(lvgg.ExpertStore(good_file), schedule="fast")


def test_per_expert_schedule_needs_the_mapped_weights(tmp_path):
    rng = np.random.default_rng(0)
    path = write_experts_file(tmp_path / "q.gguf", {0: random_experts(rng, E, 256, 256)}, Q.Q4_0)
    with pytest.raises(ValueError, match="keeps only repacked copies of layer 0; open it with repack=False"):
        lvgg.CpuMoE(lvgg.ExpertStore(path), schedule="per_expert")
    lvgg.CpuMoE(lvgg.ExpertStore(path, keep_mapped=True), schedule="per_expert")
