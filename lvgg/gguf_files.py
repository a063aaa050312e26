"""Where an experts file's bytes are: a GGUF file, the parts of a split one, or a quant in a Hub repo.

    resolve("experts.gguf")                        # [experts.gguf]
    resolve("Model-Q4_K_M-00001-of-00003.gguf")   # the three parts, in order
    resolve("org/Model-GGUF:Q4_K_M")              # that quant's file(s), from the HF cache

A llama.cpp GGUF is an experts file as it is: lvgg reads its routed-expert tensors from the
mapping and leaves the rest unread. A split GGUF is named by its first part; the others must lie
beside it (the store checks that they are one set: llama.cpp's split.* keys).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# llama.cpp's split file names: <stem>-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
# org/repo:QUANT (llama.cpp's -hf form); a local path of that shape wins
HUB_SPEC = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<quant>[\w.-]+)$")


def split_parts(first: str | os.PathLike[str]) -> list[Path]:
    """Every part of a split GGUF named by its first part, in order; [first] for a single file."""
    first = Path(first)
    m = SPLIT_NAME.match(first.name)
    if not m:
        return [first]
    n = int(m["n"])
    if int(m["i"]) != 1:
        raise ValueError(f"{first.name} is part {int(m['i'])} of {n} of a split GGUF; name the first part "
                         f"({m['stem']}-00001-of-{n:05d}.gguf)")
    parts = [first.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise FileNotFoundError(f"split GGUF {first.name} is missing {len(missing)} of its {n} parts: "
                                f"{', '.join(missing)} (expected beside it in {first.parent})")
    return parts


def is_hub_spec(spec: str | os.PathLike[str]) -> bool:
    """``spec`` names a quant in a Hub repo (org/repo:QUANT) rather than a local file."""
    return not os.path.exists(spec) and HUB_SPEC.match(os.fspath(spec)) is not None


def resolve(spec: str | os.PathLike[str]) -> list[Path]:
    """The local files of an experts file given as a path (a split GGUF's first part: all parts)
    or as ``org/repo:QUANT`` (downloaded to, or found in, the Hugging Face cache)."""
    if is_hub_spec(spec):
        return _from_hub(os.fspath(spec))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"experts file not found: {path} (give a GGUF file, the first part of a split "
                                "one, or a Hub quant as org/repo:QUANT)")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf"))
        raise IsADirectoryError(f"{path} is a directory, not a GGUF file"
                                + (f" (it holds {', '.join(found[:6])}{' ...' if len(found) > 6 else ''})"
                                   if found else " (it holds no .gguf file)"))
    return split_parts(path)


def _quant_files(names: list[str], quant: str) -> list[str]:
    """The .gguf files among ``names`` (repo paths) that are quant ``quant``: the tag stands
    between separators (-, ., /) in the path, e.g. Model-Q4_K_M.gguf, Q4_K_M/Model-Q4_K_M-00001-of-00002.gguf.
    Multimodal projectors (mmproj) are not experts files."""
    tag = re.compile(rf"(^|[-./]){re.escape(quant)}([-./]|$)", re.IGNORECASE)
    return sorted(n for n in names if n.endswith(".gguf") and tag.search(n[:-len(".gguf")] + ".")
                  and "mmproj" not in n.rsplit("/", 1)[-1].lower())


def _from_hub(spec: str) -> list[Path]:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    m = HUB_SPEC.match(spec)
    repo, quant = m["repo"], m["quant"]
    try:
        if constants.HF_HUB_OFFLINE:  # what the cache holds of the repo's current revision
            root = Path(snapshot_download(repo, local_files_only=True))
            names = [p.relative_to(root).as_posix() for p in root.rglob("*.gguf")]
        else:
            names = HfApi().list_repo_files(repo)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download "
                                f"the quant first (e.g. `hf download {repo} --include '*{quant}*'`) or unset "
                                "HF_HUB_OFFLINE") from None
    files = _quant_files(names, quant)
    if not files:
        quants = sorted({n.rsplit("/", 1)[-1] for n in names if n.endswith(".gguf")})
        raise FileNotFoundError(f"{repo} has no GGUF file of quant {quant!r}; its GGUF files: "
                                f"{', '.join(quants[:12]) or 'none'}{' ...' if len(quants) > 12 else ''}")
    firsts = [f for f in files if not SPLIT_NAME.match(f.rsplit("/", 1)[-1])
              or SPLIT_NAME.match(f.rsplit("/", 1)[-1])["i"] == "00001"]
    if len(firsts) != 1:
        raise ValueError(f"{repo}:{quant} names {len(firsts)} GGUF files ({', '.join(firsts)}); give a longer "
                         "quant tag or the file itself")
    first = firsts[0]
    m_split = SPLIT_NAME.match(first.rsplit("/", 1)[-1])
    prefix = first[:-len("00001-of-00000.gguf")] if m_split else None
    wanted = [f for f in files if prefix and f.startswith(prefix)] if m_split else [first]
    local = [Path(hf_hub_download(repo, f)) for f in wanted]
    return split_parts(local[0])
