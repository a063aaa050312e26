"""llama.cpp's own tools as references for tests and benchmarks.

Everything here comes from the pinned llama-cpp-python sdist (vendor/llama.cpp/PIN), code no
one here wrote: its `convert_hf_to_gguf.py` (run with the sdist's own gguf-py), GPT-2's
vocabulary from its `models/ggml-vocab-gpt-2.gguf`, and llama.cpp itself through the
llama-cpp-python wheel of the same version. With them a test can make a community-style GGUF
of a tiny random model (llama.cpp's converter, experts quantized by ggml), and run it greedily
in llama.cpp to compare with vLLM+lvgg on the same file:

    tree = upstream_tools()
    model = make_tiny_gpt2_vocab_model(tmp / "hf", tree)
    f32 = convert_hf(model, tmp / "f32.gguf", tree)
    [q4] = requantize_experts(f32, {tmp / "q4_k.gguf": Q.Q4_K})
    run = greedy_runs([q4], [[464, 6154]], tokens=16)[str(q4)]   # tokens, logprobs, gaps

`greedy_runs` runs llama.cpp in a child process (`python -m lvgg.testing.llama_cpp greedy ...`):
its ggml is another build than lvgg's, and a crash there fails one call, not the caller.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# What the tests need from the sdist besides ggml/ (materialize.py --parts).
TOOL_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "models/ggml-vocab-gpt-2.gguf")
GPT2_VOCAB = "models/ggml-vocab-gpt-2.gguf"
EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# The tiny model: every layer MoE (llama.cpp's qwen3moe has no dense-MLP layers), sizes that are
# multiples of 256 (the block of K- and IQ-quants) and differ (a transposed projection cannot
# pass for the right one), 3 layers of 8 experts, top-2 (override num_experts_per_tok to change);
# the output projection tied to the embedding (GPT-2's 50257 x 256 floats once, not twice).
TINY_QWEN3_MOE = dict(hidden_size=256, moe_intermediate_size=512, intermediate_size=512, num_hidden_layers=3,
                      num_experts=8, num_experts_per_tok=2, mlp_only_layers=[], decoder_sparse_step=1,
                      tie_word_embeddings=True)
# Per family, what its tiny model for llama.cpp changes of lvgg.testing.tiny_models' (every MoE layer).
TINY_FOR_LLAMA_CPP = {"qwen3_moe": TINY_QWEN3_MOE, "gpt_oss": {}}
# The types llama.cpp's quantizer refuses without an importance matrix, or quantizes badly
# (llama-quantize asks for one for all of these).
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "chat_template.jinja")


def checkout_root() -> Path:
    """The lvgg source checkout this module runs from (the tools come through its vendor/)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "vendor" / "llama.cpp" / "materialize.py").exists():
        raise RuntimeError(f"{root} is not an lvgg source checkout (no vendor/llama.cpp/materialize.py): "
                           "llama.cpp's reference tools need one (pip install -e .)")
    return root


def pinned_version() -> str:
    """The llama-cpp-python version of vendor/llama.cpp/PIN (the wheel must be the same)."""
    for line in (checkout_root() / "vendor" / "llama.cpp" / "PIN").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "version":
            return value.strip()
    raise RuntimeError("vendor/llama.cpp/PIN names no version")


def upstream_tools() -> Path:
    """The materialized upstream tree with llama.cpp's converter, gguf-py and GPT-2's vocabulary
    (fetched with pip and checked against the pin on first use; LVGG_LLAMA_SDIST=FILE uses a
    local copy of the sdist)."""
    script = checkout_root() / "vendor" / "llama.cpp" / "materialize.py"
    done = subprocess.run([sys.executable, str(script), "--parts", *TOOL_PARTS], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"materialize.py --parts {' '.join(TOOL_PARTS)} failed:\n{done.stdout[-3000:]}")
    tree = script.parent / "tree"
    missing = [p for p in TOOL_PARTS if not (tree / p).exists()]
    if missing:
        raise RuntimeError(f"{tree} lacks {missing} after materialize.py")
    return tree


def gpt2_tokenizer(tree: Path) -> Any:
    """GPT-2's byte-level BPE tokenizer (transformers), rebuilt from the tokens and merges of the
    sdist's ggml-vocab-gpt-2.gguf: llama.cpp's converter recognizes it by hashing the ids it gives
    for a fixed text (a tokenizer trained here would not pass)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(tree / GPT2_VOCAB)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    eos = tokens[reader.fields["tokenizer.ggml.eos_token_id"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # GPT-2 adds no BOS: the ids of a text are its tokens alone, in vLLM and here alike
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)


def make_tiny_gpt2_vocab_model(out_dir: str | os.PathLike[str], tree: Path, seed: int = 0, family: str = "qwen3_moe",
                               **overrides: Any) -> Path:
    """A tiny random float32 checkpoint of a family (TINY_FOR_LLAMA_CPP) with GPT-2's tokenizer
    (vocab 50257) that llama.cpp's converter accepts; weights as lvgg.testing.tiny_models makes them."""
    from lvgg.testing.tiny_models import make_tiny_model

    tokenizer = gpt2_tokenizer(tree)
    out = make_tiny_model(family, out_dir, seed=seed, dtype="float32",
                          **{**TINY_FOR_LLAMA_CPP[family], "vocab_size": len(tokenizer), **overrides})
    for name in _TOKENIZER_FILES:  # tiny_models' own tokenizer, replaced by GPT-2's
        (out / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    for name in ("config.json", "generation_config.json"):  # special ids of GPT-2's vocabulary
        path = out / name
        if path.exists():
            config = json.loads(path.read_text())
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key in config:
                    config[key] = tokenizer.eos_token_id
            path.write_text(json.dumps(config, indent=2))
    return out


def _tools_env(tree: Path) -> dict[str, str]:
    """The sdist's gguf-py first on the path (not an installed gguf of another version)."""
    paths = [str(tree / "gguf-py")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


# Runs the converter with transformers' AutoConfig refused, so that it reads config.json as written:
# transformers 5 reads a step3p5 config as its Step-3.7 class, whose to_dict() renames keys the
# converter's Step35Model reads (num_attention_groups).
_CONFIG_AS_WRITTEN = ("import runpy, sys, transformers\n"
                      "def refuse(*args, **kwargs):\n"
                      "    raise ValueError('read config.json as written')\n"
                      "transformers.AutoConfig.from_pretrained = refuse\n"
                      "sys.argv = sys.argv[1:]\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def convert_hf(model_dir: str | os.PathLike[str], out: str | os.PathLike[str], tree: Path,
               outtype: str = "f32", options: Sequence[str] = (), config_as_written: bool = False) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on a checkpoint folder (with more of its ``options``;
    ``config_as_written``: its config.json read as a file, not through transformers)."""
    out = Path(out).resolve()
    runner = [sys.executable, "-c", _CONFIG_AS_WRITTEN] if config_as_written else [sys.executable]
    cmd = [*runner, str(tree / "convert_hf_to_gguf.py"), str(Path(model_dir).resolve()), "--outfile", str(out),
           "--outtype", outtype, *options]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_tools_env(tree), cwd=tree)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={done.returncode}):\n{done.stderr[-4000:]}")
    return out


def stand_in_imatrix(layer: int, projection: str, columns: int, seed: int = 0) -> np.ndarray:
    """A stand-in importance matrix for one expert tensor: one value per column (the weight's
    input dimension), uniform in [0.5, 2], deterministic per (seed, layer, projection)."""
    rng = np.random.default_rng([seed, layer, ("gate", "up", "down").index(projection)])
    return rng.uniform(0.5, 2.0, columns).astype(np.float32)



Types = Any  # a GGMLQuantizationType, {(layer, projection): type}, or a function of (layer, projection)


def expert_type(types: Types, layer: int, projection: str) -> Any:
    """The type `types` gives one layer's projection (None: leave it as it is)."""
    if isinstance(types, Mapping):
        return types.get((layer, projection))
    if callable(types) and not isinstance(types, int):  # a type is an IntEnum member
        return types(layer, projection)
    return types


def requantize_experts(src: str | os.PathLike[str], outputs: Mapping[str | os.PathLike[str], Types],
                       threads: int = 2, imatrix: bool | Sequence[str] = True) -> list[Path]:
    """Copy a llama.cpp GGUF (every KV field and tensor) once per output, {path: types}, with its
    routed-expert tensors (blk.N.ffn_{gate,up,down}_exps.weight) quantized by ggml's quantizer
    (lvgg.quantize) to that output's `types`; every other tensor as it is (a float32 conversion
    keeps the dense part exact). The source is read once (its 50k-token vocabulary takes seconds).
    `imatrix`: True gives every quantized expert tensor stand_in_imatrix()'s matrix, as files made
    with an importance matrix have; a list of type names gives it to those types only."""
    import gguf

    from lvgg.quantize import add_quantized_tensor, quantize, write_all

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    fields = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.alignment"):
            continue  # the header's own fields; the writer writes the architecture and alignment
        main = field.types[0]
        fields.append((field.name, field.contents(), main, field.types[-1] if main == gguf.GGUFValueType.ARRAY else None))
    written = []
    for out, types in outputs.items():
        writer = gguf.GGUFWriter(str(out), arch)
        for name, value, main, sub in fields:
            writer.add_key_value(name, value, main, sub_type=sub)
        for tensor in reader.tensors:
            match = EXPERT_TENSOR.match(tensor.name)
            qtype = expert_type(types, int(match[1]), match[2]) if match else None
            if qtype is None or qtype == tensor.tensor_type:  # as it is (numpy's shape; bytes of a quantized one)
                writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
                continue
            if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                raise ValueError(f"{tensor.name} is {tensor.tensor_type.name}: requantize from a float32 conversion")
            values = np.asarray(tensor.data, dtype=np.float32)  # [experts, rows, columns]
            weights = None
            if imatrix is True or (imatrix and qtype.name in imatrix):
                weights = stand_in_imatrix(int(match[1]), match[2], values.shape[-1])
            add_quantized_tensor(writer, tensor.name, quantize(values, qtype, threads, imatrix=weights), qtype)
        write_all(writer)
        written.append(Path(out))
    return written


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> size


def tensor_types(path: str | os.PathLike[str]) -> dict[str, int]:
    """{tensor name: ggml type} from a GGUF's header, read straight (gguf-py's reader parses every
    KV value into arrays first: seconds for a 50k-token vocabulary)."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
        off = 24

        def skip_string(off: int) -> int:
            return off + 8 + struct.unpack_from("<Q", mm, off)[0]

        def skip_value(off: int, vtype: int) -> int:
            if vtype == 8:  # string
                return skip_string(off)
            if vtype == 9:  # array: item type, count, items
                item, count = struct.unpack_from("<IQ", mm, off)
                off += 12
                if item in _SCALAR_BYTES:
                    return off + count * _SCALAR_BYTES[item]
                for _ in range(count):
                    off = skip_value(off, item)
                return off
            return off + _SCALAR_BYTES[vtype]

        for _ in range(n_kv):
            off = skip_string(off)
            off = skip_value(off + 4, struct.unpack_from("<I", mm, off)[0])
        types = {}
        for _ in range(n_tensors):
            length = struct.unpack_from("<Q", mm, off)[0]
            name = mm[off + 8:off + 8 + length].decode()
            off += 8 + length
            n_dims = struct.unpack_from("<I", mm, off)[0]
            off += 4 + 8 * n_dims
            types[name] = struct.unpack_from("<I", mm, off)[0]
            off += 12  # type, data offset
        return types


def expert_types_of(path: str | os.PathLike[str]) -> dict[tuple[int, str], str]:
    """{(layer, projection): type name} of a GGUF's routed-expert tensors."""
    import gguf

    return {(int(m[1]), m[2]): gguf.GGMLQuantizationType(t).name for name, t in tensor_types(path).items()
            if (m := EXPERT_TENSOR.match(name))}


def greedy_runs(files: Sequence[str | os.PathLike[str]], prompts: Sequence[Sequence[int]], tokens: int,
                threads: int = 2, timeout: float = 1800) -> dict[str, dict[str, Any]]:
    """llama.cpp's greedy continuation of each prompt (token ids, fed as they are: no BOS is
    added) on each file, in one child process: {file: {"tokens", "logprobs", "gaps"}} with, per
    prompt, the generated ids, each one's log-probability and the margin between the top two
    log-probabilities there."""
    spec = json.dumps({"files": [str(f) for f in files], "prompts": [list(map(int, p)) for p in prompts],
                       "tokens": tokens, "threads": threads})
    cmd = [sys.executable, "-m", "lvgg.testing.llama_cpp", "greedy", spec]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"llama.cpp's greedy run failed (rc={done.returncode}):\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@dataclass
class Divergence:
    """Where one prompt's greedy tokens of two runs part, and how close the runs were."""

    prompt: int
    position: int | None  # the first generated position whose tokens differ; None: all equal
    compared: int  # generated positions with equal tokens (all of them when position is None)
    max_logprob_diff: float  # the largest |log-probability difference| of the equal tokens
    margins: tuple[float, float] | None  # each run's top-2 log-probability margin at `position`


def divergences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Divergence]:
    """Compare two greedy runs of the same prompts (the JSON of tests/vllm_generate.py, or one
    of greedy_runs()'s results): one Divergence per prompt."""
    if len(a["tokens"]) != len(b["tokens"]):
        raise ValueError(f"{len(a['tokens'])} prompts against {len(b['tokens'])}")
    found = []
    for i, (ta, tb, la, lb, ga, gb) in enumerate(zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"],
                                                     a["gaps"], b["gaps"])):
        if len(ta) != len(tb):
            raise ValueError(f"prompt {i}: {len(ta)} generated tokens against {len(tb)}")
        position = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        same = len(ta) if position is None else position
        diff = max((abs(x - y) for x, y in zip(la[:same], lb[:same])), default=0.0)
        found.append(Divergence(i, position, same, float(diff),
                                None if position is None else (float(ga[position]), float(gb[position]))))
    return found


def _greedy_in_this_process(files: Sequence[str], prompts: Sequence[Sequence[int]], tokens: int,
                            threads: int) -> dict[str, dict[str, Any]]:
    import llama_cpp
    from llama_cpp import llama as llama_module

    if llama_cpp.__version__ != pinned_version():
        raise RuntimeError(f"llama-cpp-python {llama_cpp.__version__} is installed, the pin is {pinned_version()}")
    n_ctx = max(len(p) for p in prompts) + tokens + 1
    results = {}
    for path in files:
        # Llama() takes no use_extra_bufts (it swallows unknown keywords): turn llama.cpp's extra
        # buffer types off in the model parameters it starts from. Their AMX path crashed on an
        # all-Q8_0 file on an AMX CPU; without them it computes with ggml's plain CPU kernels.
        defaults = llama_module.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = without_extra_bufts
        try:
            model = llama_module.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, seed=0,
                                       n_threads=threads, n_threads_batch=threads, verbose=False,
                                       type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        finally:
            llama_module.llama_cpp.llama_model_default_params = defaults
        if model.model_params.use_extra_bufts:
            raise RuntimeError("llama.cpp's extra buffer types are still on")
        out: dict[str, list[list[float]]] = {"tokens": [], "logprobs": [], "gaps": []}
        for prompt in prompts:
            model.reset()
            model.eval(list(prompt))
            ids, logprobs, gaps = [], [], []
            for _ in range(tokens):
                logits = model.scores[model.n_tokens - 1].astype(np.float64)
                lp = logits - logits.max()
                lp -= np.log(np.exp(lp).sum())
                best = int(np.argmax(lp))
                top2 = np.partition(lp, -2)[-2:]
                ids.append(best)
                logprobs.append(float(lp[best]))
                gaps.append(float(top2[1] - top2[0]))
                model.eval([best])
            out["tokens"].append(ids)
            out["logprobs"].append(logprobs)
            out["gaps"].append(gaps)
        results[str(path)] = out
        model.close()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lvgg.testing.llama_cpp")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("greedy", help="llama.cpp's greedy runs; prints RESULT {json}")
    g.add_argument("spec", help='JSON: {"files": [...], "prompts": [[ids]], "tokens": N, "threads": T}')
    a = ap.parse_args(argv)
    spec = json.loads(a.spec)
    result = _greedy_in_this_process(spec["files"], spec["prompts"], spec["tokens"], spec["threads"])
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
